"""The ATMN oracle: an unrolled Python loop over micro-steps whose spikes are exact in the
forward and carry the surrogate in the backward (the straight-through trick
s = soft + stop_gradient(hard - soft), with soft an antiderivative of the surrogate), so plain
autodiff gives the reference gradient. It shares no code with `neuron.py`'s custom_vjp: tests
compare the two in values and gradients for every surrogate, reset mode, quantizer, readout and
the differentiable firing counts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from marjax.config import ATMNConfig

__all__ = ["atmn_unrolled"]


def _antiderivative(z, wv, kind: str):
    """F with F' = the surrogate bump of support wv (wv frozen: d/dV is only the shift)."""
    if kind == "rectangular":
        return jnp.clip(z / wv + 0.5, 0.0, 1.0)
    if kind == "triangular":
        r = jnp.clip(2 * z / wv, -1.0, 1.0)
        return 0.5 + 0.5 * r * (2 - jnp.abs(r))
    return jax.nn.sigmoid(4 * z / wv)   # sigmoid: k sig (1 - sig), k = 4 / wv


def _with_surrogate(hard, soft):
    return soft + jax.lax.stop_gradient(hard - soft)


def atmn_unrolled(x, a, cfg: ATMNConfig, mask=None):
    """(y, pos, neg): decoded output and the fractions of +1 / -1 spikes per micro-step (T,)
    over the elements that `mask` (a prefix of x.shape) keeps, all differentiable."""
    V = jnp.exp(a)
    k = 0.5 if cfg.quantizer == "round" else 1.0
    c = [1.0 if cfg.readout == "ones" else float(cfg.tau) ** t for t in range(cfg.T)]
    wv = cfg.width * jax.lax.stop_gradient(V)
    count_kind = "rectangular" if cfg.surrogate == "straight_through" else cfg.surrogate
    w = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(
        mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).astype(jnp.float32), x.shape)
    n = jnp.maximum(jnp.sum(w), 1.0)
    u = jnp.zeros_like(x)
    y, pos, neg = 0.0, [], []
    for t in range(cfg.T):
        prev = {"full": u, "membrane": u, "detach": jax.lax.stop_gradient(u)}[cfg.reset_grad]
        h = x if t == 0 else prev / cfg.tau
        hard_up = (h >= k * V).astype(jnp.float32)
        hard_dn = (h <= -k * V).astype(jnp.float32) if cfg.ternary else jnp.zeros_like(h)
        p = _with_surrogate(hard_up, _antiderivative(h - k * V, wv, count_kind))
        q = _with_surrogate(hard_dn, _antiderivative(-h - k * V, wv, count_kind) if cfg.ternary else 0.0 * h)
        if cfg.surrogate == "straight_through":    # identity through the quantiser: ds/dh = 1/V
            soft = (h if cfg.ternary else jax.nn.relu(h)) / jax.lax.stop_gradient(V)
            s = _with_surrogate(hard_up - hard_dn, soft)
        else:
            s = p - q
        reset = s if cfg.reset_grad == "full" else jax.lax.stop_gradient(s)
        u = h - reset * V
        y = y + c[t] * V * s
        pos.append(jnp.sum(w * p) / n)
        neg.append(jnp.sum(w * q) / n)
    return y, jnp.stack(pos), jnp.stack(neg)
