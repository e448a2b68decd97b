"""The native decode products alone (marjax.kernels.cpu_kernels, whichever build status() loads)
against XLA on the same weights, at SmolLM2-135M's one-token shapes, in one process:

    python experiments/bench/qgemv_probe.py [--repeats 300] [--json F]

For each product (q/k/v as one call, o, gate/up as one call, down, the tied head) and each weight
mode (int8, q4, bf16), the jitted kernel call, the same QWeight through XLA's dequantising matmul
(`impl="xla"`) and the float32 product are timed in interleaved rounds (median of `--repeats`);
printed as ratios to the float32 product of the same shape, measured side by side. Which build
ran (avx512 / avx2) is in the header.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from marjax.app.benchkit import device_name
from marjax.kernels import cpu_kernels
from marjax.models.quant import quantize_weight
from marjax.nn import layers

# (name, in, outs): one entry per kernel call of a SmolLM2 decode step (products sharing x together)
SHAPES = [("qkv", 576, (576, 192, 192)), ("o", 576, (576,)), ("gate+up", 576, (1536, 1536)), ("down", 1536, (576,)),
          ("head", 576, (49152,))]


def _median_s(fns: dict, x, repeats: int) -> dict:
    for f in fns.values():
        jax.block_until_ready(f(x))                       # compile
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--modes", default="int8,q4,bf16")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    st = cpu_kernels.status()
    if not st.available:
        raise SystemExit(f"the CPU kernels are unavailable here: {st.reason}")
    print(f"# backend {jax.default_backend()}, device {device_name()}, {cpu_kernels.cpu_model()}; "
          f"kernel build {st.isa}; median of {args.repeats} interleaved calls; time over the float32 product's")
    print("| product | mode | kernel / f32 | xla / f32 | kernel over xla (speed-up) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    rows = []
    for name, k, outs in SHAPES:
        w32 = [jnp.asarray(rng.normal(size=(k, o)) * 0.02, jnp.float32) for o in outs]
        x = jnp.asarray(rng.normal(size=(1, k)), jnp.float32)
        f32 = jax.jit(lambda x, w32=w32: layers.project(x, w32))
        for mode in args.modes.split(","):
            kern = [quantize_weight(w, -2, mode) for w in w32]
            xla = [quantize_weight(w, -2, mode, impl="xla") for w in w32]
            fns = {"f32": f32, "kernel": jax.jit(lambda x, ws=kern: layers.project(x, ws)),
                   "xla": jax.jit(lambda x, ws=xla: layers.project(x, ws))}
            t = _median_s(fns, x, args.repeats)
            row = {"product": name, "in": k, "outs": list(outs), "mode": mode, **{f"{n}_s": v for n, v in t.items()},
                   "kernel_over_f32": t["kernel"] / t["f32"], "xla_over_f32": t["xla"] / t["f32"]}
            rows.append(row)
            print(f"| {name} ({k} -> {'+'.join(map(str, outs))}) | {mode} | {row['kernel_over_f32']:.3f} | "
                  f"{row['xla_over_f32']:.3f} | {t['xla'] / t['kernel']:.2f}x |")
    out = {"backend": jax.default_backend(), "device": device_name(), "cpu": cpu_kernels.cpu_model(),
           "kernel_isa": st.isa, "repeats": args.repeats, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
