"""The "hybrid" SSD: the token scan when only values are needed, the chunked form (values and
vjp) when differentiated, joined by a custom_vjp (`values_and_vjp`, which the "native" impl
shares).

Why (a 2-core CPU, b2 h8 p64 n64; experiments/bench/RESULTS.md): the token scan's forward is
cheap there, but its backward stores one (p, n) state per token and runs several times slower
than the chunked form's, with several times the memory. Reverse mode only: jax.jvp of it raises;
use impl="chunked" for forward mode.
"""
from __future__ import annotations

import functools
from typing import Callable

from jax import custom_vjp, vjp

from marjax.ssm.chunked import ssd_chunked
from marjax.ssm.reference import ssd_reference


def values_and_vjp(values: Callable, differentiated: Callable) -> Callable:
    """An SSD impl `fn(x, log_a, B, C, h0, chunk_size, inter_chunk) -> (y, final state)` that returns
    `values(...)` when only values are needed and `differentiated(...)`'s values and vjp under
    reverse-mode differentiation (both with that signature)."""
    @functools.partial(custom_vjp, nondiff_argnums=(5, 6))
    def impl(x, log_a, B, C, h0, chunk_size: int, inter_chunk: str = "scan"):
        return values(x, log_a, B, C, h0, chunk_size, inter_chunk)

    def fwd(x, log_a, B, C, h0, chunk_size, inter_chunk):
        # the vjp closure (a Partial pytree of the differentiated form's residuals) is the residual
        return vjp(lambda *a: differentiated(*a, chunk_size, inter_chunk), x, log_a, B, C, h0)

    def bwd(chunk_size, inter_chunk, vjp_fn, cts):
        return vjp_fn(cts)

    impl.defvjp(fwd, bwd)
    return impl


# -> (y float32 (b, l, h, p), final state float32 (b, h, p, n))
ssd_hybrid = values_and_vjp(ssd_reference, ssd_chunked)
