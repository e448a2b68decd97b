"""The one MAR stage recipe, shared by `marjax pipeline`, `marjax distill` and experiments/:
how each stage's student starts and trains. Everything a result depends on is a field here or in
the configs it carries, so a run records it and an experiment pins it.

    dense_cfg, dense = dense_student(teacher, rc, recipe)        # stage-1 start (MOHAWK init)
    spk_cfg, spk = spiking_student(dense_model, rc, recipe)      # stage-2 start (calibrated ATMN)
    tc = stage_train_config(base_train, "align", plan, recipe)   # per-stage steps and lr
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from marjax.app.runner import RunConfig, make_data
from marjax.config import TrainConfig
from marjax.distill.init import fit_mixer_scale, init_from_attention
from marjax.errors import ConfigError
from marjax.models.spiking import make_spiking_student

__all__ = ["Recipe", "StagePlan", "dense_student", "spiking_student", "stage_train_config", "calibration_ids"]


@dataclass(frozen=True)
class Recipe:
    # stage-1 init: decay bias -2 (initial decay exp(-softplus(-2)) = 0.88) and a one-shot
    # least-squares C scale per head; measurements in experiments/README.md, "Stage-1 init"
    decay_bias: float = -2.0
    fit_scale: bool = True
    fit_rows: int = 4                # sequences of the fit_mixer_scale batch (data seed offset 999)
    calib_rows: int = 4              # sequences of the ATMN calibration batch (data seed offset 1000)
    # learning-rate multipliers: align trains the mixers alone on a per-layer regression and takes
    # a 3x step; orient starts at the least-squares scale and a 3x step made it worse (0.59 -> 0.87)
    orient_lr: float = 1.0
    align_lr: float = 3.0
    kd_lr: float = 1.0
    sbds_lr: float = 1.0
    pretrain_lr: float = 1.0

    def lr_mult(self, stage: str) -> float:
        if stage not in ("pretrain", "orient", "align", "kd", "sbds"):
            raise ConfigError(f"unknown stage {stage!r}")
        return getattr(self, f"{stage}_lr")


@dataclass(frozen=True)
class StagePlan:
    """Steps of one stage (0 = skip: only `pretrain` may be skipped)."""
    steps: int = 0


def calibration_ids(rc: RunConfig, tokenizer, model_cfg, rows: int, seed_offset: int) -> np.ndarray:
    """`rows` sequences from the run's data at a data seed no training batch uses; the same on
    every process (the calibrated student must be identical across a multi-process job)."""
    batches = make_data(rc, tokenizer, model_cfg, seed_offset=seed_offset, all_processes_same=True)
    return np.asarray(next(iter(batches))["inputs"][:rows])


def dense_student(teacher, rc: RunConfig, recipe: Recipe = Recipe()):
    """(cfg, params) of the stage-1 student: attention -> SSM init, then (recipe.fit_scale) the
    one-shot least-squares scale of C on a calibration batch of the run's data."""
    student_cfg, student_params = init_from_attention(teacher.params, teacher.config, decay_bias=recipe.decay_bias)
    if recipe.fit_scale:
        ids = calibration_ids(rc, teacher.tokenizer, student_cfg, recipe.fit_rows, seed_offset=999)
        student_params = fit_mixer_scale(student_params, student_cfg, teacher.params, teacher.config, ids)
    return student_cfg, student_params


def spiking_student(dense, rc: RunConfig, recipe: Recipe = Recipe()):
    """(cfg, params) of the stage-2 student: ATMN sites on the dense SSM `dense` (a marjax Model),
    thresholds calibrated (rc.atmn.init == "stats") on a batch of the run's data."""
    ids = None
    if rc.atmn.init == "stats":
        ids = calibration_ids(rc, dense.tokenizer, dense.config, recipe.calib_rows, seed_offset=1000)
    return make_spiking_student(dense.params, dense.config, rc.atmn, calib_ids=ids)


def stage_train_config(base: TrainConfig, stage: str, steps: int, recipe: Recipe = Recipe()) -> TrainConfig:
    """The base TrainConfig with this stage's steps, lr multiplier, warmup (10%) and save cadence."""
    if steps < 1:
        raise ConfigError(f"stage {stage!r}: steps must be >= 1, got {steps}")
    return dataclasses.replace(base, steps=steps, lr=base.lr * recipe.lr_mult(stage), warmup=max(1, steps // 10),
                               save_every=max(steps // 2, 1))
