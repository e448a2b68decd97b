"""How fast this machine multiplies in float32, in bf16 with a bf16 result, and in bf16 with a
float32 result (`preferred_element_type`, what `marjax.nn.layers.dense` does for bf16 weights),
each jitted, best of 10 calls, in one process:

    python experiments/bench/bf16_matmul_probe.py

Square 2048 products, then the SmolLM2 train step's shapes (256 tokens: 576 -> 1536, 1536 ->
576, the 576 -> 49152 head). On CPUs with AMX (Sapphire Rapids and later) XLA:CPU runs the
bf16 x bf16 -> f32 product on the tile unit; the bf16-result product does not get there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from marjax.app.benchkit import device_name, matmul_gflops


def main() -> None:
    print(f"# backend {jax.default_backend()}, device {device_name()}; GFLOP/s, best of 10 calls; "
          "ratios to float32 from the same run")
    print("| shape (m, k, n) | float32 | bf16 -> bf16 | bf16 -> float32 | bf16 -> float32 over float32 |")
    print("|---|---|---|---|---|")
    for m, k, n in [(2048, 2048, 2048), (256, 576, 1536), (256, 1536, 576), (256, 576, 49152)]:
        f32 = matmul_gflops(m, k, n, jnp.float32)
        b16 = matmul_gflops(m, k, n, jnp.bfloat16)
        mixed = matmul_gflops(m, k, n, jnp.bfloat16, jnp.float32)
        print(f"| {m}, {k}, {n} | {f32:.0f} | {b16:.0f} | {mixed:.0f} | {mixed / f32:.1f}x |")


if __name__ == "__main__":
    main()
