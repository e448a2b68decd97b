"""The SSD scan: one API (`ssd`), named implementations, a decode step and the mixing matrix.

Contract (per batch element and head, state h of shape (p, n)):
    h_t = exp(log_a_t) h_{t-1} + x_t B_t^T,    y_t = h_t C_t (+ D x_t)
Inputs may be float32 or bfloat16 (mixed is fine, e.g. float32 log_a with bfloat16 x); all
implementations accumulate in float32, return y in x's dtype and states in float32.

Every implementation is a function with one signature,
    fn(x, log_a, B, C, h0, chunk_size, inter_chunk) -> (y float32, final state float32),
listed in IMPL_FNS under its name; `Impl` is the type of the names `ssd` accepts.
"""
from __future__ import annotations

import typing
from functools import partial
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from marjax.errors import MarjaxError
from marjax.ssm.associative import ssd_associative
from marjax.ssm.chunked import INTER_CHUNK, segsum, ssd_chunk_scan, ssd_chunked
from marjax.ssm.hybrid import ssd_hybrid
from marjax.ssm.native import ssd_native
from marjax.ssm.pallas import ssd_pallas
from marjax.ssm.reference import ssd_reference
from marjax.ssm.reference import step as _reference_step

Impl = Literal["reference", "chunked", "chunk_scan", "associative", "hybrid", "pallas", "native", "auto"]
IMPLS: tuple[str, ...] = typing.get_args(Impl)
ImplFn = Callable[..., tuple]
IMPL_FNS: dict[str, ImplFn] = {
    "reference": ssd_reference,      # token-by-token lax.scan: the oracle
    "chunked": ssd_chunked,          # SSD block form: matmuls in chunks, a pass over chunk states
    "chunk_scan": ssd_chunk_scan,    # the block form walked chunk by chunk in one lax.scan (CPU)
    "associative": ssd_associative,  # per-token associative scan: small states only (memory guard)
    "hybrid": ssd_hybrid,            # token scan for values, chunked form under differentiation
    "pallas": ssd_pallas,            # pallas_kernels: Mosaic on TPU, Triton on GPU, interpreted on CPU
    "native": ssd_native,            # marjax's CPU kernel for values, chunk_scan under differentiation
}
DEFAULT_CHUNK = 128

# What impl="auto" runs: per backend, rows (longest length or None for any, impl, chunk size);
# the first row covering the sequence length wins. CPU: measured in experiments/bench/RESULTS.md.
# Accelerators: the chunked form is matmul-bound (0.18 ms vs 23 ms for the token scan on an H100
# at L=1024); the Pallas kernel is not auto-selected until it has been measured there.
# CPU: chunk 32 (with ssd_chunk_scan's 4 chunks per scan iteration) is within the noise of the best
# of chunks 16/32/64 x unroll 1/2/4/8 at L = 1024 and 4096, forward and forward+backward. Above 256
# tokens "native" (the CPU kernel for values, that same chunk scan under differentiation; the chunk
# scan where the kernel is unavailable): 1.5-2.5x the chunk scan's forward at 512-4096 on an AVX2
# CPU. Up to 256 the chunk scan stays, though the kernel is faster there too, so that training at
# the pipeline's 64 tokens and its 128-token evaluation windows give the committed results bit for bit.
AUTO_TABLE: dict[str, tuple] = {"cpu": ((256, "chunk_scan", 32), (None, "native", 32))}
AUTO_ACCELERATOR = ((None, "chunked", DEFAULT_CHUNK),)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def effective_chunk(length: int, chunk_size: int = DEFAULT_CHUNK) -> int:
    """The chunk size to use for a sequence of `length` tokens: `chunk_size`, lowered to the
    sequence length rounded up to a power of two (a 5-token prompt with chunk 128 runs in one
    chunk of 8). Always accepted by `ssd`."""
    return min(int(chunk_size), _next_pow2(max(1, int(length))))


def auto_choice(backend: str, length: int) -> tuple[str, int]:
    """(impl, chunk size) that impl="auto" runs for a sequence of `length` tokens on `backend`."""
    for max_len, impl, chunk in AUTO_TABLE.get(backend, AUTO_ACCELERATOR):
        if max_len is None or length <= max_len:
            return impl, chunk
    raise MarjaxError(f"AUTO_TABLE[{backend!r}] has no row for length {length}")


def resolve_impl(impl: Impl, length: int = DEFAULT_CHUNK) -> str:
    """Map "auto" to the implementation used on the default backend for `length` tokens."""
    if impl != "auto":
        return impl
    return auto_choice(jax.default_backend(), length)[0]


try:
    _Tracer = jax.core.Tracer
except AttributeError:          # jax versions that stop re-exporting it
    from jax._src.core import Tracer as _Tracer


