"""Fully parallel SSD: lax.associative_scan over per-token affine maps h -> exp(log_a_t) h + x_t B_t^T.

Log depth and no matmuls, but it materialises one (p, n) state per token: memory b*l*h*p*n floats
(several times over, with the backward). That is N times the memory of the inputs, so it is meant
for small states only (tiny models, tests, a second oracle); `auto` never picks it. A guard
refuses inputs whose per-token state tensor would exceed MAX_STATE_BYTES; use impl="chunked"
(whose inter_chunk="associative" option runs the same scan over chunk-level states instead).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from marjax.errors import MarjaxError
from marjax.ssm.chunked import _combine

MAX_STATE_BYTES = 512 * 2**20


def state_bytes(b: int, l: int, h: int, p: int, n: int) -> int:
    """Bytes of the float32 per-token state tensor this implementation builds."""
    return 4 * b * l * h * p * n


def ssd_associative(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
                    C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"], chunk_size: Optional[int] = None,
                    inter_chunk: str = "scan"):
    """-> (y float32 (b, l, h, p), final state float32 (b, h, p, n)). chunk_size and inter_chunk
    are unused (the impl signature of `marjax.ssm.ssd`)."""
    f32 = jnp.float32
    b, l, h, p = x.shape
    n = B.shape[-1]
    need = state_bytes(b, l, h, p, n)
    if need > MAX_STATE_BYTES:
        raise MarjaxError(
            f"impl='associative' would materialise per-token states of shape (b={b}, l={l}, h={h}, p={p}, "
            f"n={n}) = {need / 2**20:.0f} MiB (limit {MAX_STATE_BYTES / 2**20:.0f} MiB); use impl='chunked'")
    log_a = log_a.astype(f32)
    u = x.astype(f32)[..., :, None] * B.astype(f32)[..., None, :]    # (b, l, h, p, n)
    u = u.at[:, 0].add(jnp.exp(log_a[:, 0])[..., None, None] * h0.astype(f32))
    _, states = lax.associative_scan(_combine, (log_a, u), axis=1)
    y = jnp.einsum("blhpn,blhn->blhp", states, C.astype(f32))
    return y, states[:, -1]
