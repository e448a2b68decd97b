"""Pallas SSD chunk-scan kernels (forward and backward) behind a jax.custom_vjp.

Per (batch, head) the kernels walk the chunks of the sequence in order, keeping the (p, n) state on
chip: per chunk they do the in-chunk matmuls (C B^T * L) x, add C h_prev scaled by the decay from
the chunk start, and update h. The forward also writes the state entering each chunk (l / Q of
them, linear memory) for the backward.

The backward of a linear recurrence is a reverse recurrence: the adjoint state g (dL/dh, (p, n))
runs from the last chunk to the first, g_prev_end = exp(total) g + sum_t exp(a_cs_t) dy_t C_t^T,
and per chunk
    dx = (C B^T * L)^T dy + w * (B g^T),        w_t = decay from t to the chunk end
    dB = (dy x^T * L)^T C + w * (x g),
    dC = (dy x^T * L) B + exp(a_cs) * (dy h_prev).
The log-decay gradient needs no kernel: with a_cs the global cumulative log decay,
dL/da_cs[k] = dy_k . y_k - x_k . dx_k, so d log_a = reverse-cumsum of that, plus <dh_T, h_T>.

Two drivers share the per-chunk math (`_fwd_chunk`, `_bwd_chunk`, all 2-D so both Mosaic and
Triton lower it):
  "loop": grid (b, h), one program walks all chunks in a fori_loop (Triton programs run in
          parallel, so the carried state must live inside one program). Every loaded tile is a
          power of two and dots need dims >= 16, so the Triton variant pads p and n.
  "grid": grid (b, h, chunks) with the chunk axis "arbitrary" (sequential on a TPU core) and the
          state in a VMEM scratch; blocks are (Q, p) / (p, n) tiles, whose last two dims are a
          multiple of 8 (Q) or the full dim, as Mosaic requires, and VMEM use does not grow with l.
Which kernel runs is decided when the computation is lowered, not from the host's default backend
(`lax.platform_dependent`): interpreted "loop" on CPU, Mosaic "grid" on TPU, Triton "loop" on
CUDA/ROCm. So `jax.export.export(f, platforms=["tpu"])` from a CPU host holds the Mosaic kernel.
"""
from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

__all__ = ["ssd_pallas", "kernel_chunk", "MODES"]

# How a kernel is run: "interpret" ("loop" driver, Pallas interpreter), "interpret_grid" (the TPU
# driver under the interpreter: checks the Mosaic kernel's logic on CPU), "mosaic" (TPU), "triton"
# (GPU). None: chosen at lowering time per platform.
Mode = Literal["interpret", "interpret_grid", "mosaic", "triton"]
MODES = ("interpret", "interpret_grid", "mosaic", "triton")
_PLATFORM_MODE = {"cpu": "interpret", "tpu": "mosaic", "cuda": "triton", "rocm": "triton"}

_SQ = pl.squeezed
# Tiling chunk: >= 16 (Triton dot dims) and <= 64 (keeps a program's (Q, Q) float32 tile at 16 KiB;
# not yet tuned on a GPU or TPU). All platforms tile alike, so the saved chunk states have one
# shape whichever kernel runs.
_MIN_CHUNK, _MAX_CHUNK = 16, 64


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def kernel_chunk(chunk_size: int) -> int:
    """Chunk length the kernels tile by (results do not depend on it)."""
    return max(_MIN_CHUNK, min(_next_pow2(chunk_size), _MAX_CHUNK))


def _precision():
    # Pallas dots ignore jax.default_matmul_precision unless told; follow it so that tests that ask
    # for "highest" get full float32 on GPU (the default there is TF32) and TPU (bf16 passes).
    val = str(jax.config.jax_default_matmul_precision or "").lower()
    return lax.Precision.HIGHEST if val in ("highest", "float32") else None


