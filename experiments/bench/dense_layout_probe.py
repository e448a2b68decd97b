"""The student's forward+backward with the weight products in two forms, interleaved in one
process, at the SmolLM2 pipeline's shapes:

  batched   x (b, l, d) @ w (d, f) as written (JAX transposes it into a weight gradient that
            contracts over b and l);
  flat      marjax.nn.layers.dense: x reshaped to (b l, d) first, one 2-D product.

    python experiments/bench/dense_layout_probe.py [kd|sbds] [stacked|unrolled] [repeats]

Prints compile seconds, median (min) seconds, flat over batched, and the relative L2 distance
between the two gradients (0 when XLA:CPU computes the same products in the same order). The
batched form is put back by replacing `dense` in the modules that call it, for this process.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from marjax.app.bench_step import flat_batch, pipeline_stage
from marjax.app.benchkit import compile_timed, header_line, interleaved, machine_info
from marjax.app.runner import pretrain_loss
from marjax.distill import losses
from marjax.models import lm
from marjax.nn import layers, mamba2

CALLERS = (layers, mamba2, lm, losses)   # the modules that call `dense` by name


def batched_dense(x, w, out_dtype=None):
    """The form before marjax.nn.layers.dense flattened its input (float32 weights only)."""
    if out_dtype is None:
        return x @ w
    return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=out_dtype)


def main(stage: str = "kd", layout: str = "stacked", repeats: int = 5) -> None:
    info = machine_info()
    print(header_line(info))
    _, _, _, s_cfg, params, batch = pipeline_stage(stage)
    if layout == "unrolled":
        params = lm.unroll_layers(params)
    tokens = flat_batch(batch)
    ce = pretrain_loss(s_cfg)
    flat_dense = layers.dense
    fns, grads = {}, {}
    for name, fn in (("batched", batched_dense), ("flat", flat_dense)):
        for mod in CALLERS:
            mod.dense = fn
        try:
            compiled, secs = compile_timed(jax.grad(lambda p, b: ce(p, None, b, None)[0]), params, tokens)
        finally:
            for mod in CALLERS:
                mod.dense = flat_dense
        print(f"# {name}: compile {secs:.1f} s", flush=True)
        fns[name] = lambda c=compiled: c(params, tokens)
        grads[name] = jax.tree.leaves(fns[name]())
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(grads["flat"], grads["batched"]))
    den = sum(float(jnp.sum(a ** 2)) for a in grads["batched"])
    t = interleaved(fns, repeats)
    print(f"# {stage} student forward+backward (cross-entropy), {layout} layers, SmolLM2 pipeline shapes; "
          f"median (min) of {repeats} interleaved rounds")
    print("| weight products | seconds | over batched |\n|---|---|---|")
    for name in fns:
        print(f"| {name} | {t[name]['median_s']:.3f} ({t[name]['min_s']:.3f}) | "
              f"{t[name]['median_s'] / t['batched']['median_s']:.2f} ({t[name]['min_s'] / t['batched']['min_s']:.2f}) |")
    print(f"gradient relative distance, flat vs batched: {(num / den) ** 0.5:.1e}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "kd", a[1] if len(a) > 1 else "stacked", int(a[2]) if len(a) > 2 else 5)
