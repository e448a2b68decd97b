"""Surrogate derivatives for the ATMN threshold step (MAR_SPEC.md section 3).

The forward pass uses the exact step H(h - V). The backward replaces its derivative, a Dirac
delta at h = V, by a bump `sg(h - V; V)` whose support is `width` in units of V. Every bump
integrates to 1 (the height of the step it replaces), so the derivative of the decoded value
V * s with respect to h is O(1) whatever V is:

  rectangular      sg(z) = 1 / (w V)                          for |z| < w V / 2, else 0
  triangular       sg(z) = 2 / (w V) * max(0, 1 - 2|z| / (w V))
  sigmoid          sg(z) = k sigma(k z) (1 - sigma(k z)),   k = 4 / (w V)  (peak 1 / (w V))
  straight_through the quantiser V * s is passed through as the identity: ds/dh = 1 / V for
                   every h (ternary) or for h > 0 (binary, which only represents the positive
                   side, like a ReLU); ds/dV = 0; `width` is not used

The ternary step s(h) = H(h - kV) - H(-h - kV) (k = 1, or 1/2 for the round-to-nearest
quantiser) then has
  ds/dh = sg(h - kV) + sg(-h - kV),     ds/dV = k (-sg(h - kV) + sg(-h - kV))
and the binary step s(h) = H(h - kV) keeps only the first terms.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["SURROGATES", "bump", "step_grads", "count_grads", "spike_grads"]

SURROGATES = ("rectangular", "triangular", "sigmoid", "straight_through")


def bump(z, V, kind: str, width: float):
    """sg(z) for a step at z = 0 with support `width * V` (float32 arrays broadcastable)."""
    wv = width * V
    if kind == "rectangular":
        return jnp.where(jnp.abs(z) < 0.5 * wv, 1.0 / wv, 0.0)
    if kind == "triangular":
        return (2.0 / wv) * jnp.maximum(0.0, 1.0 - 2.0 * jnp.abs(z) / wv)
    if kind == "sigmoid":
        k = 4.0 / wv
        sig = jax.nn.sigmoid(k * z)
        return k * sig * (1.0 - sig)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {kind!r}")


def step_grads(h, V, kind: str, width: float, ternary: bool, fire: float = 1.0):
    """(ds/dh, ds/dV) of the spike function at membrane h and threshold V (float32). The step
    fires at h >= fire * V (fire = 1, or 1/2 for the round-to-nearest quantiser), so the shift
    derivative carries the factor `fire`; the bump's width stays w V."""
    return spike_grads(h, V, kind, width, ternary, fire)[:2]


def spike_grads(h, V, kind: str, width: float, ternary: bool, fire: float = 1.0):
    """(ds/dh, ds/dV, up, down): `step_grads` and `count_grads` from one evaluation of the bumps
    (the backward pass with firing-rate stats needs both)."""
    up, down = count_grads(h, V, kind, width, ternary, fire)
    if kind == "straight_through":
        d_h = jnp.broadcast_to(1.0 / V, jnp.broadcast_shapes(jnp.shape(h), jnp.shape(V)))
        if not ternary:
            d_h = jnp.where(h > 0, d_h, 0.0)
        return d_h, jnp.zeros_like(d_h), up, down
    return up + down, fire * (down - up), up, down


def count_grads(h, V, kind: str, width: float, ternary: bool, fire: float = 1.0):
    """(d pos/dh, -d neg/dh): surrogate derivatives of the +1 and -1 spike indicators
    pos = H(h - fire V), neg = H(-h - fire V); straight-through counts use the rectangular bump
    (a count has no identity to pass through). Then d pos/dV = -fire * up, d neg/dV = -fire * down."""
    kind = "rectangular" if kind == "straight_through" else kind
    up = bump(h - fire * V, V, kind, width)
    down = bump(-h - fire * V, V, kind, width) if ternary else jnp.zeros_like(up)
    return up, down