def _is_concrete(a) -> bool:
    return not isinstance(a, _Tracer)


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise MarjaxError(f"{name} must be a floating array (float32 or bfloat16), got dtype {jnp.result_type(a)}")


def _validate(x, log_a, B, C, D, initial_state):
    shapes = {k: tuple(jnp.shape(v)) for k, v in dict(x=x, log_a=log_a, B=B, C=C).items()}
    if len(shapes["x"]) != 4:
        raise MarjaxError(f"x must have shape (batch, length, heads, head_dim), got {shapes['x']}")
    b, l, h, p = shapes["x"]
    if l < 1:
        raise MarjaxError(f"x must have at least one token (length >= 1), got shape {shapes['x']}")
    if shapes["log_a"] != (b, l, h):
        raise MarjaxError(f"log_a must have shape (batch, length, heads) = {(b, l, h)} to match x {shapes['x']}, "
                          f"got {shapes['log_a']}")
    if len(shapes["B"]) != 4 or shapes["B"][:3] != (b, l, h):
        raise MarjaxError(f"B must have shape (batch, length, heads, state) = {(b, l, h)} + (n,) to match x "
                          f"{shapes['x']}, got {shapes['B']}")
    n = shapes["B"][3]
    if shapes["C"] != (b, l, h, n):
        raise MarjaxError(f"C must have the shape of B {(b, l, h, n)}, got {shapes['C']}")
    for name, a in (("x", x), ("log_a", log_a), ("B", B), ("C", C)):
        _check_float(name, a)
    if D is not None:
        _check_float("D", D)
        if tuple(jnp.shape(D)) != (h,):
            raise MarjaxError(f"D must have shape (heads,) = {(h,)}, got {tuple(jnp.shape(D))}")
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if tuple(jnp.shape(initial_state)) != (b, h, p, n):
            raise MarjaxError(f"initial_state must have shape (batch, heads, head_dim, state) = {(b, h, p, n)}, "
                              f"got {tuple(jnp.shape(initial_state))}")
    # Positive log decay makes the recurrence blow up. Checked only on concrete (eager) inputs:
    # under jit/grad/vmap the values are unknown and a host check would need a callback.
    # The (b, l, h) decays are small next to x, so the eager check copies them to the host.
    if _is_concrete(log_a):
        host = np.asarray(log_a, np.float32)
        if np.any(host > 0):
            raise MarjaxError(f"log_a must be <= 0 (a log decay), got max {float(host.max())}")
    return b, l, h, p, n


def ssd(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
        C: Float[Array, "b l h n"], *, D: Optional[Float[Array, "h"]] = None,
        initial_state: Optional[Float[Array, "b h p n"]] = None, return_final_state: bool = False,
        impl: Impl = "auto", chunk_size: Optional[int] = None, inter_chunk: str = "scan"):
    """SSD scan: y_t = h_t C_t (+ D x_t) with h_t = exp(log_a_t) h_{t-1} + x_t B_t^T.

    Args:
      x (b, l, h, p), log_a (b, l, h) with log_a <= 0, B and C (b, l, h, n): any length l.
      D: optional (h,) skip, y += D[h] * x.
      initial_state: optional (b, h, p, n) state before the first token (continue a sequence).
      return_final_state: also return the state after the last token, float32 (b, h, p, n).
      impl: "reference" (token-by-token lax.scan, the oracle), "chunked" (SSD block form),
        "chunk_scan" (the block form walked chunk by chunk in one lax.scan, state kept in
        cache), "associative" (per-token associative scan; small states only, memory-guarded),
        "hybrid" (the token scan for values, the chunked form under differentiation; reverse
        mode only), "pallas" (pallas_kernels: Mosaic on TPU, Triton on GPU, interpreted on CPU)
        or "auto" (see AUTO_TABLE: impl and chunk size per backend and length).
      chunk_size: power of two. None means effective_chunk(l, 128) (auto: its table's chunk).
        An explicit chunk_size larger than l rounded up to a power of two (more than half padding) is rejected for the
        chunked/chunk_scan/hybrid/pallas/auto impls; pass effective_chunk(l, chunk_size) to clamp it instead.
        reference and associative ignore it.
      inter_chunk: "scan" or "associative": how the chunked impl combines chunk states.

    Static (under jit): impl, chunk_size, inter_chunk, return_final_state.
    Validation: shapes, float dtypes, impl, chunk_size always; log_a <= 0 only when log_a is a
    concrete array (eager calls), not under jit/grad/vmap tracing.
    Returns y (b, l, h, p) in x's dtype, or (y, final_state) with return_final_state=True.
    """
    if impl not in IMPLS:
        raise MarjaxError(f"impl must be one of {IMPLS}, got {impl!r}")
    if inter_chunk not in INTER_CHUNK:
        raise MarjaxError(f"inter_chunk must be one of {INTER_CHUNK}, got {inter_chunk!r}")
    b, l, h, p, n = _validate(x, log_a, B, C, D, initial_state)
    which, auto_chunk = auto_choice(jax.default_backend(), l) if impl == "auto" else (impl, DEFAULT_CHUNK)
    if chunk_size is None:
        chunk_size = effective_chunk(l, auto_chunk)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
                or chunk_size & (chunk_size - 1):
            raise MarjaxError(f"chunk_size must be a positive power of two, got {chunk_size!r}")
        if impl in ("chunked", "chunk_scan", "hybrid", "pallas", "auto") and chunk_size > _next_pow2(l):
            raise MarjaxError(
                f"chunk_size={chunk_size} is larger than the sequence (length {l}, at most {_next_pow2(l)} "
                f"after rounding up to a power of two); use chunk_size=effective_chunk({l}, {chunk_size}) "
                f"= {effective_chunk(l, chunk_size)}")

    return _ssd_jit(x, log_a, B, C, D, initial_state, which, chunk_size, inter_chunk, return_final_state)


