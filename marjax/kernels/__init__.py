"""Native kernels that XLA cannot generate well itself, as FFI custom calls (cpu_kernels)."""
