"""Pallas SSD chunk-scan kernels (forward and backward) behind a jax.custom_vjp.

One kernel instance per (batch, head) walks the chunks of its sequence in order, keeping the
(p, n) state in registers: per chunk it does the in-chunk matmuls (C B^T * L) x, adds C h_prev
scaled by the decay from the chunk start, and updates h. The forward also writes the state entering
each chunk (l / Q of them, linear memory) for the backward.

The backward of a linear recurrence is a reverse recurrence: the adjoint state g (dL/dh, (p, n))
runs from the last chunk to the first, g_prev_end = exp(total) g + sum_t exp(a_cs_t) dy_t C_t^T,
and per chunk
    dx = (C B^T * L)^T dy + w * (B g^T),        w_t = decay from t to the chunk end
    dB = (dy x^T * L)^T C + w * (x g),
    dC = (dy x^T * L) B + exp(a_cs) * (dy h_prev).
The log-decay gradient needs no kernel: with a_cs the global cumulative log decay,
dL/da_cs[k] = dy_k . y_k - x_k . dx_k, so d log_a = reverse-cumsum of that, plus <dh_T, h_T>.

On CPU the kernels run with interpret=True (slow; for tests). On GPU they compile through the
Triton lowering (explicit triton CompilerParams, since newer jax has no `backend=` argument and
may default to Mosaic GPU); there every loaded tile must have a power-of-two size and dots need
dims >= 16, so the wrapper pads p and n up to a power of two >= 16 and uses chunks of 16..64
tokens (the chunk size does not change the result, only the tiling).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["ssd_pallas", "kernel_chunk"]

_SQ = pl.squeezed if hasattr(pl, "squeezed") else None
_GPU_MAX_CHUNK = 64   # keeps the per-program (Q, Q) float32 tile at 16 KiB (not yet tuned on a GPU)


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def kernel_chunk(chunk_size: int, interpret: bool) -> int:
    """Chunk length the kernels tile by (results do not depend on it)."""
    if interpret:
        return chunk_size
    return max(16, min(chunk_size, _GPU_MAX_CHUNK))


def _precision():
    # Pallas dots ignore jax.default_matmul_precision unless told; follow it so that tests that ask
    # for "highest" get full float32 on GPU (the default there is TF32).
    val = str(jax.config.jax_default_matmul_precision or "").lower()
    return lax.Precision.HIGHEST if val in ("highest", "float32") else None


def _dot(a, b, precision):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _chunk_terms(a, q):
    """From the chunk's cumulative log decays a (q,): the causal decay matrix L (q, q), the decay
    from each token to the chunk end (q,), from the chunk start to each token (q,), and the total."""
    idx = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    jdx = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    L = jnp.exp(jnp.where(idx >= jdx, a[:, None] - a[None, :], -jnp.inf))
    last = lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1
    a_end = jnp.sum(jnp.where(last, a, 0.0))            # a[q-1] without a scalar gather
    return L, jnp.exp(a_end - a), jnp.exp(a), jnp.exp(a_end)


def _fwd_kernel(x_ref, b_ref, c_ref, a_ref, h0_ref, y_ref, hT_ref, st_ref, *, q, nc, precision):
    def body(ci, h):
        sl = pl.ds(pl.multiple_of(ci * q, q), q)
        xc, bc, cc, a = x_ref[sl, :], b_ref[sl, :], c_ref[sl, :], a_ref[sl]
        st_ref[ci] = h
        L, to_end, from_start, total = _chunk_terms(a, q)
        scores = _dot(cc, bc.T, precision) * L                       # (q, q)
        y_ref[sl, :] = _dot(scores, xc, precision) + from_start[:, None] * _dot(cc, h.T, precision)
        return total * h + _dot((xc * to_end[:, None]).T, bc, precision)

    hT_ref[...] = lax.fori_loop(0, nc, body, h0_ref[...].astype(jnp.float32))


def _bwd_kernel(x_ref, b_ref, c_ref, a_ref, dy_ref, st_ref, dhT_ref, dx_ref, db_ref, dc_ref, dh0_ref,
                *, q, nc, precision):
    def body(k, g):
        ci = nc - 1 - k
        sl = pl.ds(pl.multiple_of(ci * q, q), q)
        xc, bc, cc, a, dyc = x_ref[sl, :], b_ref[sl, :], c_ref[sl, :], a_ref[sl], dy_ref[sl, :]
        h_prev = st_ref[ci]
        L, to_end, from_start, total = _chunk_terms(a, q)
        scores = _dot(cc, bc.T, precision) * L                       # [t, s] = C_t . B_s L[t, s]
        dyx = _dot(dyc, xc.T, precision) * L                         # [t, s] = dy_t . x_s L[t, s]
        dx_ref[sl, :] = _dot(scores.T, dyc, precision) + to_end[:, None] * _dot(bc, g.T, precision)
        db_ref[sl, :] = _dot(dyx.T, cc, precision) + to_end[:, None] * _dot(xc, g, precision)
        dc_ref[sl, :] = _dot(dyx, bc, precision) + from_start[:, None] * _dot(dyc, h_prev, precision)
        return total * g + _dot((dyc * from_start[:, None]).T, cc, precision)

    dh0_ref[...] = lax.fori_loop(0, nc, body, dhT_ref[...].astype(jnp.float32))


def _specs(bh_shapes):
    """BlockSpecs selecting one (batch, head) slice of each (b, h, ...) array."""
    def spec(rest):
        zeros = (0,) * len(rest)
        return pl.BlockSpec((_SQ, _SQ) + tuple(rest), lambda i, j: (i, j) + zeros)
    return [spec(s) for s in bh_shapes]


def _call(kernel, ins, out_shapes, interpret):
    b, h = ins[0].shape[:2]
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        kwargs["compiler_params"] = pl_triton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        kernel, grid=(b, h),
        in_specs=_specs([a.shape[2:] for a in ins]),
        out_specs=_specs([s[2:] for s in out_shapes]),
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        interpret=interpret, **kwargs)(*ins)


def _forward(x, B, C, a_cs, h0, q, interpret):
    """Kernel layout (b, h, l, .): -> y (b, h, l, p), h_T (b, h, p, n), chunk-entry states."""
    b, h, l, p = x.shape
    n = B.shape[-1]
    nc = l // q
    kern = functools.partial(_fwd_kernel, q=q, nc=nc, precision=_precision())
    return _call(kern, [x, B, C, a_cs, h0], [(b, h, l, p), (b, h, p, n), (b, h, nc, p, n)], interpret)


def _to_kernel_layout(x, log_a, B, C, q):
    b, l, h, _ = x.shape
    a = log_a.reshape(b, l // q, q, h)
    a_cs = jnp.moveaxis(jnp.cumsum(a, axis=2).reshape(b, l, h), 2, 1)    # (b, h, l), restarts per chunk
    return jnp.moveaxis(x, 2, 1), jnp.moveaxis(B, 2, 1), jnp.moveaxis(C, 2, 1), a_cs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _core(x, log_a, B, C, h0, q, interpret):
    """float32, l a multiple of q, layout (b, l, h, .) -> y (b, l, h, p), h_T (b, h, p, n)."""
    y, hT, _ = _forward(*_to_kernel_layout(x, log_a, B, C, q), h0, q, interpret)
    return jnp.moveaxis(y, 1, 2), hT


def _core_fwd(x, log_a, B, C, h0, q, interpret):
    xk, Bk, Ck, a_cs = _to_kernel_layout(x, log_a, B, C, q)
    y, hT, states = _forward(xk, Bk, Ck, a_cs, h0, q, interpret)
    return (jnp.moveaxis(y, 1, 2), hT), (xk, Bk, Ck, a_cs, states, y, hT)


def _core_bwd(q, interpret, res, cts):
    xk, Bk, Ck, a_cs, states, y, hT = res
    dy, dhT = cts
    dyk = jnp.moveaxis(dy, 2, 1)
    b, h, l, p = xk.shape
    n = Bk.shape[-1]
    nc = l // q
    kern = functools.partial(_bwd_kernel, q=q, nc=nc, precision=_precision())
    dx, dB, dC, dh0 = _call(kern, [xk, Bk, Ck, a_cs, dyk, states, dhT],
                            [(b, h, l, p), (b, h, l, n), (b, h, l, n), (b, h, p, n)], interpret)
    # d/d a_cs[k] (global cumulative) = dy_k . y_k - x_k . dx_k; d log_a_r = sum_{k >= r} of it,
    # plus the final-state term, which every position shares.
    r = jnp.sum(dyk * y, -1) - jnp.sum(xk * dx, -1)                    # (b, h, l)
    dlog_a = jnp.cumsum(r[..., ::-1], -1)[..., ::-1] + jnp.sum(dhT * hT, (-2, -1))[..., None]
    mv = lambda t: jnp.moveaxis(t, 1, 2)
    return mv(dx), jnp.moveaxis(dlog_a, 1, 2), mv(dB), mv(dC), dh0


_core.defvjp(_core_fwd, _core_bwd)


def ssd_pallas(x, log_a, B, C, h0, chunk_size: int, interpret: bool | None = None):
    """Same contract as marjax.ssm.chunked.ssd_chunked -> (y float32 (b, l, h, p), h_T float32).

    interpret: None runs interpreted on CPU and compiled elsewhere; False forces the Triton path
    (lets a CPU test lower it for "cuda" to check the kernels against Triton's constraints)."""
    f32 = jnp.float32
    b, l, h, p = x.shape
    n = B.shape[-1]
    if interpret is None:
        interpret = _interpret()
    q = kernel_chunk(chunk_size, interpret)
    # power-of-two tiles (>= 16 for Triton dots); zero padding of p and n adds nothing to y or h
    pp, nn = (p, n) if interpret else (max(16, _next_pow2(p)), max(16, _next_pow2(n)))
    pad_l = (-l) % q
    x = jnp.pad(x.astype(f32), ((0, 0), (0, pad_l), (0, 0), (0, pp - p)))
    log_a = jnp.pad(log_a.astype(f32), ((0, 0), (0, pad_l), (0, 0)))
    B = jnp.pad(B.astype(f32), ((0, 0), (0, pad_l), (0, 0), (0, nn - n)))
    C = jnp.pad(C.astype(f32), ((0, 0), (0, pad_l), (0, 0), (0, nn - n)))
    h0 = jnp.pad(h0.astype(f32), ((0, 0), (0, 0), (0, pp - p), (0, nn - n)))
    y, hT = _core(x, log_a, B, C, h0, q, interpret)
    return y[:, :l, :, :p], hT[:, :, :p, :n]
