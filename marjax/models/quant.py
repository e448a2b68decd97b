"""Weight-only quantised decode weights: a pure map from an LM's params to bfloat16 or int8
matmul weights, and the cached decode step that dequantises them inside the jitted program.

    qp = quantize_params(params, "int8")        # LMParams with Int8Weight leaves (4x fewer bytes)
    logits, cache = forward_cached_q(qp, ids, cache, cfg)     # jit with static cfg, like forward_cached

The matmul weights are the ones `marjax.models.lm` multiplies by: the attention projections
(wq, wk, wv, wo) or the SSM mixer's in_proj and out_proj, the MLP's gate, up and down, the LM
head and the embedding table (tied models multiply by embed.T for the head). Norm weights, the
conv taps, D and the biases (under 0.5% of the params) stay as they are, and so do ATMN
thresholds.

int8 is symmetric per output channel: scale = max |w| over the contraction axis / 127 and
q = round(w / scale), so |dequantised - w| <= scale / 2 element by element. The embedding table
(v, d) is scaled per row (per vocab entry), which is per output channel of the tied head and per
token of the gather. bf16 rounds each weight to 8 mantissa bits.

Activations stay in the model's dtype: `dequantize_params` turns every quantised leaf back into
it at the start of the jitted step, so the layers run unchanged (XLA fuses the conversion where
the backend can; otherwise it materialises the dequantised weights once per call).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from marjax.config import ModelConfig
from marjax.errors import ConfigError
from marjax.models.lm import LMParams, forward_cached

__all__ = ["MODES", "Int8Weight", "quantize_int8", "quantize_params", "dequantize_params", "forward_cached_q",
           "weight_bytes"]

MODES = ("f32", "bf16", "int8")
INT8_MAX = 127


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Int8Weight:
    """w ~= q * scale; scale has size 1 along the contraction axis (broadcasts against q)."""
    q: Int[Array, "..."]
    scale: Float[Array, "..."]
    __no_type_check__ = True     # leaves are mapped by tree ops (ShapeDtypeStructs under eval_shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: Float[Array, "..."], axis: int) -> Int8Weight:
    """Symmetric int8 with one scale per slice along every axis but `axis` (the contraction
    axis); an all-zero channel gets scale 1 (its q is 0 either way)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Weight(q=q, scale=scale)


def _quantize(w, axis: int, mode: str):
    if w is None or mode == "f32":
        return w
    if mode == "bf16":
        return w.astype(jnp.bfloat16)
    return quantize_int8(w, axis)


def quantize_params(params: LMParams, mode: str) -> LMParams:
    """The same LMParams with its matmul weights (module doc) in `mode` ("f32": unchanged).
    Weights are stacked (L, in, out) or (in, out): the contraction axis is -2; the embedding
    table (v, d) contracts over d (-1) in the tied head."""
    if mode not in MODES:
        raise ConfigError(f"weights mode must be one of {MODES}, got {mode!r}")
    if mode == "f32":
        return params
    b = params.blocks
    mixer_fields = [f.name for f in dataclasses.fields(b.mixer)
                    if f.name in ("wq", "wk", "wv", "wo", "in_proj", "out_proj")]
    mixer = dataclasses.replace(b.mixer, **{n: _quantize(getattr(b.mixer, n), -2, mode) for n in mixer_fields})
    mlp = dataclasses.replace(b.mlp, **{n: _quantize(getattr(b.mlp, n), -2, mode) for n in ("gate", "up", "down")})
    blocks = dataclasses.replace(b, mixer=mixer, mlp=mlp)
    return dataclasses.replace(params, embed=_quantize(params.embed, -1, mode), blocks=blocks,
                               lm_head=_quantize(params.lm_head, -2, mode))


def dequantize_params(qparams: LMParams, dtype=jnp.float32) -> LMParams:
    """Every Int8Weight and bfloat16 leaf back in `dtype` (traceable: call it inside jit)."""
    def one(x):
        if isinstance(x, Int8Weight):
            return x.dequantize(dtype)
        return x.astype(dtype) if x.dtype == jnp.bfloat16 else x
    return jax.tree.map(one, qparams, is_leaf=lambda x: isinstance(x, Int8Weight))


def forward_cached_q(qparams: LMParams, ids: Int[Array, "b n"], cache, cfg: ModelConfig):
    """lm.forward_cached on weights dequantised to the model's dtype inside the same program."""
    return forward_cached(dequantize_params(qparams, jnp.dtype(cfg.dtype)), ids, cache, cfg)


def weight_bytes(params) -> int:
    """Bytes of all param leaves (int8 values and their scales counted)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
