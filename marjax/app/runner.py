"""Run configs for distillation stages, and running one stage end to end.

A run config is a TOML file (or nothing: defaults) plus `section.key=value` overrides:

    [run]     teacher = "smollm2-135m-instruct"   student = "runs/kd"   data = "corpus.jsonl"
    [train]   steps = 100  seq_len = 128  micro_batch = 8  lr = 1e-3 ...   (TrainConfig)
    [distill] alpha = 0.2  beta = 0.7  feature = "prenorm" ...            (DistillConfig)
    [atmn]    T = 4  tau = 2.0 ...                                         (ATMNConfig)

Each stage writes its own directory; the next stage loads it by explicit path.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from marjax.api import Model, load
from marjax.app.hostmem import heap_kept
from marjax.config import ATMNConfig, DistillConfig, ModelConfig, TrainConfig
from marjax.distill.stages import make_loss, trainable_mask
from marjax.distill.teacher_cache import TeacherCache, is_teacher_cache
from marjax.errors import ConfigError, DataError, MarjaxError
from marjax.models.lm import forward
from marjax.train.data import load_documents, make_dataset
from marjax.train.checkpoint import load_on_mesh
from marjax.train.loop import train
from marjax.train.mesh import make_mesh
from marjax.train.memory import check_fits

__all__ = ["RunConfig", "RunSection", "load_config", "load_run_config", "apply_overrides", "apply_sections",
           "read_toml", "run_stage", "make_data", "pretrain_loss", "load_for_run"]


@dataclass(frozen=True)
class RunSection:
    teacher: str = "smollm2-135m-instruct"   # name or path of the teacher
    student: str = ""                        # path of the previous stage's output ("" = init)
    data: str = ""                           # training text/JSONL ("" = the embedded corpus)
    text_field: str = "text"
    loss_mask: str = "all"                   # all | assistant
    out: str = "runs/stage"
    resume: bool = False


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    atmn: ATMNConfig = field(default_factory=ATMNConfig)


def _coerce(template, value):
    """Parse an override string to the type of the field's current value."""
    if not isinstance(value, str):
        return value
    if isinstance(template, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {value!r}")
    if isinstance(template, int):
        return int(value)
    if isinstance(template, float):
        return float(value)
    if isinstance(template, tuple):
        return tuple(v for v in value.split(",") if v)
    return value


def _set(cfg, path: list, value):
    if not path:
        return value
    name = path[0]
    if not dataclasses.is_dataclass(cfg) or name not in {f.name for f in dataclasses.fields(cfg)}:
        known = [f.name for f in dataclasses.fields(cfg)] if dataclasses.is_dataclass(cfg) else []
        raise ConfigError(f"unknown config key {name!r}; known here: {known}")
    cur = getattr(cfg, name)
    if len(path) == 1:
        if isinstance(value, dict):
            for k, v in value.items():
                cur = _set(cur, [k], v)
            new = cur
        else:
            try:
                new = _coerce(cur, value)
            except ValueError as e:
                raise ConfigError(f"config key {name!r}: cannot parse {value!r} as {type(cur).__name__}") from e
    else:
        new = _set(cur, path[1:], value)
    return dataclasses.replace(cfg, **{name: new})


def apply_overrides(cfg, overrides):
    """`section.key=value` strings (e.g. train.steps=10, distill.alpha=0.5, train.mesh.data=2)."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form section.key=value")
        k, v = o.split("=", 1)
        cfg = _set(cfg, k.strip().split("."), v.strip())
    return cfg


def read_toml(path) -> dict:
    """A TOML file's tables; a missing file or invalid TOML is a ConfigError that names it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from e


def apply_sections(cfg, data: dict):
    """`cfg` (a frozen dataclass) updated from parsed TOML (sections = fields); unknown keys are
    errors that name the key."""
    for section, values in data.items():
        cfg = _set(cfg, [section], values)
    return cfg


def load_config(base, path: Optional[str] = None, overrides=()):
    """`base` (a frozen dataclass) updated from a TOML file (sections = fields) and then from
    `section.key=value` overrides; unknown keys are errors that name the key."""
    cfg = apply_sections(base, read_toml(path)) if path else base
    return apply_overrides(cfg, overrides)


def load_run_config(path: Optional[str] = None, overrides=(), base: Optional[RunConfig] = None) -> RunConfig:
    cfg = load_config(base or RunConfig(), path, overrides)
    cfg.distill.validate()
    cfg.atmn.validate()
    return cfg


def load_for_run(name_or_path: str, train_cfg: TrainConfig) -> Model:
    """The teacher, or a previous stage's student, for a run. When the run's mesh spans more than
    one device every param leaf is created directly in the sharding the train step uses (each
    device reads only its slices of the file or checkpoint: `load_on_mesh`), so the largest model
    a job can load is not bounded by one device; on one device, `marjax.load`."""
    mesh = make_mesh(train_cfg.mesh)
    if mesh.size == 1:
        return load(name_or_path)
    cfg, params, tok = load_on_mesh(name_or_path, mesh)
    return Model(config=cfg, params=params, tokenizer=tok, source=str(name_or_path))


def pretrain_loss(cfg: ModelConfig):
    """Plain next-token CE (to train a small teacher from scratch for the experiments)."""

    def loss_fn(student, teacher, batch, rng):
        lg, _ = forward(student, batch["inputs"], cfg)
        logp = jax.nn.log_softmax(lg, -1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        m = batch["mask"].astype(jnp.float32)
        s, n = jnp.sum(nll * m), jnp.sum(m)
        return s, n, {"ce": (s, n)}
    return loss_fn


def run_stage(stage: str, teacher_model, student_cfg: ModelConfig, student_params, rc: RunConfig,
              out_dir: str, *, data_iter=None, tokenizer=None, progress: bool = True, saves=None):
    """Train one stage; returns (student params, history). `teacher_model` is a marjax Model
    (for 'pretrain' it may be None: the student trains on the data alone). saves: a
    marjax.train.checkpoint.BackgroundSaves that takes the stage's last save (marjax.train.loop.train)."""
    if stage == "pretrain":
        loss_fn, teacher_params, teacher_cfg = pretrain_loss(student_cfg), None, None
        trainable = "all"
    else:
        if stage == "sbds" and is_teacher_cache(rc.run.data) and rc.distill.feature != "none":
            raise ConfigError(f"run.data={rc.run.data} is a teacher top-k cache, which holds no teacher feature "
                              f"taps, so distill.feature={rc.distill.feature!r} cannot be computed; set "
                              "distill.feature=none, or train against the teacher model")
        teacher_cfg, teacher_params = teacher_model.config, teacher_model.params
        loss_fn = make_loss(stage, teacher_cfg, student_cfg, rc.distill)
        trainable = {"orient": "mixer", "align": "mixer"}.get(stage, rc.distill.trainable)
    check_fits(student_cfg, teacher_cfg, rc.train, stage, rc.distill.kl_chunk)   # fail fast, before any work
    tok = tokenizer if tokenizer is not None else getattr(teacher_model, "tokenizer", None)
    if data_iter is None:
        data_iter = make_data(rc, tok, student_cfg)
    meta = {"stage": stage, "model_config": dataclasses.asdict(student_cfg),
            "tokenizer_source": rc.run.teacher, "run_config": json.loads(json.dumps(dataclasses.asdict(rc), default=str))}
    if teacher_cfg is not None and teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ConfigError(f"teacher/student vocab mismatch: {teacher_cfg.vocab_size} vs {student_cfg.vocab_size}")
    return train(loss_fn, student_params, teacher_params, data_iter, rc.train, out_dir,
                 trainable=trainable_mask(student_params, trainable), model_meta=meta,
                 resume=rc.run.resume, progress=progress, saves=saves,
                 async_save=not heap_kept())   # under the heap tunables an async save's copy fragments the heap


def make_data(rc: RunConfig, tokenizer, model_cfg: ModelConfig, *, seed_offset: int = 0,
              all_processes_same: bool = False):
    """The run's batches (this process's shard), or a teacher cache. all_processes_same: every
    process reads the same batches (calibration: the students built from them must agree)."""
    if is_teacher_cache(rc.run.data):
        cache = TeacherCache(rc.run.data)
        want = {"seq_len": rc.train.seq_len, "batch": rc.train.micro_batch, "vocab_size": model_cfg.vocab_size}
        got = {k: cache.index.get(k) for k in want}
        if got != want:
            raise DataError(f"teacher cache {rc.run.data} does not fit this run: cache {got}, run {want}")
        return cache
    if tokenizer is None:
        raise MarjaxError("no tokenizer: the teacher model has none; pass a model with a tokenizer")
    if rc.train.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len {rc.train.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    docs = load_documents(rc.run.data or None, text_field=rc.run.text_field)
    shard = dict(shard_index=0, shard_count=1) if all_processes_same else {}
    return make_dataset(docs, tokenizer, rc.train.seq_len, rc.train.micro_batch, rc.train.seed + seed_offset,
                        mask=rc.run.loss_mask, max_seq_len=model_cfg.max_seq_len, **shard)


