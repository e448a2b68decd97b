"""Pure Llama layers: RMSNorm, RoPE (two layouts), SwiGLU MLP, GQA attention.

Every function is `f(params_or_weights, x, cfg-ish)`; accumulations run in float32 and the
result is cast back to the activation dtype.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from marjax.errors import ConfigError
from marjax.kernels import cpu_kernels
from marjax.typing import array, depth_scaled_normal, fan_in_normal, param_dataclass

__all__ = ["MLPParams", "AttnParams", "attention_dims", "rms_norm", "clip_token_grad", "rope_inv_freq", "rope_tables",
           "apply_rope", "mlp", "dense", "project", "attention", "attention_matrix", "repeat_kv", "ATTN_IMPLS"]


@param_dataclass
class MLPParams:
    gate: Float[Array, "d f"] = array(("d", "f"), ("embed", "mlp"), fan_in_normal)
    up: Float[Array, "d f"] = array(("d", "f"), ("embed", "mlp"), fan_in_normal)
    down: Float[Array, "f d"] = array(("f", "d"), ("mlp", "embed"), depth_scaled_normal)


@param_dataclass
class AttnParams:
    """GQA projections: hp = query heads x head dim, gp = KV heads x head dim."""
    wq: Float[Array, "d hp"] = array(("d", "hp"), ("embed", "heads"), fan_in_normal)
    wk: Float[Array, "d gp"] = array(("d", "gp"), ("embed", "kv_heads"), fan_in_normal)
    wv: Float[Array, "d gp"] = array(("d", "gp"), ("embed", "kv_heads"), fan_in_normal)
    wo: Float[Array, "hp d"] = array(("hp", "d"), ("heads", "embed"), depth_scaled_normal)


def attention_dims(cfg) -> dict:
    """Legend dims of AttnParams for a ModelConfig."""
    return {"h": cfg.n_heads, "p": cfg.head_dim, "hp": cfg.n_heads * cfg.head_dim,
            "gp": cfg.n_kv_heads * cfg.head_dim}


def rms_norm(w: Float[Array, "d"], x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_token_grad(x: Float[Array, "b l d"], ratio: float) -> Float[Array, "b l d"]:
    """Identity forward; backward caps each token's cotangent norm at `ratio` times the median
    token norm of the batch. Placed on the residual stream at every block input of the spiking
    student: tokens whose forward state is far from the teacher's (a first-token massive
    activation that the quantised layers did not rebuild) see RMSNorm Jacobians 40x the usual
    and multiply the gradient by that per layer (experiments/README.md, "The SBDS gradient
    explosion"); the cap bounds the growth at each layer and leaves ordinary tokens alone."""
    return x


def _clip_token_grad_fwd(x, ratio):
    return x, None


def _clip_token_grad_bwd(ratio, _, g):
    n = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=-1))          # (b, l)
    cap = ratio * jnp.median(n)
    scale = jnp.where(n > cap, cap / jnp.maximum(n, 1e-30), 1.0)
    return ((g.astype(jnp.float32) * scale[..., None]).astype(g.dtype),)


clip_token_grad.defvjp(_clip_token_grad_fwd, _clip_token_grad_bwd)


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> Float[Array, "hd2"]:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, scaled by a config.RopeScaling (None:
    plain). Float32 step by step in the order transformers' rope init functions use, so the
    long-context angles (position x inv_freq) agree with the reference to rounding."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "freq_factors":   # llama.cpp: theta_i / rope_freqs[i]
        return inv_freq / jnp.asarray(scaling.freq_factors, jnp.float32)
    if scaling.rope_type != "llama3":
        raise ValueError(f"RopeScaling.rope_type {scaling.rope_type!r} is not implemented")
    factor, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)   # long waves stretched
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: Int[Array, "... l"], head_dim: int, theta: float, scaling=None):
    """cos/sin of shape (..., l, head_dim // 2) for frequency index i = 0 .. head_dim/2 - 1;
    `scaling` is the model's config.RopeScaling (None: plain RoPE)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: Float[Array, "b l h hd"], cos, sin, layout: str) -> Float[Array, "b l h hd"]:
    """Rotate q or k. `half`: HF rotate-half (pairs (i, i + hd/2)); `pairs`: GGUF/llama.cpp
    (pairs (2i, 2i+1)), which is what GGUF's permuted q/k weights expect."""
    x32 = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]          # (b, l, 1, hd/2)
    if layout == "half":
        x1, x2 = jnp.split(x32, 2, axis=-1)
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    else:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)


