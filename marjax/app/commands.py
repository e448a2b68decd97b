"""`marjax convert`, `marjax distill` and `marjax pipeline`."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import marjax
from marjax.app import pipeline
from marjax.app.cache import cache_teacher_topk
from marjax.app.recipe import Recipe, dense_student, spiking_student
from marjax.app.runner import load_for_run, load_run_config, run_stage
from marjax.distill.init import init_from_attention
from marjax.errors import ConfigError
from marjax.io.hf import save_hf

__all__ = ["convert_main", "distill_main", "pipeline_main"]


def convert_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax convert",
                                 description="Attention -> SSM init (MambaInLlama/MOHAWK); writes an HF-style SSM dir")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="attention teacher (name or path)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--decay-bias", type=float, default=Recipe().decay_bias,
                    help="initial A_log bias (decay exp(-softplus(b))); default: the pipeline recipe's")
    a = ap.parse_args(argv)
    m = marjax.load(a.model)
    student_cfg, sp = init_from_attention(m.params, m.config, decay_bias=a.decay_bias)
    save_hf(a.out, student_cfg, sp, m.tokenizer)
    ssm = student_cfg.ssm
    print(f"wrote {student_cfg.name} ({student_cfg.n_layers} layers, {ssm.n_heads} heads x {ssm.head_dim}, "
          f"state {ssm.state_dim}) to {a.out}")
    return 0


def _student_for(stage: str, rc, teacher):
    """Student (cfg, params) for a stage: the previous stage's output (explicit path), or the
    recipe's init for the stage when no student path is given."""
    if rc.run.student:
        sm = load_for_run(rc.run.student, rc.train)
        cfg = sm.config
        if stage == "sbds" and not cfg.is_spiking:
            return spiking_student(sm, rc, Recipe())
        if stage in ("orient", "align", "kd") and (not cfg.is_ssm or cfg.is_spiking):
            raise ConfigError(f"stage {stage!r} trains a dense SSM student; {rc.run.student} holds a "
                              f"{'spiking' if cfg.is_spiking else cfg.mixer} model")
        return cfg, sm.params
    if stage in ("orient", "align", "kd"):
        return dense_student(teacher, rc, Recipe())
    raise ConfigError("stage 'sbds' needs run.student=PATH (the dense SSM from stage 1)")


def distill_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax distill", description="Run one distillation stage")
    ap.add_argument("--stage", required=True, choices=["pretrain", "orient", "align", "kd", "sbds"])
    ap.add_argument("--config", default=None, help="TOML run config ([run], [train], [distill], [atmn])")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out")
    ap.add_argument("--cache-teacher", default="", metavar="DIR",
                    help="instead of training: write the teacher's top-k logits for the data to DIR")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=50 distill.alpha=0.5")
    a = ap.parse_args(argv)
    rc = load_run_config(a.config, a.overrides)
    if a.resume:
        rc = dataclasses.replace(rc, run=dataclasses.replace(rc.run, resume=True))
    teacher = load_for_run(rc.run.teacher, rc.train)
    if a.cache_teacher:
        cache_teacher_topk(teacher, rc, a.cache_teacher)
        return 0
    if a.stage == "pretrain":
        cfg, params = teacher.config, teacher.params
    else:
        cfg, params = _student_for(a.stage, rc, teacher)
    _, hist = run_stage(a.stage, teacher, cfg, params, rc, rc.run.out)
    last = hist[-1] if hist else {}
    print(f"stage {a.stage} done: {len(hist)} logged steps, last loss {last.get('loss', float('nan')):.4f}; "
          f"checkpoint in {Path(rc.run.out).resolve()}")
    return 0


def pipeline_main(argv=None) -> int:
    return pipeline.main(argv)
