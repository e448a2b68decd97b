"""The "native" SSD: marjax's CPU kernel (marjax.kernels.cpu_kernels.ssd_scan, the recurrence with
each state held in cache) for values, the chunk scan (values and vjp) when differentiated, joined by
a custom_vjp. Other platforms (`lax.platform_dependent`: a program exported for TPU or GPU holds no
CPU custom call) and a CPU without the kernel run the chunk scan throughout.

Why: on an AVX2 CPU without AVX-512 (2-core Zen 3) the chunk scan's forward was only 0.9-1.2x the
plain token scan at (2, 4096, 8, 64, 64), its small batched products far from the matmul peak; the
kernel runs that forward about 3x faster than the token scan (experiments/bench/RESULTS.md,
"Twenty-third session"). Its backward would store a state per token, as the token scan's does,
so differentiation keeps the chunk scan. Values and gradients agree with the reference to float
rounding, not bit for bit with the chunk scan. Reverse mode only: jax.jvp of it raises.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from marjax.kernels import cpu_kernels
from marjax.ssm.chunked import ssd_chunk_scan
from marjax.ssm.hybrid import values_and_vjp


def _values(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
            C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"], chunk_size: int, inter_chunk: str = "scan"):
    """The kernel on the CPU, the chunk scan elsewhere and where the kernel is not built."""
    args = tuple(a.astype(jnp.float32) for a in (x, log_a, B, C, h0))
    chunk_scan = lambda *a: ssd_chunk_scan(*a, chunk_size)   # noqa: E731
    if not cpu_kernels.available():
        return chunk_scan(*args)
    return lax.platform_dependent(*args, cpu=cpu_kernels.ssd_scan, default=chunk_scan)


# -> (y float32 (b, l, h, p), final state float32 (b, h, p, n)); chunk_size is the chunk scan's
# (under differentiation, off the CPU); inter_chunk is unused
ssd_native = values_and_vjp(_values, ssd_chunk_scan)