def mlp(p: MLPParams, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    return mlp_down(p, mlp_hidden(p, x))


_HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def dense(x: Float[Array, "... d"], w, out_dtype=None) -> Float[Array, "... f"]:
    """x @ w for a (d, f) weight; the result in `out_dtype` (None: x @ w's dtype).

    The leading dims of x are flattened first, so the product is one (n, d) x (d, f) matmul.
    JAX's transpose of the batched form contracts the weight gradient over several dims, and
    XLA:CPU then copies both operands into a transposed layout; the flat form gives the same
    cross-entropy gradients (bit for bit there) and a 0.85-0.89x student forward+backward at the
    SmolLM2 pipeline's shapes (`python experiments/bench/dense_layout_probe.py {kd,sbds}`).
    Other programs can round differently than with the batched form: the default pipeline's
    results moved with it (experiments/README.md, "The default pipeline").

    A 16-bit float weight (bfloat16 or float16: what a train step with compute_dtype "bfloat16"
    casts the params to) multiplies 16-bit inputs with float32 accumulation, forward and backward
    (`_half_matmul`): the product MXUs and AMX units run natively. XLA:CPU runs a bf16 x bf16
    product with a bf16 result at about a fifth of that speed
    (`python experiments/bench/bf16_matmul_probe.py`). Quantised weights
    (marjax.models.quant.QWeight) multiply through their `__rmatmul__`."""
    if not isinstance(w, jax.Array) or w.ndim != 2:
        y = x @ w
        return y if out_dtype is None else y.astype(out_dtype)
    flat = x.reshape(-1, x.shape[-1])
    if w.dtype in _HALF_FLOATS:
        y = _half_matmul(flat, w, jnp.dtype(out_dtype or jnp.result_type(x, w)))
    else:
        y = jnp.matmul(flat, w, preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1])


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _half_matmul(x, w, out_dtype):
    return _half_matmul_fwd(x, w, out_dtype)[0]


def _half_matmul_fwd(x, w, out_dtype):
    xh = x.astype(w.dtype)
    y = jnp.matmul(xh, w, preferred_element_type=jnp.float32).astype(out_dtype)
    return y, (xh, w, jnp.zeros((0,), x.dtype))


def _half_matmul_bwd(out_dtype, res, ct):
    """Both products from the 16-bit cotangent, accumulated in float32 (JAX's own transpose would
    multiply the float32 cotangent by the 16-bit operand: a float32 product)."""
    xh, w, x_like = res
    ch = ct.astype(w.dtype)
    dx = jnp.matmul(ch, w.T, preferred_element_type=jnp.float32).astype(x_like.dtype)
    dw = jnp.matmul(xh.T, ch, preferred_element_type=jnp.float32).astype(w.dtype)   # (n, d), (n, f): flat
    return dx, dw


_half_matmul.defvjp(_half_matmul_fwd, _half_matmul_bwd)


def project(x: Float[Array, "... d"], ws) -> tuple:
    """(x @ w for w in ws). Weights whose type offers `rmatmul_many(x, ws)` (the quantised
    marjax.models.quant.QWeight) multiply together: one native kernel call on the CPU instead of one
    per matrix."""
    many = getattr(type(ws[0]), "rmatmul_many", None)
    if many is not None and all(type(w) is type(ws[0]) for w in ws):
        return tuple(many(x, ws))
    return tuple(dense(x, w) for w in ws)


def mlp_hidden(p: MLPParams, x: Float[Array, "... d"]) -> Float[Array, "... f"]:
    """silu(gate(x)) * up(x): the input of the down projection (a spiking site)."""
    g, u = project(x, (p.gate, p.up))
    return jax.nn.silu(g) * u


def mlp_down(p: MLPParams, h: Float[Array, "... f"]) -> Float[Array, "... d"]:
    return dense(h, p.down)


def repeat_kv(x: Float[Array, "b l g p"], n_rep: int) -> Float[Array, "b l h p"]:
    return x if n_rep == 1 else jnp.repeat(x, n_rep, axis=2)


def qkv(p: AttnParams, x: Float[Array, "b l d"], cfg, positions: Int[Array, "b l"]):
    """Projected, rotated q (b, l, h, p), k and v (b, l, g, p) (g KV heads)."""
    b, l, _ = x.shape
    q, k, v = project(x, (p.wq, p.wk, p.wv))
    q = q.reshape(b, l, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, l, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(b, l, cfg.n_kv_heads, cfg.head_dim)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return apply_rope(q, cos, sin, cfg.rope_layout), apply_rope(k, cos, sin, cfg.rope_layout), v


def _scores_softmax(q, k, q_pos, k_pos, k_valid=None):
    """Causal softmax(q k^T / sqrt(hd)) in float32: q (b,l,hq,hd), k (b,s,hq,hd) -> (b,hq,l,s)."""
    s = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k.astype(jnp.float32))
    return _masked_softmax(s / jnp.sqrt(jnp.float32(q.shape[-1])), q_pos, k_pos, k_valid)


