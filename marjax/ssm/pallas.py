"""The Pallas SSD as an impl of `marjax.ssm.ssd`: the adapter to pallas_kernels.ssd.

The kernel is chosen when the computation is lowered: interpreted on CPU (slow; for tests),
Mosaic on TPU, Triton on CUDA/ROCm, so an export for another platform holds the native kernel.
"""
from __future__ import annotations

from jaxtyping import Array, Float


def ssd_pallas(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
               C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"], chunk_size: int, inter_chunk: str = "scan"):
    """-> (y float32 (b, l, h, p), final state float32 (b, h, p, n)). inter_chunk is unused: the
    kernels walk the chunks in order."""
    # imported here because Pallas (with its Mosaic and Triton lowerings) adds ~0.6 s to every
    # `import marjax`, and only this impl needs it
    from pallas_kernels.ssd import ssd_pallas as kernel
    return kernel(x, log_a, B, C, h0, chunk_size)