def _dot(a, b, precision, contract=(1, 0)):
    """a @ b contracting a's dim contract[0] with b's dim contract[1] (2-D, no explicit transposes)."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _chunk_terms(a_col, a_row, q):
    """From the chunk's cumulative log decays as a column (q, 1) and a row (1, q): the causal decay
    matrix L (q, q), the decay from each token to the chunk end (q, 1), from the chunk start to
    each token (q, 1), and the chunk's total decay (1, 1)."""
    idx = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    jdx = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    L = jnp.exp(jnp.where(idx >= jdx, a_col - a_row, -jnp.inf))
    last = lax.broadcasted_iota(jnp.int32, (1, q), 1) == q - 1
    a_end = jnp.sum(jnp.where(last, a_row, 0.0), axis=1, keepdims=True)   # a[q-1] without a gather
    return L, jnp.exp(a_end - a_col), jnp.exp(a_col), jnp.exp(a_end)


def _fwd_chunk(xc, bc, cc, a_col, a_row, h, q, precision):
    """One chunk: -> y (q, p), state at the chunk end (p, n)."""
    L, to_end, from_start, total = _chunk_terms(a_col, a_row, q)
    scores = _dot(cc, bc, precision, (1, 1)) * L                              # [t, s] = C_t . B_s L
    y = _dot(scores, xc, precision) + from_start * _dot(cc, h, precision, (1, 1))
    return y, total * h + _dot(xc * to_end, bc, precision, (0, 0))


def _bwd_chunk(xc, bc, cc, a_col, a_row, dyc, h_prev, g, q, precision):
    """One chunk backward: -> dx (q, p), dB (q, n), dC (q, n), adjoint state entering the chunk."""
    L, to_end, from_start, total = _chunk_terms(a_col, a_row, q)
    scores = _dot(cc, bc, precision, (1, 1)) * L                              # [t, s] = C_t . B_s L
    dyx = _dot(dyc, xc, precision, (1, 1)) * L                                # [t, s] = dy_t . x_s L
    dx = _dot(scores, dyc, precision, (0, 0)) + to_end * _dot(bc, g, precision, (1, 1))
    dB = _dot(dyx, cc, precision, (0, 0)) + to_end * _dot(xc, g, precision)
    dC = _dot(dyx, bc, precision) + from_start * _dot(dyc, h_prev, precision)
    return dx, dB, dC, total * g + _dot(dyc * from_start, cc, precision, (0, 0))


# ---- "loop" driver: grid (b, h), chunks walked inside the program ---------------------------------

def _loop_fwd_kernel(x_ref, b_ref, c_ref, a_ref, h0_ref, y_ref, hT_ref, st_ref, *, q, nc, precision):
    def body(ci, h):
        sl = pl.ds(pl.multiple_of(ci * q, q), q)
        a = a_ref[sl]
        st_ref[ci] = h
        y, h_new = _fwd_chunk(x_ref[sl, :], b_ref[sl, :], c_ref[sl, :], a[:, None], a[None, :], h, q, precision)
        y_ref[sl, :] = y
        return h_new

    hT_ref[...] = lax.fori_loop(0, nc, body, h0_ref[...])


def _loop_bwd_kernel(x_ref, b_ref, c_ref, a_ref, dy_ref, st_ref, dhT_ref, dx_ref, db_ref, dc_ref, dh0_ref,
                     *, q, nc, precision):
    def body(k, g):
        ci = nc - 1 - k
        sl = pl.ds(pl.multiple_of(ci * q, q), q)
        a = a_ref[sl]
        dx, dB, dC, g_prev = _bwd_chunk(x_ref[sl, :], b_ref[sl, :], c_ref[sl, :], a[:, None], a[None, :],
                                        dy_ref[sl, :], st_ref[ci], g, q, precision)
        dx_ref[sl, :], db_ref[sl, :], dc_ref[sl, :] = dx, dB, dC
        return g_prev

    dh0_ref[...] = lax.fori_loop(0, nc, body, dhT_ref[...])


def _bh_spec(rest):
    """BlockSpec selecting one (batch, head) slice of a (b, h, *rest) array."""
    zeros = (0,) * len(rest)
    return pl.BlockSpec((_SQ, _SQ) + tuple(rest), lambda i, j: (i, j) + zeros)


