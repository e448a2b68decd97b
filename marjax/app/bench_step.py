"""`marjax bench step`: what a distillation train step costs next to the work it must do.

At the pipeline's shapes (marjax.app.pipeline.PIPELINES: seq_len 64, micro_batch 4 for
"smollm2"; `--model tiny` for the tiny preset) three jitted programs run side by side:

  teacher fwd         the teacher's forward to logits (b, l, v) on the step's tokens;
  student fwd+bwd     the gradient of the student's next-token cross-entropy (its forward, head
                      and backward; no teacher, no optimizer);
  step                the real train step (marjax.train.step.make_train_step with the stage loss
                      of marjax.distill.stages.make_loss and the trainer's AdamW, state donated),
                      stage kd (attention teacher -> dense SSM) and sbds (dense SSM -> spiking).

The figure is step / (teacher fwd + student fwd+bwd): 1.0 means the step costs exactly its two
parts; above 1 is the price of the stage loss (the KL over both heads' logits, the feature
taps, the firing-rate term) and the optimizer. Achieved GFLOP/s are the analytic FLOP counts of
marjax.app.plan (XLA's cost analysis counts a lax.scan body once, so it under-counts the layer
scan) over the time, as a fraction of the float32 matmul peak: every round of the interleaved
timings also runs `benchkit.PeakProbe` ((1024 x 1024) products for a second, the fastest one
counting: the first products after a program can run at half the rate), each program's rate in
a round is divided by that round's peak, and the table gives the median over rounds (in
brackets, and as "peak_fraction" in the JSON: the median time over the highest peak measured
anywhere in the run, before, after or in a round; the conservative figure).
`--layer-layout` trains in the other layer layout (marjax.train.layout): all three programs then
run on unrolled layers.
Compile time (lower + compile) is reported apart. A last table times the optimizer alone: one
update of the kd student with the trainer's fused AdamW against the optax chain it replaces
(marjax.train.optim.make_optimizer impl "fused" / "optax"), interleaved. The student's starting
weights are the attention -> SSM init (kd) and its ATMN version with thresholds calibrated on one
batch (sbds); the tokens are random ids (the work does not depend on them).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from marjax.api import load
from marjax.app.benchkit import (PeakProbe, compile_timed, format_ratio, header_line, interleaved, machine_info,
                                matmul_peak_gflops, write_json)
from marjax.app.pipeline import PIPELINES
from marjax.app.plan import analytic_flops_per_token
from marjax.app.runner import pretrain_loss
from marjax.config import ModelConfig, TrainConfig
from marjax.distill.init import init_from_attention
from marjax.distill.stages import make_loss, trainable_mask
from marjax.errors import ConfigError
from marjax.models.lm import forward
from marjax.models.spiking import make_spiking_student
from marjax.train.mesh import make_mesh, replicated, shard_params
from marjax.train.layout import LAYER_LAYOUTS, TEACHER_LAYOUTS, RunLayout, teacher_layout_on
from marjax.train.optim import OPTIMIZER_IMPLS, accum_steps, make_optimizer, param_bound
from marjax.train.state import init_state
from marjax.train.step import make_step_shardings, make_train_step

__all__ = ["main", "stage_models", "step_bench", "optimizer_bench", "pipeline_stage", "flat_batch",
           "train_step_runner"]

STAGES = ("kd", "sbds")


def stage_models(stage: str, teacher_cfg: ModelConfig, teacher_params, atmn, calib_ids):
    """(teacher cfg, teacher params, student cfg, student params) of a stage's step: kd trains
    the attention -> SSM init against the attention model; sbds its spiking version against it."""
    dense_cfg, dense = init_from_attention(teacher_params, teacher_cfg)
    if stage == "kd":
        return teacher_cfg, teacher_params, dense_cfg, dense
    if stage == "sbds":
        spk_cfg, spk = make_spiking_student(dense, dense_cfg, atmn, calib_ids=calib_ids)
        return dense_cfg, dense, spk_cfg, spk
    raise ConfigError(f"bench step: stage must be one of {STAGES}, got {stage!r}")


def _batch(train_cfg: TrainConfig, vocab: int, seed: int = 0) -> dict:
    """(accum, micro_batch, seq_len) inputs/targets/mask of random ids (host numpy, like the loop's)."""
    n = accum_steps(train_cfg)
    shape = (n, train_cfg.micro_batch, train_cfg.seq_len + 1)
    ids = np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)
    return {"inputs": ids[..., :-1], "targets": ids[..., 1:],
            "mask": np.ones((n, train_cfg.micro_batch, train_cfg.seq_len), np.float32)}


