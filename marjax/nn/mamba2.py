"""The Llamba "Discrete Mamba-2" mixer (MAR_SPEC.md section 2), pure functions.

in_proj: d -> [xBC | z | A_log]; depthwise causal conv1d (kernel K, bias, identity activation)
over xBC; dt = softplus(A_log), log decay = -dt; SSD recurrence h_t = a_t h_{t-1} + x_t B_t^T,
y_t = h_t C_t; y += D * x; out = out_proj(y * silu(z + z_bias)).

`a_log_bias` is marjax's one addition to Llamba's mixer: in_proj has no bias, so without it the
initial decay of an attention-initialised mixer would be pinned at exp(-softplus(0)) = 0.5; a bias
of -4 starts the decay near 1 (MAR_SPEC.md section 2). Llamba checkpoints load with it at 0.

Spiking sites (stage 2) sit before in_proj and before out_proj; `spike(name, x)` is a callback
supplied by the block (identity for the dense model) so this file stays neuron-agnostic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from marjax import ssm as ssm_ops
from marjax.config import SSMConfig
from marjax.nn.layers import dense
from marjax.typing import (array, constant, depth_scaled_normal, fan_in_normal, identity_tap, ones, param_dataclass,
                           zeros)

__all__ = ["MixerParams", "MixerCache", "mixer", "causal_conv", "split_in_proj", "init_mixer_cache",
           "materialize", "in_proj_width", "mixer_dims"]


@param_dataclass
class MixerParams:
    """w = c + hp + h, in_proj's output order [x | B | C | z | A_log]; conv_w[k] multiplies input
    t - (k_size - 1) + k; a_log_bias is added to A_log before softplus (0 in Llamba checkpoints)."""
    in_proj: Float[Array, "d w"] = array(("d", "w"), ("embed", "ssm_inner"), fan_in_normal)
    conv_w: Float[Array, "k c"] = array(("k", "c"), (None, "ssm_inner"), identity_tap)
    conv_b: Float[Array, "c"] = array(("c",), ("ssm_inner",), zeros)
    D: Float[Array, "h"] = array(("h",), ("ssm_heads",), ones)
    a_log_bias: Float[Array, "h"] = array(("h",), ("ssm_heads",), constant(-4.0))
    z_bias: Float[Array, "hp"] = array(("hp",), ("ssm_inner",), zeros)
    out_proj: Float[Array, "hp d"] = array(("hp", "d"), ("ssm_inner", "embed"), depth_scaled_normal)


@jax.tree_util.register_dataclass
@dataclass
class MixerCache:
    conv: Float[Array, "b km1 c"]          # the last k-1 inputs of the conv
    state: Float[Array, "b h p n"]         # the SSD state (float32)
    __no_type_check__ = True               # leaves get stacked over layers and mapped by tree ops


def in_proj_width(ssm_cfg: SSMConfig) -> int:
    return ssm_cfg.conv_dim + ssm_cfg.d_inner + ssm_cfg.n_heads


def mixer_dims(ssm_cfg: SSMConfig) -> dict:
    """Legend dims of MixerParams for an SSMConfig."""
    return {"h": ssm_cfg.n_heads, "p": ssm_cfg.head_dim, "n": ssm_cfg.state_dim, "hp": ssm_cfg.d_inner,
            "c": ssm_cfg.conv_dim, "k": ssm_cfg.conv_kernel, "w": in_proj_width(ssm_cfg)}


def init_mixer_cache(batch: int, ssm_cfg: SSMConfig, dtype=jnp.float32) -> MixerCache:
    return MixerCache(conv=jnp.zeros((batch, ssm_cfg.conv_kernel - 1, ssm_cfg.conv_dim), dtype),
                      state=jnp.zeros((batch, ssm_cfg.n_heads, ssm_cfg.head_dim, ssm_cfg.state_dim), jnp.float32))


def causal_conv(w: Float[Array, "k c"], b: Float[Array, "c"], xbc: Float[Array, "b l c"],
                prev: Optional[Float[Array, "b km1 c"]] = None):
    """Depthwise causal conv; `prev` holds the K-1 inputs before xbc (zeros at sequence start).
    Returns (out, last K-1 inputs) so decoding can carry the window."""
    k = w.shape[0]
    if prev is None:
        prev = jnp.zeros((xbc.shape[0], k - 1, xbc.shape[2]), xbc.dtype)
    full = jnp.concatenate([prev.astype(xbc.dtype), xbc], axis=1)       # (b, K-1+l, c)
    l = xbc.shape[1]
    out = sum(full[:, i:i + l, :].astype(jnp.float32) * w[i].astype(jnp.float32) for i in range(k))
    out = out + b.astype(jnp.float32)
    return out.astype(xbc.dtype), full[:, l:, :]


def split_in_proj(zxbca: Float[Array, "b l w"], ssm_cfg: SSMConfig):
    """[x | B | C | z | A_log] -> xbc (b, l, c), z (b, l, hp), a_log (b, l, h)."""
    c, di = ssm_cfg.conv_dim, ssm_cfg.d_inner
    return zxbca[..., :c], zxbca[..., c:c + di], zxbca[..., c + di:]


def _heads(xbc: Float[Array, "b l c"], ssm_cfg: SSMConfig):
    b, l, _ = xbc.shape
    h, p, n = ssm_cfg.n_heads, ssm_cfg.head_dim, ssm_cfg.state_dim
    x = xbc[..., :h * p].reshape(b, l, h, p)
    B = xbc[..., h * p:h * p + h * n].reshape(b, l, h, n)
    C = xbc[..., h * p + h * n:].reshape(b, l, h, n)
    return x, B, C


def _identity(_name, x):
    return x


def mixer(p: MixerParams, u: Float[Array, "b l d"], ssm_cfg: SSMConfig, cache: Optional[MixerCache] = None,
          spike: Callable = _identity) -> tuple[Float[Array, "b l d"], Optional[MixerCache]]:
    """Parallel (chunked) forward over a sequence; with `cache` it continues from the cached conv
    window and state and returns the new cache (prefill and decoding share this path; one-token
    steps use the recurrent form)."""
    zxbca = dense(spike("in_proj", u), p.in_proj)
    xbc, z, a_log = split_in_proj(zxbca, ssm_cfg)
    xbc, conv_tail = causal_conv(p.conv_w, p.conv_b, xbc, None if cache is None else cache.conv)
    x, B, C = _heads(xbc, ssm_cfg)
    log_a = -jax.nn.softplus(a_log.astype(jnp.float32) + p.a_log_bias.astype(jnp.float32))
    l = u.shape[1]
    if cache is not None and l == 1:   # decode: O(1) recurrent step
        y, state = ssm_ops.ssd_step(cache.state, x[:, 0], log_a[:, 0], B[:, 0], C[:, 0], D=p.D)
        y = y[:, None]
    else:
        y, state = ssm_ops.ssd(x, log_a, B, C, D=p.D, initial_state=None if cache is None else cache.state,
                               return_final_state=True, impl=ssm_cfg.impl,
                               chunk_size=ssm_ops.effective_chunk(l, ssm_cfg.chunk_size))
    y = y.reshape(*u.shape[:2], ssm_cfg.d_inner)
    gated = (y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32) + p.z_bias)).astype(u.dtype)
    out = dense(spike("out_proj", gated), p.out_proj)
    new_cache = None if cache is None else MixerCache(conv=conv_tail, state=state)
    return out, new_cache


def materialize(p: MixerParams, u: Float[Array, "b l d"], ssm_cfg: SSMConfig) -> Float[Array, "b h l l"]:
    """The (l x l) per-head mixing matrix of the SSD part (conv applied, no D skip): MOHAWK's
    matrix orientation compares it with the attention matrix."""
    xbc, _, a_log = split_in_proj(dense(u, p.in_proj), ssm_cfg)
    xbc, _ = causal_conv(p.conv_w, p.conv_b, xbc)
    _, B, C = _heads(xbc, ssm_cfg)
    return ssm_ops.materialize_mixer(-jax.nn.softplus(a_log.astype(jnp.float32) + p.a_log_bias), B, C)
