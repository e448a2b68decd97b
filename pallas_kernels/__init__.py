"""Pallas kernels with custom_vjp (interpret mode on CPU, Triton lowering on GPU)."""
from pallas_kernels.ssd import ssd_pallas

__all__ = ["ssd_pallas"]