def flat_batch(batch: dict) -> dict:
    """(accum, micro_batch, ...) leaves -> one (accum * micro_batch, ...) batch on the device."""
    return {k: jnp.asarray(v.reshape((-1,) + v.shape[2:])) for k, v in batch.items()}


def pipeline_stage(stage: str, model: str = "smollm2"):
    """(pipeline config, teacher cfg, teacher params, student cfg, student params, batch) of a
    stage at the pipeline's shapes, as `step_bench` builds them (for the probes beside it)."""
    pc = PIPELINES[model]
    base = load(pc.teacher)
    batch = _batch(pc.train, base.config.vocab_size)
    return (pc, *stage_models(stage, base.config, base.params, pc.atmn, batch["inputs"][0]), batch)


def _baseline_flops(terms: dict, t_cfg: ModelConfig, s_cfg: ModelConfig) -> dict:
    """Per-token FLOPs of the two baselines from plan's terms: teacher layers + its head once;
    student layers fwd+bwd + its head fwd+bwd (6 d V, no recompute in a plain CE gradient)."""
    return {"teacher_fwd": terms["teacher fwd (layers)"] + 2 * t_cfg.d_model * t_cfg.vocab_size,
            "student_fwd_bwd": terms["student fwd+bwd (layers)"] + 6 * s_cfg.d_model * s_cfg.vocab_size}


def train_step_runner(stage: str, t_cfg: ModelConfig, t_params, s_cfg: ModelConfig, s_params, batch: dict,
                      train_cfg: TrainConfig, distill_cfg, loss_fn=None):
    """The real train step of `stage` as the trainer builds it, in train_cfg.layer_layout:
    (run, compile seconds, student params, placed teacher params). run() applies one step to the
    donated state and returns the loss; the student and teacher come back in the step's layout (for
    the baselines timed beside it). `run.compiled` is the compiled step (its HLO, for the probes).
    `loss_fn` (default: the stage's `make_loss`) replaces the loss, for probes that time another."""
    mesh = make_mesh(train_cfg.mesh)
    mask = trainable_mask(s_params, distill_cfg.trainable)
    s_params, mask, t_params = RunLayout(train_cfg.layer_layout, mesh, None, train_cfg.teacher_layout).inputs(
        s_params, mask, t_params)
    tx = make_optimizer(train_cfg, s_params, mask)
    state = init_state(shard_params(s_params, mesh, copy=True), tx, train_cfg.seed, mesh)
    teacher = shard_params(t_params, mesh)
    sh = make_step_shardings(state, teacher, batch, mesh)
    loss_fn = make_loss(stage, t_cfg, s_cfg, distill_cfg) if loss_fn is None else loss_fn
    step = make_train_step(loss_fn, tx, mesh, sh, accum_steps(train_cfg),
                           trainable=mask, compute_dtype=train_cfg.compute_dtype,
                           param_bound=param_bound(train_cfg), max_skips=0)   # gated as marjax.train.loop runs it
    dev_batch = jax.device_put(batch, sh.batch)
    streak = jax.device_put(np.int32(0), replicated(mesh))
    compiled, secs = compile_timed(step, state, teacher, dev_batch, streak)
    holder = {"state": state}

    def run():
        holder["state"], out = compiled(holder["state"], teacher, dev_batch, streak)   # the state is donated
        return out["loss"]
    run.compiled = compiled
    return run, secs, s_params, teacher