def _masked_softmax(s, q_pos, k_pos, k_valid=None):
    """Causal softmax over the last axis of scaled scores s (b, h, l, s), in float32."""
    allowed = q_pos[:, None, :, None] >= k_pos[:, None, None, :]
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, None, :]
    s = jnp.where(allowed, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


def attention_matrix(p: AttnParams, x: Float[Array, "b l d"], cfg,
                     positions: Int[Array, "b l"]) -> Float[Array, "b h l l"]:
    """The (l x l) causal attention matrix per query head (MOHAWK matrix orientation target)."""
    q, k, _ = qkv(p, x, cfg, positions)
    k = repeat_kv(k, cfg.n_heads // cfg.n_kv_heads)
    return _scores_softmax(q, k, positions, positions)


ATTN_IMPLS = ("auto", "xla")


def _decode_kernel_applies(q, ck, impl: str) -> bool:
    """Whether one decode token's attention runs the native CPU kernel (decided at trace time):
    impl "auto", a single float32 query position over a float32 cache, the kernel built."""
    return (impl == "auto" and q.shape[1] == 1 and q.dtype == jnp.float32 and ck.dtype == jnp.float32
            and cpu_kernels.available())


def _attend(q, k_all, v_all, q_pos, k_pos, k_valid, n_kv_heads: int):
    """Causal GQA attention core in float32: q (b,l,h,hd), k/v (b,s,g,hd) -> (b,l,h,hd)."""
    # grouped: query head h reads KV head h // n_rep (repeat_kv's order) without materialising
    # the repeated K/V, which decoding would otherwise copy out of the whole cache every token
    b, l, h, hd = q.shape
    n_rep = h // n_kv_heads
    qg = q.reshape(b, l, n_kv_heads, n_rep, hd).astype(jnp.float32)
    s = jnp.einsum("blgrd,bsgd->bgrls", qg, k_all.astype(jnp.float32)).reshape(b, h, l, -1)
    probs = _masked_softmax(s / jnp.sqrt(jnp.float32(hd)), q_pos, k_pos, k_valid)
    pg = probs.reshape(b, n_kv_heads, n_rep, l, -1)
    return jnp.einsum("bgrls,bsgd->blgrd", pg, v_all.astype(jnp.float32)).reshape(b, l, h, hd)


def attention(p: AttnParams, x: Float[Array, "b l d"], cfg, positions: Int[Array, "b l"],
              cache=None, impl: str = "auto"):
    """Causal GQA attention. With `cache` = (k (b,S,hkv,hd), v), the new k/v are written at
    positions and attention runs over the cache; returns (out, new_cache). `impl` (ATTN_IMPLS):
    "auto" runs a float32 one-token decode step with the native CPU kernel
    (marjax.kernels.cpu_kernels.attn_decode: reads the valid prefix of the cache in place) where it
    is built, under lax.platform_dependent so other platforms keep XLA's einsums; "xla" always the
    einsums."""
    if impl not in ATTN_IMPLS:
        raise ConfigError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
    q, k, v = qkv(p, x, cfg, positions)
    if cache is None:
        o = _attend(q, k, v, positions, positions, None, cfg.n_kv_heads)
    else:
        ck, cv = cache
        start = positions[0, 0]  # all rows decode in lockstep (same prompt length per batch)
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), start, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), start, axis=1)
        cache = (ck, cv)
        k_pos = jnp.broadcast_to(jnp.arange(ck.shape[1])[None], (x.shape[0], ck.shape[1]))

        def xla(q, ck, cv, positions):
            return _attend(q, ck, cv, positions, k_pos, k_pos <= positions[:, -1:], cfg.n_kv_heads)

        if _decode_kernel_applies(q, ck, impl):
            def cpu(q, ck, cv, positions):
                return cpu_kernels.attn_decode(q[:, 0], ck, cv, positions[:, 0] + 1)[:, None]
            o = jax.lax.platform_dependent(q, ck, cv, positions, cpu=cpu, default=xla)
        else:
            o = xla(q, ck, cv, positions)
    out = dense(o.reshape(*x.shape[:2], -1).astype(x.dtype), p.wo)
    return out, cache
