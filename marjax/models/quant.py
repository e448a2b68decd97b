"""Weight-only quantised decode weights: a pure map from an LM's params to bfloat16, int8 or
4-bit matmul weights, multiplied by inside the jitted decode step.

    qp = unroll_layers(quantize_params(params, "int8"))    # QWeight leaves; the decode layout
    logits, cache = forward_cached_q(qp, ids, cache, cfg)   # jit with static cfg, like forward_cached
    ids = marjax.sampling.decode(qp, cfg, prompt, 32)       # decode takes quantised params as they are

The matmul weights are the ones `marjax.models.lm` multiplies by: the attention projections
(wq, wk, wv, wo) or the SSM mixer's in_proj and out_proj, the MLP's gate, up and down, the LM
head and the embedding table (tied models multiply by embed.T for the head). Norm weights, the
conv taps, D and the biases (under 0.5% of the params) stay as they are, and so do ATMN
thresholds.

A QWeight stores its matrix output-major, (..., out, in) (the model's (in, out) weights
transposed; the embedding table (v, d) as it is), because that is the layout XLA:CPU fuses: in
a matrix-vector product (one decode token) against transpose(convert(q) * scale) it reads the
int8 or bf16 values straight from memory. Any other layout, or the stacked weights under a
lax.scan, makes it materialise the float32 copy of every matrix on every token (3-4x slower
than float32, measured). So quantised decoding wants the unrolled layout (lm.unroll_layers).

int8 is symmetric per group of `group` (default 32) consecutive weights along the contraction
axis, as llama.cpp's Q8_0: scale = max |w| over the group / 127 (stored float16), q = round(w /
scale), so |dequantised - w| <= scale / 2 (plus the scale's float16 rounding). A contraction
length not divisible by the group uses one group (per output channel). bf16 rounds each weight
to 8 mantissa bits.

q4 is llama.cpp's Q4_1 layout: per group of 32 weights along the contraction axis, scale = (max
- min) / 15 and zero = min (both float16), q = round((w - zero) / scale) in [0, 15], two q a
byte (byte j of a group holds q_j low and q_(j+16) high), so |dequantised - w| <= scale / 2
(plus float16 rounding). The block matrices are q4 and the embedding table (and an untied head)
int8, as in the SmolLM2 GGUF (Q4_1 blocks, a Q8_0 token table); a GGUF's Q4_1 matrices come back
unchanged (their min and max are on the grid). A matrix whose contraction length is not a
multiple of 32 stays int8. (Scales and zeros are float16: weights must lie within +-65504.)

Activations stay in the model's dtype. The layers multiply by a QWeight as by an array (`x @ w`
calls `matmul`), so they run unchanged on quantised params: on the CPU a decode-sized float32
product (at most cpu_kernels.MAX_ROWS activation rows) of a 2-D output-major QWeight runs the
native kernel of marjax.kernels.cpu_kernels, which streams the int8/q4/bf16 weights on all cores;
everything else (prefill, other platforms, impl="xla", no kernel built) multiplies by the
dequantised matrix, which XLA fuses as above. `dequantize_params` turns every QWeight back into
an array for code that needs plain arrays.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from marjax.config import ModelConfig
from marjax.errors import ConfigError
from marjax.kernels import cpu_kernels
from marjax.models.lm import LMParams, forward_cached, is_unrolled

__all__ = ["MODES", "IMPLS", "GROUP", "Q4_GROUP", "QWeight", "matmul", "quantize_int8", "quantize_q4",
           "matmul_many", "quantize_weight", "quantize_params", "dequantize_params", "forward_cached_q", "weight_bytes"]

MODES = ("f32", "bf16", "int8", "q4")
# how a QWeight product runs: "auto" the native CPU kernel where it applies (module doc), else
# XLA's dequantising matmul; "xla" always the latter
IMPLS = ("auto", "xla")
INT8_MAX = 127
GROUP = 32
Q4_GROUP = 32      # fixed: the kernel's layout (16 bytes a group)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QWeight:
    """A quantised matrix stored output-major: data (..., out, in) int8 or bfloat16, or (..., out,
    in / 2) uint8 for q4 (two 4-bit values a byte); scale (..., out, in // group, 1) float16 for
    int8 and q4, None for bf16; zero (the same shape) for q4 only. `transposed`: the model's
    weight is data's transpose, (..., in, out) (every matmul weight but the embedding table)."""
    data: Array
    scale: Optional[Array]
    zero: Optional[Array] = None
    transposed: bool = field(metadata=dict(static=True), default=True)
    impl: str = field(metadata=dict(static=True), default="auto")
    __no_type_check__ = True     # leaves are mapped by tree ops (ShapeDtypeStructs under eval_shape)

    def __rmatmul__(self, x):
        return matmul(x, self)

    @staticmethod
    def rmatmul_many(x, ws) -> tuple:
        """(x @ w for w in ws) (marjax.nn.layers.project's protocol): `matmul_many`."""
        return matmul_many(x, ws)

    @property
    def T(self) -> "QWeight":
        """The transposed matrix (the tied head's embed.T): same data, the other contraction axis."""
        return dataclasses.replace(self, transposed=not self.transposed)

    def take_rows(self, ids) -> jax.Array:
        """jnp.take(self.dequantize(), ids, axis=0), dequantising only the rows taken (the embedding
        lookup: the table is stored as it is, untransposed)."""
        if self.transposed or self.data.ndim != 2:
            return jnp.take(self.dequantize(), ids, axis=0)
        rows = jax.tree.map(lambda a: jnp.take(a, ids, axis=0), self)
        return rows.dequantize()

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = self.data.astype(jnp.float32)
        if self.zero is not None:      # q4: unpack each group's 16 bytes into its 32 values
            *lead, o, half = self.data.shape
            n = self.scale.shape[-2]
            b = self.data.reshape(*lead, o, n, half // n)
            q = jnp.concatenate([b & 15, b >> 4], axis=-1).astype(jnp.float32)
            w = (q * self.scale.astype(jnp.float32) + self.zero.astype(jnp.float32)).reshape(*lead, o, 2 * half)
        elif self.scale is not None:
            *lead, o, i = self.data.shape
            n = self.scale.shape[-2]
            w = (w.reshape(*lead, o, n, i // n) * self.scale.astype(jnp.float32)).reshape(*lead, o, i)
        w = w.astype(dtype)
        return jnp.swapaxes(w, -1, -2) if self.transposed else w


def _output_major(w, axis: int):
    """(w in output-major layout (..., out, in), transposed?) for contraction axis -2 or -1."""
    if axis not in (-1, -2):
        raise ConfigError(f"the contraction axis must be -1 or -2, got {axis}")
    return (jnp.swapaxes(w, -1, -2), True) if axis == -2 else (w, False)


def quantize_int8(w: Float[Array, "..."], axis: int = -2, group: int = GROUP) -> QWeight:
    """Symmetric int8 with one scale per `group` consecutive weights along `axis` (the
    contraction axis, -2 or -1); one group per channel when the axis length is not divisible by
    `group`; an all-zero group gets scale 1 (its q is 0 either way)."""
    if group < 1:
        raise ConfigError(f"int8 group must be >= 1, got {group}")
    wo, transposed = _output_major(w.astype(jnp.float32), axis)
    *lead, o, i = wo.shape
    g = group if i % group == 0 else i
    blocks = wo.reshape(*lead, o, i // g, g)
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float16)
    q = jnp.clip(jnp.round(blocks / scale.astype(jnp.float32)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return QWeight(data=q.reshape(*lead, o, i), scale=scale, transposed=transposed)


def quantize_q4(w: Float[Array, "..."], axis: int = -2) -> QWeight:
    """4-bit with a float16 scale and zero per Q4_GROUP consecutive weights along `axis` (module
    doc); int8 (quantize_int8) when the axis length is not a multiple of Q4_GROUP. A constant
    group gets scale 1 (its q is 0: the zero holds the value)."""
    wo, transposed = _output_major(w.astype(jnp.float32), axis)
    *lead, o, i = wo.shape
    if i % Q4_GROUP:
        return quantize_int8(w, axis)
    blocks = wo.reshape(*lead, o, i // Q4_GROUP, Q4_GROUP)
    lo, hi = jnp.min(blocks, axis=-1, keepdims=True), jnp.max(blocks, axis=-1, keepdims=True)
    zero = lo.astype(jnp.float16)
    scale = jnp.where(hi > lo, (hi - lo) / 15, 1.0).astype(jnp.float16)
    q = jnp.clip(jnp.round((blocks - zero.astype(jnp.float32)) / scale.astype(jnp.float32)), 0, 15).astype(jnp.uint8)
    half = Q4_GROUP // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return QWeight(data=packed.reshape(*lead, o, i // 2), scale=scale, zero=zero, transposed=transposed)


def _uses_kernel(x, w: QWeight) -> bool:
    """Whether x @ w can run the native CPU kernel (module doc), decided at trace time."""
    rows = math.prod(x.shape[:-1])
    return (w.impl == "auto" and w.transposed and w.data.ndim == 2 and x.dtype == jnp.float32
            and 0 < rows <= cpu_kernels.MAX_ROWS and cpu_kernels.available())


def _kind(w: QWeight) -> str:
    return "q4" if w.zero is not None else ("bf16" if w.scale is None else "q8")


def _operands(w: QWeight) -> tuple:
    return {"q4": (w.data, w.scale, w.zero), "bf16": (w.data,), "q8": (w.data, w.scale)}[_kind(w)]


def matmul(x: Float[Array, "... k"], w: QWeight) -> Float[Array, "... n"]:
    """x @ (the matrix w stands for), in x's dtype: the kernel on the CPU where `_uses_kernel`,
    else against the dequantised matrix (which XLA fuses)."""
    return matmul_many(x, (w,))[0]


def matmul_many(x: Float[Array, "... k"], ws) -> tuple:
    """(x @ w for w in ws), in x's dtype. Where every product can run the native kernel
    (`_uses_kernel`) and the matrices are of one kind (int8, q4 or bf16), they run as one kernel
    call (one hand-off to the thread pool: a layer's q, k and v, or gate and up); else each as
    `matmul` would alone."""
    ws = tuple(ws)
    kinds = {_kind(w) for w in ws}
    if len(kinds) > 1:
        return tuple(matmul(x, w) for w in ws)

    def dense(x):
        return tuple(x @ w.dequantize(x.dtype) for w in ws)

    if not ws or not all(_uses_kernel(x, w) for w in ws):
        return dense(x)
    kind = kinds.pop()
    for w in ws:
        k = w.data.shape[-1] * (2 if w.zero is not None else 1)
        if x.shape[-1] != k:
            raise ConfigError(f"matmul: x's last axis is {x.shape[-1]} but the weight contracts over {k}")
    x2 = x.reshape(-1, x.shape[-1])

    def cpu(x2):
        return cpu_kernels.matmuls(kind, x2, [_operands(w) for w in ws])

    # other platforms (an exported or accelerator program) lower the dense branch only
    ys = jax.lax.platform_dependent(x2, cpu=cpu, default=dense)
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys)


def quantize_weight(w, axis: int, mode: str, group: int = GROUP, impl: str = "auto"):
    """w in `mode` ("f32": unchanged; None stays None) with contraction axis `axis`; `impl` picks
    how its products run (IMPLS)."""
    if w is None or mode == "f32":
        return w
    if mode == "q4":
        return dataclasses.replace(quantize_q4(w, axis), impl=impl)
    if mode == "bf16":
        wo, transposed = _output_major(w, axis)
        return QWeight(data=wo.astype(jnp.bfloat16), scale=None, transposed=transposed, impl=impl)
    return dataclasses.replace(quantize_int8(w, axis, group), impl=impl)


def quantize_params(params: LMParams, mode: str, group: int = GROUP, impl: str = "auto") -> LMParams:
    """The same LMParams (stacked or unrolled) with its matmul weights (module doc) in `mode`
    ("f32": unchanged). Weights are (in, out) with the contraction axis -2; the embedding table
    (v, d) contracts over d (-1) in the tied head. `impl` (IMPLS): how their products run. q4
    quantises the block matrices to 4 bits and the table and head to int8 (module doc)."""
    if mode not in MODES:
        raise ConfigError(f"weights mode must be one of {MODES}, got {mode!r}")
    if impl not in IMPLS:
        raise ConfigError(f"quantised matmul impl must be one of {IMPLS}, got {impl!r}")
    if mode == "f32":
        return params
    if mode == "q4" and impl == "auto" and jax.default_backend() == "cpu" and not cpu_kernels.available():
        warnings.warn(f"q4 weights without marjax's CPU kernel ({cpu_kernels.status().reason}) decode through "
                      "XLA's dequantising matmul, which does not fuse the 4-bit unpacking: about 3x slower than "
                      "float32 (measured); int8 does not have this problem", RuntimeWarning, stacklevel=2)

    blocks = (tuple(_quantize_block(b, mode, group, impl) for b in params.blocks) if is_unrolled(params)
              else _quantize_block(params.blocks, mode, group, impl))
    outer = "int8" if mode == "q4" else mode
    return dataclasses.replace(params, embed=quantize_weight(params.embed, -1, outer, group, impl), blocks=blocks,
                               lm_head=quantize_weight(params.lm_head, -2, outer, group, impl))


@functools.partial(jax.jit, static_argnames=("mode", "group", "impl"))   # one compile for all layers of an unrolled model
def _quantize_block(b, mode: str, group: int, impl: str):
    mixer_fields = [f.name for f in dataclasses.fields(b.mixer)
                    if f.name in ("wq", "wk", "wv", "wo", "in_proj", "out_proj")]
    mixer = dataclasses.replace(b.mixer, **{n: quantize_weight(getattr(b.mixer, n), -2, mode, group, impl)
                                            for n in mixer_fields})
    mlp = dataclasses.replace(b.mlp, **{n: quantize_weight(getattr(b.mlp, n), -2, mode, group, impl)
                                        for n in ("gate", "up", "down")})
    return dataclasses.replace(b, mixer=mixer, mlp=mlp)


def _is_q(x) -> bool:
    return isinstance(x, QWeight)


def dequantize_params(qparams: LMParams, dtype=jnp.float32) -> LMParams:
    """Every QWeight back in `dtype` (traceable: call it inside jit); other leaves unchanged."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if _is_q(x) else x, qparams, is_leaf=_is_q)


def forward_cached_q(qparams: LMParams, ids: Int[Array, "b n"], cache, cfg: ModelConfig):
    """lm.forward_cached on quantised (or float) params: the layers multiply by the QWeights
    (`matmul`) inside the same program."""
    return forward_cached(qparams, ids, cache, cfg)


def weight_bytes(params) -> int:
    """Bytes of all param leaves (int8 values and their scales counted)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
