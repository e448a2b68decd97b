"""The align stage's train step at the default pipeline's shapes: the current loss (teacher block
outputs read off the teacher's forward; one block run again) against the one before it (every
teacher block run a second time, vmapped over the layers, on a stacked copy of the teacher),
alternated in one process.

    python experiments/bench/align_step_probe.py [--repeats 5] [--json FILE]

Both steps are the trainer's (marjax.train.step, AdamW, state donated) with the pipeline's
mixer-only trainable mask and teacher layout; they differ only in the loss function. Prints the
median (min) step time of each and their ratio, and the two first losses.
"""
from __future__ import annotations

if __name__ == "__main__":   # before jax loads: the `marjax` commands' heap (marjax.app.hostmem)
    from marjax.app.hostmem import reexec_for_hugepages
    reexec_for_hugepages()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from marjax.app.bench_step import _batch, train_step_runner  # noqa: E402
from marjax.app.benchkit import header_line, machine_info  # noqa: E402
from marjax.app.pipeline import PIPELINES  # noqa: E402
from marjax.api import load  # noqa: E402
from marjax.distill import losses  # noqa: E402
from marjax.distill import stages  # noqa: E402
from marjax.distill.init import init_from_attention  # noqa: E402
from marjax.models.lm import block, forward, stack_layers  # noqa: E402


def before_align_loss(teacher_cfg, student_cfg, distill_cfg):
    """The align loss as it was (git show 19f11af:marjax/distill/stages.py)."""
    def loss_fn(student, teacher, batch, rng):
        teacher = stack_layers(jax.lax.stop_gradient(teacher))
        student = stack_layers(student)
        ids = batch["inputs"]
        pos = stages._positions(ids)
        _, aux = forward(teacher, ids, teacher_cfg, taps=("prenorm",), head=False)
        x_in = aux["prenorm"][:, 0]
        y_t = jax.vmap(lambda p, x: block(p, x, teacher_cfg, pos)[0])(teacher.blocks, x_in)
        y_s = jax.vmap(lambda p, x: block(p, x, student_cfg, pos)[0])(student.blocks, x_in)
        s, c = losses.hidden_alignment_loss(y_s, y_t, batch["mask"])
        return s, c, {"align": (s, c)}
    return loss_fn


def runner(which: str, t_cfg, t_params, s_cfg, s_params, batch, pc):
    distill = dataclasses.replace(pc.distill, trainable="mixer")
    loss_fn = None if which == "now" else before_align_loss(t_cfg, s_cfg, distill)   # None: the stage's own
    return train_step_runner("align", t_cfg, t_params, s_cfg, s_params, batch, pc.train, distill, loss_fn=loss_fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    pc = PIPELINES["smollm2"]
    base = load(pc.teacher)
    t_cfg, t_params = base.config, base.params
    s_cfg, s_params = init_from_attention(t_params, t_cfg)
    batch = _batch(pc.train, t_cfg.vocab_size)
    info = machine_info()
    print(header_line(info))
    runs, first, compile_s = {}, {}, {}
    for which in ("now", "before"):
        run, secs, _, _ = runner(which, t_cfg, t_params, s_cfg, s_params, batch, pc)
        first[which] = float(run())
        runs[which], compile_s[which] = run, secs
    times = {k: [] for k in runs}
    for _ in range(a.repeats):
        for which, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[which].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| align step | median s (min) | compile s | first loss |\n|---|---|---|---|")
    for k in runs:
        print(f"| {k} | {med[k]:.3f} ({min(times[k]):.3f}) | {compile_s[k]:.1f} | {first[k]:.6f} |")
    print(f"now / before: median {med['now'] / med['before']:.3f}, "
          f"min {min(times['now']) / min(times['before']):.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "times_s": times, "compile_s": compile_s, "first_loss": first,
                       "now_over_before_median": med["now"] / med["before"]}, f, indent=1)


if __name__ == "__main__":
    main()
