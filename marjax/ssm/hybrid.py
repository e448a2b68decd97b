"""The "hybrid" SSD: the token scan when only values are needed, the chunked form (values and
vjp) when differentiated, joined by a custom_vjp.

Why (a 2-core CPU, b2 h8 p64 n64; experiments/bench/RESULTS.md): the token scan's forward is
cheap there, but its backward stores one (p, n) state per token and runs several times slower
than the chunked form's, with several times the memory. Reverse mode only: jax.jvp of it raises;
use impl="chunked" for forward mode.
"""
from __future__ import annotations

import functools

from jax import custom_vjp, vjp
from jaxtyping import Array, Float

from marjax.ssm.chunked import ssd_chunked
from marjax.ssm.reference import ssd_reference


@functools.partial(custom_vjp, nondiff_argnums=(5, 6))
def ssd_hybrid(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
               C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"], chunk_size: int, inter_chunk: str = "scan"):
    """-> (y float32 (b, l, h, p), final state float32 (b, h, p, n))."""
    return ssd_reference(x, log_a, B, C, h0)


def _fwd(x, log_a, B, C, h0, chunk_size, inter_chunk):
    # the vjp closure (a Partial pytree of the chunked form's residuals) is the residual
    return vjp(lambda *a: ssd_chunked(*a, chunk_size, inter_chunk), x, log_a, B, C, h0)


def _bwd(chunk_size, inter_chunk, vjp_fn, cts):
    return vjp_fn(cts)


ssd_hybrid.defvjp(_fwd, _bwd)
