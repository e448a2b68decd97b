"""The student's forward+backward in the two layer layouts (TrainConfig.layer_layout), at the
SmolLM2 pipeline's shapes, interleaved in one process:

  stacked    LMParams.blocks with a leading L axis, the layers under lax.scan (the default);
  unrolled   a tuple of per-layer BlockParams (marjax.models.lm.unroll_layers), a Python loop;
  sliced     stacked params unstacked inside the program (a custom_vjp whose backward stacks the
             per-layer gradients): what a step would cost that kept the stacked state and only
             ran the loop. It shows why the trainer unrolls the state itself.

    python experiments/bench/step_layout_probe.py [kd|sbds] [repeats]

Prints compile seconds, median (min) seconds and each layout over stacked, and checks that the
gradients agree (relative L2 distance). The stage's student and batch are `marjax bench step`'s.
A second table times the whole train step of the stage (its distillation loss against the
teacher, the fused AdamW, the finite gate; marjax.train.step) with the state in each layout and
the teacher stacked or unrolled, as `marjax.train.loop.train` runs it for
TrainConfig.layer_layout and teacher_layout.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp

from marjax.app.bench_step import flat_batch, pipeline_stage, train_step_runner
from marjax.app.benchkit import compile_timed, header_line, interleaved, machine_info
from marjax.app.runner import pretrain_loss
from marjax.models.lm import stack_layers, unroll_layers


@jax.custom_vjp
def _unstack(x):
    return tuple(x[i] for i in range(x.shape[0]))


_unstack.defvjp(lambda x: (_unstack(x), None), lambda _, ct: (jnp.stack(ct),))


def sliced(params):
    """Stacked params -> the unrolled layout inside the program (gradients stacked back once)."""
    per_leaf = jax.tree.map(_unstack, params.blocks)
    n = jax.tree.leaves(params.blocks)[0].shape[0]
    layers = tuple(jax.tree.map(lambda t, i=i: t[i], per_leaf, is_leaf=lambda t: type(t) is tuple) for i in range(n))
    return dataclasses.replace(params, blocks=layers)


def main(stage: str = "kd", repeats: int = 5) -> None:
    info = machine_info()
    print(header_line(info))
    pc, t_cfg, t_params, s_cfg, s_params, batch = pipeline_stage(stage)
    flat = flat_batch(batch)
    ce = pretrain_loss(s_cfg)
    grad = jax.grad(lambda p, b: ce(p, None, b, None)[0])
    unrolled = unroll_layers(s_params)
    runs = {"stacked": (grad, s_params), "unrolled": (grad, unrolled),
            "sliced": (jax.grad(lambda p, b: ce(sliced(p), None, b, None)[0]), s_params)}
    fns, grads = {}, {}
    for name, (fn, p) in runs.items():
        compiled, secs = compile_timed(fn, p, flat)
        print(f"# {name}: compile {secs:.1f} s", flush=True)
        fns[name] = lambda c=compiled, p=p: c(p, flat)
        grads[name] = stack_layers(fns[name]())
    ref = jax.tree.leaves(grads["stacked"])
    norm = sum(float(jnp.sum(x ** 2)) for x in ref) ** 0.5
    t = interleaved(fns, repeats)
    print(f"# {stage} student forward+backward (cross-entropy), SmolLM2 pipeline shapes "
          f"({pc.train.micro_batch} x {pc.train.seq_len} tokens), median (min) of {repeats} interleaved rounds")
    print("| layout | seconds | over stacked | gradient rel. distance to stacked |\n|---|---|---|---|")
    for name in runs:
        d = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(grads[name]), ref)) ** 0.5 / norm
        print(f"| {name} | {t[name]['median_s']:.3f} ({t[name]['min_s']:.3f}) | "
              f"{t[name]['median_s'] / t['stacked']['median_s']:.2f} ({t[name]['min_s'] / t['stacked']['min_s']:.2f}) | "
              f"{d:.1e} |")

    steps = {}
    for layout, teacher in (("stacked", "stacked"), ("stacked", "unrolled"), ("unrolled", "unrolled")):
        name = f"{layout}, teacher {teacher}"
        run, secs, _, _ = train_step_runner(stage, t_cfg, t_params, s_cfg, s_params, batch,
                                            dataclasses.replace(pc.train, layer_layout=layout,
                                                                teacher_layout=teacher), pc.distill)
        print(f"# {name} step: compile {secs:.1f} s", flush=True)
        steps[name] = run
    t = interleaved(steps, repeats)
    base = "stacked, teacher stacked"
    print(f"# the {stage} train step (TrainConfig.layer_layout, teacher_layout), median (min) of {repeats} "
          "interleaved rounds; the loss after the same number of steps from the same state")
    print(f"| layout | seconds | over {base} | loss |\n|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {t[name]['median_s']:.3f} ({t[name]['min_s']:.3f}) | "
              f"{t[name]['median_s'] / t[base]['median_s']:.3f} ({t[name]['min_s'] / t[base]['min_s']:.3f}) | "
              f"{float(steps[name]()):.6f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kd", int(sys.argv[2]) if len(sys.argv) > 2 else 5)