# Validated above, run here: jitted with the choices static, so an eager call (a notebook) compiles
# once per shape instead of once per call (each call's fresh scan jaxpr misses JAX's primitive
# cache). inline=True: under an outer trace the jaxpr is inlined, the jitted program is unchanged.
@partial(jax.jit, static_argnums=(6, 7, 8, 9), inline=True)
def _ssd_jit(x, log_a, B, C, D, initial_state, which: str, chunk_size: int, inter_chunk: str,
             return_final_state: bool):
    b, _, h, p = x.shape
    n = B.shape[-1]
    h0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    y, final = IMPL_FNS[which](x, log_a, B, C, h0, chunk_size, inter_chunk)
    if D is not None:
        y = y + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, final) if return_final_state else y


def ssd_step(state: Float[Array, "b h p n"], x_t: Float[Array, "b h p"], log_a_t: Float[Array, "b h"],
             B_t: Float[Array, "b h n"], C_t: Float[Array, "b h n"], D: Optional[Float[Array, "h"]] = None):
    """One decode step of the recurrence -> (y_t (b, h, p) in x_t's dtype, new_state float32).

    Iterating it over a sequence equals `ssd(..., return_final_state=True)`."""
    if len(jnp.shape(state)) != 4:
        raise MarjaxError(f"state must have shape (batch, heads, head_dim, state), got {tuple(jnp.shape(state))}")
    b, h, p, n = jnp.shape(state)
    for name, a, want in (("x_t", x_t, (b, h, p)), ("log_a_t", log_a_t, (b, h)), ("B_t", B_t, (b, h, n)),
                          ("C_t", C_t, (b, h, n))):
        if tuple(jnp.shape(a)) != want:
            raise MarjaxError(f"{name} must have shape {want} to match state {(b, h, p, n)}, "
                              f"got {tuple(jnp.shape(a))}")
        _check_float(name, a)
    _check_float("state", state)
    if D is not None and tuple(jnp.shape(D)) != (h,):
        raise MarjaxError(f"D must have shape (heads,) = {(h,)}, got {tuple(jnp.shape(D))}")
    y, new = _reference_step(state, x_t, log_a_t, B_t, C_t)
    if D is not None:
        y = y + D.astype(jnp.float32)[:, None] * x_t.astype(jnp.float32)
    return y.astype(x_t.dtype), new


def materialize_mixer(log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
                      C: Float[Array, "b l h n"]) -> Float[Array, "b h l l"]:
    """The per-head (l x l) mixing matrix, float32: M[t, s] = C_t . B_s exp(sum_{s<r<=t} log_a_r)
    for s <= t, else 0. Then ssd(x, ...) == einsum("bhts,bshp->bthp", M, x) (+ D x)."""
    if len(jnp.shape(log_a)) != 3:
        raise MarjaxError(f"log_a must have shape (batch, length, heads), got {tuple(jnp.shape(log_a))}")
    b, l, h = jnp.shape(log_a)
    if len(jnp.shape(B)) != 4 or tuple(jnp.shape(B))[:3] != (b, l, h) or jnp.shape(C) != jnp.shape(B):
        raise MarjaxError(f"B and C must both have shape (batch, length, heads, state) with (b, l, h) = "
                          f"{(b, l, h)} from log_a, got B {tuple(jnp.shape(B))} and C {tuple(jnp.shape(C))}")
    for name, a in (("log_a", log_a), ("B", B), ("C", C)):
        _check_float(name, a)
    f32 = jnp.float32
    decay = jnp.exp(segsum(jnp.moveaxis(log_a.astype(f32), 1, 2)))            # (b, h, l, l)
    return jnp.einsum("bthn,bshn->bhts", C.astype(f32), B.astype(f32)) * decay