def step_bench(stage: str, teacher_cfg: ModelConfig, teacher_params, train_cfg: TrainConfig, distill_cfg, atmn,
               repeats: int = 3) -> dict:
    """Times of teacher fwd, student fwd+bwd and the real step of `stage` (module doc), their
    compile seconds, the ratio and the analytic FLOPs; one record."""
    batch = _batch(train_cfg, teacher_cfg.vocab_size)
    t_cfg, t_params, s_cfg, s_params = stage_models(stage, teacher_cfg, teacher_params, atmn,
                                                    batch["inputs"][0])
    flat = flat_batch(batch)   # the step's tokens, one batch

    run_step, comp_step, s_params, teacher = train_step_runner(stage, t_cfg, t_params, s_cfg, s_params, batch,
                                                               train_cfg, distill_cfg)
    ce = pretrain_loss(s_cfg)
    student_grad = jax.grad(lambda p, b: ce(p, None, b, None)[0])
    teacher_fwd = lambda p, ids: forward(p, ids, t_cfg)[0]  # noqa: E731
    c_teacher, comp_teacher = compile_timed(teacher_fwd, teacher, flat["inputs"])
    c_student, comp_student = compile_timed(student_grad, s_params, flat)

    probe = PeakProbe()
    t = interleaved({"teacher_fwd": lambda: c_teacher(teacher, flat["inputs"]),
                     "student_fwd_bwd": lambda: c_student(s_params, flat),
                     "step": run_step, "matmul_peak": probe}, repeats)
    round_peaks = probe.gflops[-repeats:]                      # after the warm-up round
    tokens = int(np.prod(batch["inputs"].shape))
    terms = analytic_flops_per_token(t_cfg, s_cfg, stage, train_cfg.seq_len, distill_cfg.kl_chunk)
    per_tok = dict(_baseline_flops(terms, t_cfg, s_cfg), step=terms["total"])
    rec = {"stage": stage, "teacher": t_cfg.name, "student": s_cfg.name, "seq_len": train_cfg.seq_len,
           "layer_layout": train_cfg.layer_layout,
           "teacher_layout": train_cfg.teacher_layout,
           "micro_batch": train_cfg.micro_batch, "accum_steps": accum_steps(train_cfg), "tokens": tokens,
           "repeats": repeats, "times": t, "compile_s": {"step": comp_step, "teacher_fwd": comp_teacher,
                                                         "student_fwd_bwd": comp_student},
           "analytic_flops_per_token": per_tok, "last_loss": float(jax.device_get(run_step()))}
    for how in ("median_s", "min_s", "cpu_s"):
        rec[f"step_over_parts_{how[:-2]}"] = t["step"][how] / (t["teacher_fwd"][how] + t["student_fwd_bwd"][how])
    rec["gflops"] = {k: per_tok[k] * tokens / t[k]["median_s"] / 1e9 for k in per_tok}
    # each round's rates over the peak measured in the same round (seconds apart), median of rounds:
    # this machine's speed drifts by up to 40% within minutes, which moves a peak taken only
    # before and after all rounds away from the rounds themselves
    rec["round_peaks_gflops"] = round_peaks
    rec["peak_fraction_by_round"] = {
        k: statistics.median(per_tok[k] * tokens / w / 1e9 / pk for w, pk in zip(t[k]["rounds_s"], round_peaks))
        for k in per_tok}
    return rec