def _loop_call(kernel, ins, out_shapes, interpret):
    b, h = ins[0].shape[:2]
    kwargs = {} if interpret else {"compiler_params": pl_triton.CompilerParams(num_warps=4, num_stages=2)}
    return pl.pallas_call(
        kernel, grid=(b, h),
        in_specs=[_bh_spec(a.shape[2:]) for a in ins],
        out_specs=[_bh_spec(s[2:]) for s in out_shapes],
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        interpret=interpret, **kwargs)(*ins)


def _pad_last(t, size):
    return t if t.shape[-1] == size else jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, size - t.shape[-1])])


def _pad_pn(t, pp, nn):
    return jnp.pad(t, [(0, 0)] * (t.ndim - 2) + [(0, pp - t.shape[-2]), (0, nn - t.shape[-1])])


def _triton_dims(p, n):
    # power-of-two tiles >= 16 for Triton dots; zero padding of p and n adds nothing to y or h
    return max(16, _next_pow2(p)), max(16, _next_pow2(n))


def _loop_forward(interpret, q, x, B, C, a_cs, h0):
    b, h, l, p = x.shape
    n = B.shape[-1]
    pp, nn = (p, n) if interpret else _triton_dims(p, n)
    kern = functools.partial(_loop_fwd_kernel, q=q, nc=l // q, precision=_precision())
    y, hT, st = _loop_call(kern, [_pad_last(x, pp), _pad_last(B, nn), _pad_last(C, nn), a_cs, _pad_pn(h0, pp, nn)],
                           [(b, h, l, pp), (b, h, pp, nn), (b, h, l // q, pp, nn)], interpret)
    return y[..., :p], hT[..., :p, :n], st[..., :p, :n]


def _loop_backward(interpret, q, x, B, C, a_cs, dy, states, dhT):
    b, h, l, p = x.shape
    n = B.shape[-1]
    pp, nn = (p, n) if interpret else _triton_dims(p, n)
    kern = functools.partial(_loop_bwd_kernel, q=q, nc=l // q, precision=_precision())
    ins = [_pad_last(x, pp), _pad_last(B, nn), _pad_last(C, nn), a_cs, _pad_last(dy, pp), _pad_pn(states, pp, nn),
           _pad_pn(dhT, pp, nn)]
    dx, dB, dC, dh0 = _loop_call(kern, ins, [(b, h, l, pp), (b, h, l, nn), (b, h, l, nn), (b, h, pp, nn)],
                                 interpret)
    return dx[..., :p], dB[..., :n], dC[..., :n], dh0[..., :p, :n]


# ---- "grid" driver (TPU): grid (b, h, chunks), chunk axis sequential, state in VMEM scratch ------

def _grid_fwd_kernel(x_ref, b_ref, c_ref, acol_ref, arow_ref, h0_ref, y_ref, hT_ref, st_ref, h_scr, *, q,
                     precision):
    ci = pl.program_id(2)

    @pl.when(ci == 0)
    def _():
        h_scr[...] = h0_ref[...]

    h = h_scr[...]
    st_ref[...] = h
    y, h_new = _fwd_chunk(x_ref[...], b_ref[...], c_ref[...], acol_ref[...], arow_ref[...], h, q, precision)
    y_ref[...] = y
    h_scr[...] = h_new

    @pl.when(ci == pl.num_programs(2) - 1)
    def _():
        hT_ref[...] = h_new


def _grid_bwd_kernel(x_ref, b_ref, c_ref, acol_ref, arow_ref, dy_ref, st_ref, dhT_ref, dx_ref, db_ref, dc_ref,
                     dh0_ref, g_scr, *, q, precision):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        g_scr[...] = dhT_ref[...]

    dx, dB, dC, g_prev = _bwd_chunk(x_ref[...], b_ref[...], c_ref[...], acol_ref[...], arow_ref[...], dy_ref[...],
                                    st_ref[...], g_scr[...], q, precision)
    dx_ref[...], db_ref[...], dc_ref[...] = dx, dB, dC
    g_scr[...] = g_prev

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = g_prev


def _grid_specs(q, p, n, nc, reverse):
    """Per-array BlockSpecs of the grid driver; `reverse` walks the chunks from the last."""
    chunk = (lambda k: nc - 1 - k) if reverse else (lambda k: k)
    return {
        "tok_p": pl.BlockSpec((_SQ, _SQ, q, p), lambda i, j, k: (i, j, chunk(k), 0)),     # (b, h, l, p)
        "tok_n": pl.BlockSpec((_SQ, _SQ, q, n), lambda i, j, k: (i, j, chunk(k), 0)),     # (b, h, l, n)
        "a_col": pl.BlockSpec((_SQ, _SQ, q, 1), lambda i, j, k: (i, j, chunk(k), 0)),     # (b, h, l, 1)
        "a_row": pl.BlockSpec((_SQ, _SQ, _SQ, 1, q), lambda i, j, k: (i, j, chunk(k), 0, 0)),  # (b, h, nc, 1, q)
        "state": pl.BlockSpec((_SQ, _SQ, p, n), lambda i, j, k: (i, j, 0, 0)),            # (b, h, p, n)
        "chunk_state": pl.BlockSpec((_SQ, _SQ, _SQ, p, n), lambda i, j, k: (i, j, chunk(k), 0, 0)),
    }


def _grid_call(kernel, ins, in_kinds, outs, out_kinds, grid, specs, p, n, interpret):
    kwargs = {} if interpret else {"compiler_params": pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))}
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[specs[k] for k in in_kinds], out_specs=[specs[k] for k in out_kinds],
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in outs],
        scratch_shapes=[pltpu.VMEM((p, n), jnp.float32)],
        interpret=interpret, **kwargs)(*ins)


def _a_views(a_cs, q):
    b, h, l = a_cs.shape
    return a_cs[..., None], a_cs.reshape(b, h, l // q, 1, q)


def _grid_forward(interpret, q, x, B, C, a_cs, h0):
    b, h, l, p = x.shape
    n, nc = B.shape[-1], l // q
    kern = functools.partial(_grid_fwd_kernel, q=q, precision=_precision())
    return _grid_call(kern, [x, B, C, *_a_views(a_cs, q), h0], ["tok_p", "tok_n", "tok_n", "a_col", "a_row", "state"],
                      [(b, h, l, p), (b, h, p, n), (b, h, nc, p, n)], ["tok_p", "state", "chunk_state"],
                      (b, h, nc), _grid_specs(q, p, n, nc, False), p, n, interpret)


def _grid_backward(interpret, q, x, B, C, a_cs, dy, states, dhT):
    b, h, l, p = x.shape
    n, nc = B.shape[-1], l // q
    kern = functools.partial(_grid_bwd_kernel, q=q, precision=_precision())
    return _grid_call(kern, [x, B, C, *_a_views(a_cs, q), dy, states, dhT],
                      ["tok_p", "tok_n", "tok_n", "a_col", "a_row", "tok_p", "chunk_state", "state"],
                      [(b, h, l, p), (b, h, l, n), (b, h, l, n), (b, h, p, n)], ["tok_p", "tok_n", "tok_n", "state"],
                      (b, h, nc), _grid_specs(q, p, n, nc, True), p, n, interpret)


_FORWARD = {"interpret": functools.partial(_loop_forward, True), "triton": functools.partial(_loop_forward, False),
            "interpret_grid": functools.partial(_grid_forward, True), "mosaic": functools.partial(_grid_forward, False)}
_BACKWARD = {"interpret": functools.partial(_loop_backward, True), "triton": functools.partial(_loop_backward, False),
             "interpret_grid": functools.partial(_grid_backward, True),
             "mosaic": functools.partial(_grid_backward, False)}


def _dispatch(table, mode: Optional[str], q: int, *args):
    """Run table[mode]; mode None decides per platform at lowering time (all branches are traced,
    only the lowering platform's is lowered)."""
    if mode is not None:
        return table[mode](q, *args)
    branch = {m: functools.partial(table[m], q) for m in set(_PLATFORM_MODE.values())}
    return lax.platform_dependent(*args, **{plat: branch[m] for plat, m in _PLATFORM_MODE.items()})


def _to_kernel_layout(x, log_a, B, C, q):
    b, l, h, _ = x.shape
    a = log_a.reshape(b, l // q, q, h)
    a_cs = jnp.moveaxis(jnp.cumsum(a, axis=2).reshape(b, l, h), 2, 1)    # (b, h, l), restarts per chunk
    return jnp.moveaxis(x, 2, 1), jnp.moveaxis(B, 2, 1), jnp.moveaxis(C, 2, 1), a_cs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _core(x, log_a, B, C, h0, q, mode):
    """float32, l a multiple of q, layout (b, l, h, .) -> y (b, l, h, p), h_T (b, h, p, n)."""
    y, hT, _ = _dispatch(_FORWARD, mode, q, *_to_kernel_layout(x, log_a, B, C, q), h0)
    return jnp.moveaxis(y, 1, 2), hT


def _core_fwd(x, log_a, B, C, h0, q, mode):
    xk, Bk, Ck, a_cs = _to_kernel_layout(x, log_a, B, C, q)
    y, hT, states = _dispatch(_FORWARD, mode, q, xk, Bk, Ck, a_cs, h0)
    return (jnp.moveaxis(y, 1, 2), hT), (xk, Bk, Ck, a_cs, states, y, hT)


def _core_bwd(q, mode, res, cts):
    xk, Bk, Ck, a_cs, states, y, hT = res
    dy, dhT = cts
    dyk = jnp.moveaxis(dy, 2, 1)
    dx, dB, dC, dh0 = _dispatch(_BACKWARD, mode, q, xk, Bk, Ck, a_cs, dyk, states, dhT)
    # d/d a_cs[k] (global cumulative) = dy_k . y_k - x_k . dx_k; d log_a_r = sum_{k >= r} of it,
    # plus the final-state term, which every position shares.
    r = jnp.sum(dyk * y, -1) - jnp.sum(xk * dx, -1)                    # (b, h, l)
    dlog_a = jnp.cumsum(r[..., ::-1], -1)[..., ::-1] + jnp.sum(dhT * hT, (-2, -1))[..., None]
    mv = lambda t: jnp.moveaxis(t, 1, 2)
    return mv(dx), jnp.moveaxis(dlog_a, 1, 2), mv(dB), mv(dC), dh0


_core.defvjp(_core_fwd, _core_bwd)


def ssd_pallas(x, log_a, B, C, h0, chunk_size: int, mode: Optional[Mode] = None):
    """Same contract as marjax.ssm.chunked.ssd_chunked -> (y float32 (b, l, h, p), h_T float32).

    mode: None picks the kernel when the computation is lowered (interpreted on CPU, Mosaic on
    TPU, Triton on CUDA/ROCm); one of MODES forces it (tests: "triton"/"mosaic" lower from a CPU
    host, "interpret_grid" runs the TPU kernel's logic under the interpreter)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be None or one of {MODES}, got {mode!r}")
    f32 = jnp.float32
    l = x.shape[1]
    q = kernel_chunk(chunk_size)
    pad_l = (-l) % q     # zero x and zero log decay (decay 1) leave the state unchanged
    x = jnp.pad(x.astype(f32), ((0, 0), (0, pad_l), (0, 0), (0, 0)))
    log_a = jnp.pad(log_a.astype(f32), ((0, 0), (0, pad_l), (0, 0)))
    B = jnp.pad(B.astype(f32), ((0, 0), (0, pad_l), (0, 0), (0, 0)))
    C = jnp.pad(C.astype(f32), ((0, 0), (0, pad_l), (0, 0), (0, 0)))
    y, hT = _core(x, log_a, B, C, h0.astype(f32), q, mode)
    return y[:, :l], hT