def optimizer_bench(params, train_cfg: TrainConfig, mask, repeats: int = 3) -> dict:
    """One AdamW update + apply (params and state donated) of each make_optimizer impl on the
    same params and gradients, interleaved: {impl: times} and the fused / optax ratio."""
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
    fns, holders = {}, {}
    for impl in OPTIMIZER_IMPLS:
        tx = make_optimizer(train_cfg, params, mask, impl=impl)

        def apply(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return jax.tree.map(jnp.add, p, u), s
        fn = jax.jit(apply, donate_argnums=(0, 1))
        p0 = jax.tree.map(jnp.copy, params)
        holders[impl] = (p0, tx.init(p0))

        def run(impl=impl, fn=fn):
            holders[impl] = fn(*holders[impl], grads)
            return holders[impl][0]
        fns[impl] = run
    t = interleaved(fns, repeats)
    return {"params": int(sum(x.size for x in jax.tree.leaves(params))), "times": t,
            "fused_over_optax_median": t["fused"]["median_s"] / t["optax"]["median_s"],
            "fused_over_optax_min": t["fused"]["min_s"] / t["optax"]["min_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax bench step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(PIPELINES),
                    help="the pipeline whose teacher and train shapes to use")
    ap.add_argument("--stages", default="kd,sbds", help=f"comma-separated subset of {STAGES}")
    ap.add_argument("--seq-len", type=int, default=0, help="override the pipeline's seq_len")
    ap.add_argument("--micro-batch", type=int, default=0, help="override the pipeline's micro_batch")
    ap.add_argument("--layer-layout", default="", choices=("",) + LAYER_LAYOUTS,
                    help="the layout the step trains in (default: the pipeline's TrainConfig.layer_layout)")
    ap.add_argument("--teacher-layout", default="", choices=("",) + TEACHER_LAYOUTS,
                    help="the teacher's layout in the step (default: the pipeline's TrainConfig.teacher_layout)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ConfigError(f"--stages: unknown {bad}; choose from {STAGES}")
    if a.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {a.repeats}")
    pc = PIPELINES[a.model]
    train_cfg = pc.train
    if a.seq_len:
        train_cfg = dataclasses.replace(train_cfg, seq_len=a.seq_len)
    if a.micro_batch:
        train_cfg = dataclasses.replace(train_cfg, micro_batch=a.micro_batch)
    if a.layer_layout:
        train_cfg = dataclasses.replace(train_cfg, layer_layout=a.layer_layout)
    # resolved here ("auto" by this backend), so the header and the JSON name the layout that ran
    train_cfg = dataclasses.replace(train_cfg, teacher_layout=teacher_layout_on(a.teacher_layout or
                                                                                train_cfg.teacher_layout, None))
    train_cfg = dataclasses.replace(train_cfg,
                                    batch_tokens=train_cfg.seq_len * train_cfg.micro_batch * accum_steps(pc.train))
    info = machine_info()
    print(header_line(info))
    base = load(pc.teacher)
    print(f"# train step of the {a.model} pipeline: teacher {pc.teacher}, seq_len {train_cfg.seq_len}, micro_batch "
          f"{train_cfg.micro_batch}, accum {accum_steps(train_cfg)}, layer layout {train_cfg.layer_layout} (teacher {train_cfg.teacher_layout}); median (min) of {a.repeats} interleaved rounds; "
          "GFLOP/s from analytic FLOPs (marjax.app.plan) over the median time")
    print("# peak: each round also times matmul peak products for a second (the best one counts); a round's rates "
          "over its own peak, median of rounds (in brackets: over the highest peak of the whole run, before, after "
          "or in any round)")
    print("| stage | step / (teacher fwd + student fwd+bwd) | same, CPU time | step GFLOP/s / peak | "
          "teacher fwd / peak | student fwd+bwd / peak | round peaks GFLOP/s | compile s (step, teacher, student) |")
    print("|---|---|---|---|---|---|---|---|")
    out = dict(info, bench="step", model=a.model, teacher=pc.teacher, records=[])
    records = [step_bench(stage, base.config, base.params, train_cfg, pc.distill, pc.atmn, a.repeats) for stage in stages]
    # the bracketed fraction is over the highest peak measured anywhere in the run (before, after
    # and in every round): the machine's best, so it never flatters a step timed in a slow spell
    out["matmul_peak_gflops_start"] = info["matmul_peak_gflops"]
    out["matmul_peak_gflops_end"] = matmul_peak_gflops()
    peak = out["matmul_peak_gflops"] = max([out["matmul_peak_gflops_start"], out["matmul_peak_gflops_end"]]
                                           + [g for r in records for g in r["round_peaks_gflops"]])
    for r in records:
        stage = r["stage"]
        r["peak_fraction"] = {k: v / peak for k, v in r["gflops"].items()}
        out["records"].append(r)
        c = r["compile_s"]
        fr, fo = r["peak_fraction_by_round"], r["peak_fraction"]
        print(f"| {stage} | {r['step_over_parts_median']:.2f} ({r['step_over_parts_min']:.2f}) | "
              f"{r['step_over_parts_cpu']:.2f} | "
              + " | ".join(f"**{fr[k]:.3f}** ({fo[k]:.3f})" if k == "step" else f"{fr[k]:.3f} ({fo[k]:.3f})"
                           for k in ("step", "teacher_fwd", "student_fwd_bwd"))
              + f" | {min(r['round_peaks_gflops']):.0f}-{max(r['round_peaks_gflops']):.0f} | "
              f"{c['step']:.1f}, {c['teacher_fwd']:.1f}, {c['student_fwd_bwd']:.1f} |")
        sys.stdout.flush()
    # the optimizer on its own: the trainer's fused AdamW against the optax chain it replaces
    d_cfg, dense = init_from_attention(base.params, base.config)
    opt = out["optimizer"] = optimizer_bench(dense, train_cfg, trainable_mask(dense, pc.distill.trainable), a.repeats)
    print(f"\n| adamw update ({opt['params'] / 1e6:.3g}M params, the kd student) | fused / optax chain |\n|---|---|\n"
          f"| median (min) | {opt['fused_over_optax_median']:.2f} ({opt['fused_over_optax_min']:.2f}) |")
    write_json(a.json, out)
    return 0
