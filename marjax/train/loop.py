"""The generic training loop: sharded student + teacher, accumulation, logging, checkpoints,
divergence stop and exact resume.

    params, history = train(loss_fn, student_params, teacher_params, data_iter, train_cfg, out_dir,
                            trainable=mask, model_meta={"stage": "kd", "model_config": asdict(cfg)})

- loss_fn(student, teacher, batch, rng) -> (loss_sum, count, {name: (sum, count)}); see
  marjax.train.step for the contract (the teacher forward must use stop_gradient(teacher)).
- data_iter yields micro-batches (dicts of arrays, leading dim = TrainConfig.micro_batch);
  each update consumes `accum_steps(train_cfg)` of them. An iterator with get_state()/set_state()
  (Grain DatasetIterator, marjax.train.data.PackedBatches) is checkpointed with the run and
  resume replays the exact data order. A plain Python iterator is not: on resume it continues
  from wherever it is (a fresh iterator restarts its data), which the loop warns about.
- out_dir/metrics.jsonl: one JSON record per log point: step, loss, each metric, lr,
  grad_norm, tokens, tokens_per_s, time (and eval_* from eval_fn at save points).
- TrainConfig.dispatch_ahead (default "auto": on for TPU and GPU, off on CPU): no host sync
  between updates: update s's results (loss, metrics, finite flag) are read after update s + 1
  is dispatched, so fetching and placing the next batch, logging and the progress bar overlap
  the device's work; a save reads its update's results at once. Off on CPU by default, where
  XLA:CPU allocates the queued update's temporaries while the running one still holds its own.
- Non-finite numbers (TrainConfig.nonfinite): a NaN/inf loss, gradient (or a gradient norm >=
  2**60, where Adam's moments could overflow), or updated param is never applied (decided inside
  the jitted step, before the update: marjax.train.step). "stop" (default) ends the
  run: the last good checkpoint stays the latest, and TrainingDiverged (a MarjaxError) names the
  step. "skip" drops that update (the batch is consumed, params and optimizer state are kept),
  logs {"step", "status": "skipped", "event": "nonfinite", ...} and goes on; TrainConfig.max_skips
  skips in a row stop the run; the step counts that streak on the device, so the update already
  queued behind the failure applies nothing (marjax.train.step, max_skips). Student params that are not finite at the start are refused, and
  every save re-checks the state, so no NaN/inf reaches a checkpoint.
- Crash safety: checkpoints are Orbax steps, finalised by an atomic rename, so a process killed
  mid-step or mid-save (async save in flight) resumes from the last complete step; metrics.jsonl
  is cut back to that step on resume (a torn last line is ignored). A failed save (disk full)
  raises CheckpointError and leaves the earlier checkpoints intact.
- Test hook (tests/reliability only): env MARJAX_TEST_PAUSE="step:N" makes the loop, once update
  N is dispatched, write out_dir/.marjax_test_paused and sleep (so a test can SIGKILL it there);
  "save:N" does the same inside the async save of step N (see marjax.train.checkpoint).
- The last update's checkpoint: with TrainConfig.final_opt_state=False it holds no optimizer state
  (a run nothing continues; resuming it is "finished", resuming it to more steps is refused);
  with `saves=` (marjax.train.checkpoint.BackgroundSaves, single-process) it is written in a
  background thread and train returns at once (marjax pipeline: the next stage starts meanwhile).
- TrainConfig.layer_layout "unrolled" trains the layers as a tuple (marjax.train.layout); the
  checkpoints, eval_fn and the returned params see them stacked, as in a "stacked" run.
  TrainConfig.teacher_layout sets an LMParams teacher's layout in the step ("auto": unrolled on CPU).
- resume=True restores params, optimizer state, step, rng and the data iterator state from the
  latest checkpoint, so 3 steps + resume 3 steps equals 6 straight steps bit for bit. Without
  resume, checkpoints already in out_dir are deleted (a fresh run owns its directory).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from marjax.config import TrainConfig
from marjax.errors import CheckpointError, ConfigError, DataError, MarjaxError
from marjax.train.checkpoint import PAUSE_ENV, PAUSE_MARKER, BackgroundSaves, Checkpointer, check_compatible, pause_target
from marjax.train.layout import RunLayout, check_layout, check_teacher_layout
from marjax.train.mesh import ShardingRules, make_mesh, replicated, shard_params
from marjax.train.optim import accum_steps as _accum_steps, lr_schedule, make_optimizer, param_bound
from marjax.train.state import init_state
from marjax.train.step import all_finite, make_step_shardings, make_train_step, stack_micro_batches
from tqdm.auto import tqdm

__all__ = ["train", "TrainingDiverged", "read_metrics", "nonfinite_leaves", "dispatch_ahead_on", "METRICS_FILE",
           "DISPATCH_AHEAD"]

DISPATCH_AHEAD = ("auto", "on", "off")

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(MarjaxError):
    """A step produced a non-finite loss, gradient or update. Attributes: step (the failing
    update, 1-based), last_good_step (the latest checkpoint, or None), out_dir, params (the last
    good params, in memory), history."""

    def __init__(self, step: int, last_good_step: Optional[int], out_dir: str, loss: float, grad_norm: float,
                 params=None, history=None, skipped: int = 0):
        self.step, self.last_good_step, self.out_dir = step, last_good_step, out_dir
        self.params, self.history = params, history
        where = (f"the last good checkpoint is step {last_good_step} in {out_dir} (resume=True continues from it)"
                 if last_good_step is not None else f"no checkpoint was saved in {out_dir}")
        why = f" after {skipped} skipped updates in a row (TrainConfig.max_skips)" if skipped else ""
        super().__init__(f"training diverged at step {step}{why}: loss {loss}, grad_norm {grad_norm} (loss, "
                         f"gradient or update not finite); nothing from that step was applied or saved; {where}. "
                         "Lower TrainConfig.lr or clip_norm, set TrainConfig.nonfinite='skip', or check the data")


def nonfinite_leaves(tree) -> list:
    """Key paths of the floating leaves of `tree` that hold a NaN or inf ([] when all finite;
    one device reduction, one host transfer)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flags = jax.device_get(jax.jit(lambda xs: [all_finite(x) for x in xs])([x for _, x in flat]))
    return [jax.tree_util.keystr(p) for (p, _), ok in zip(flat, flags) if not ok]


def read_metrics(out_dir) -> list:
    """The records of out_dir/metrics.jsonl. A torn last line (a process killed mid-write) is
    dropped; a bad line elsewhere is a DataError naming the file and line."""
    p = Path(out_dir) / METRICS_FILE
    if not p.is_file():
        return []
    lines = p.read_bytes().decode("utf-8", errors="replace").split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            if n == len(lines):            # no trailing newline: the write was cut short
                warnings.warn(f"{p}:{n}: dropping a torn last record ({e})", stacklevel=2)
                break
            raise DataError(f"{p}:{n}: not a JSON record ({e})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out


def _check_tcfg(train_cfg: TrainConfig) -> int:
    for name in ("steps", "log_every", "save_every", "max_skips"):
        v = getattr(train_cfg, name, 1)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
    interval = getattr(train_cfg, "save_interval_s", 0.0)
    if not isinstance(interval, (int, float)) or not math.isfinite(interval) or interval < 0:
        raise ConfigError(f"TrainConfig.save_interval_s must be a number >= 0 (seconds), got {interval!r}")
    if not isinstance(getattr(train_cfg, "final_opt_state", True), bool):
        raise ConfigError(f"TrainConfig.final_opt_state must be true or false, got {train_cfg.final_opt_state!r}")
    if getattr(train_cfg, "nonfinite", "stop") not in ("stop", "skip"):
        raise ConfigError(f"TrainConfig.nonfinite must be 'stop' or 'skip', got {train_cfg.nonfinite!r}")
    check_layout(getattr(train_cfg, "layer_layout", "stacked"))
    check_teacher_layout(getattr(train_cfg, "teacher_layout", "auto"))
    if getattr(train_cfg, "dispatch_ahead", "auto") not in DISPATCH_AHEAD:
        raise ConfigError(f"TrainConfig.dispatch_ahead must be one of {DISPATCH_AHEAD}, got {train_cfg.dispatch_ahead!r}")
    return _accum_steps(train_cfg)


def dispatch_ahead_on(setting: str, mesh) -> bool:
    """TrainConfig.dispatch_ahead resolved for the mesh's devices ("auto": off on CPU; config.py)."""
    if setting != "auto":
        return setting == "on"
    return mesh.devices.flat[0].platform != "cpu"


def _test_pause(kind: str, step: int, out: Path) -> None:
    """The MARJAX_TEST_PAUSE hook (module doc): mark and sleep so a test can kill us here."""
    if pause_target(kind) == step:
        (out / PAUSE_MARKER).write_text(f"{kind}:{step}\n")
        time.sleep(600)


def _check_batch(b, train_cfg: TrainConfig) -> None:
    if not isinstance(b, dict):
        raise DataError(f"data iterator must yield dicts of arrays, got {type(b).__name__}")
    if "inputs" in b:
        shape = tuple(np.shape(b["inputs"]))
        if shape != (train_cfg.micro_batch, train_cfg.seq_len):
            raise DataError(f"batch['inputs'] has shape {shape}, expected (TrainConfig.micro_batch, "
                            f"TrainConfig.seq_len) = ({train_cfg.micro_batch}, {train_cfg.seq_len})")


def _put(batch, shardings):
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, shardings)


def _data_state(data_iter) -> Optional[dict]:
    get = getattr(data_iter, "get_state", None)
    return get() if callable(get) else None


class _Interval:
    """Exact (sum, count) reduction of loss and metrics between two log points."""

    def __init__(self):
        self.loss_sum = self.count = 0.0
        self.metrics: dict = {}
        self.tokens, self.t0 = 0, time.perf_counter()

    def add(self, out, tokens: int) -> None:
        self.loss_sum += float(out["loss"]) * float(out["count"])
        self.count += float(out["count"])
        for k, (s, c) in out["metrics"].items():
            s0, c0 = self.metrics.get(k, (0.0, 0.0))
            self.metrics[k] = (s0 + float(s), c0 + float(c))
        self.tokens += tokens

    def record(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"loss": self.loss_sum / self.count if self.count else 0.0}
        for k, (s, c) in sorted(self.metrics.items()):
            rec[k] = s / c if c else 0.0
        rec["tokens_per_s"] = self.tokens / dt
        return rec


def train(loss_fn: Callable, student_params, teacher_params, data_iter, train_cfg: TrainConfig, out_dir, *,
          trainable=None, model_meta: Optional[dict] = None, eval_fn: Optional[Callable] = None,
          resume: bool = False, progress: bool = True, mesh=None, rules: Optional[ShardingRules] = None,
          compute_dtype: Optional[str] = None, best_metric: Optional[str] = None, best_mode: str = "min",
          async_save: bool = True, saves: Optional[BackgroundSaves] = None):
    """Train the student for train_cfg.steps updates; returns (params, history).

    trainable: pytree of bools like the params (None: all). model_meta: JSON-able dict saved with
      every checkpoint; "stage" and "model_config" (a dict) are checked on resume.
    eval_fn(params) -> {name: float}: run at each save; logged as eval_<name>.
    best_metric: keep the best `train_cfg.keep` checkpoints by this logged name (e.g. "eval_ppl" or
      "loss") instead of the latest ones.
    compute_dtype: "bfloat16" runs the student in bf16 (float32 master params and optimizer);
      default TrainConfig.compute_dtype if that field exists, else float32.
    saves: a marjax.train.checkpoint.BackgroundSaves: the last update's save is handed to it and
      train returns while it is written (single-process runs; the caller waits on `saves` before
      reading the checkpoint). train waits for a save already in flight there before its own first.
    history: the log records (dicts with step, loss, ...), including earlier ones on resume.
    """
    n_micro = _check_tcfg(train_cfg)
    policy = getattr(train_cfg, "nonfinite", "stop")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(model_meta or {})
    meta.setdefault("stage", "train")
    meta["train_config"] = json.loads(json.dumps(dataclasses.asdict(train_cfg), default=str))
    if compute_dtype is None:
        compute_dtype = getattr(train_cfg, "compute_dtype", None)

    mesh = mesh if mesh is not None else make_mesh(train_cfg.mesh)
    # marjax.train.layout: in "unrolled" the step trains a tuple of layers; disk and caller see them stacked
    lay = RunLayout(getattr(train_cfg, "layer_layout", "stacked"), mesh, rules,
                    getattr(train_cfg, "teacher_layout", "auto"))
    student_params, trainable, teacher_params = lay.inputs(student_params, trainable, teacher_params)
    bad = nonfinite_leaves(student_params)
    if bad:
        raise MarjaxError(f"the student params to train hold NaN/inf in {len(bad)} leaves: {bad[:5]}; refusing "
                          "to start (nothing would be learned and no checkpoint could be saved)")
    params = shard_params(student_params, mesh, rules, copy=True)   # the state is donated: never alias the caller's
    teacher = None if teacher_params is None else shard_params(teacher_params, mesh, rules)
    tx = make_optimizer(train_cfg, params, trainable)
    state = init_state(params, tx, train_cfg.seed, mesh, rules)
    del params
    # every update's learning rate read once, up front: evaluating the schedule while logging
    # would queue a computation behind the update in flight and stall the host on it
    lrs = np.asarray(jax.device_get(jax.vmap(lr_schedule(train_cfg))(jnp.arange(train_cfg.steps))))

    ck = Checkpointer(out, keep=train_cfg.keep, best_metric=best_metric, best_mode=best_mode, async_save=async_save)
    try:
        state, history, finished = _start(ck, state, data_iter, meta, resume, out, lay, train_cfg.steps)
    except BaseException:
        ck.close()
        raise
    if finished is not None:               # resumed at a last step saved without optimizer state
        ck.close()
        return finished, history
    start = int(jax.device_get(state.step))
    if start >= train_cfg.steps:
        ck.close()
        return lay.to_caller(state.params), history

    step_fn, metrics_path = None, out / METRICS_FILE
    bar = _progress(progress, train_cfg.steps, start, meta["stage"])
    iv, t_run = _Interval(), time.perf_counter()
    # TrainConfig.micro_batch / batch_tokens count one process's rows (marjax.train.data shards
    # a global order across processes): the logged tokens are the global ones
    n_proc = jax.process_count()
    tokens_total = int(history[-1]["tokens"]) if history else start * train_cfg.batch_tokens * n_proc
    last_saved, last_grad_norm, skips = (start if start > 0 else None), None, 0
    # TrainConfig.max_skips non-finite updates in a row are allowed under "skip", none under "stop"
    limit = train_cfg.max_skips if policy == "skip" else 0

    t_saved = t_run
    interval = float(getattr(train_cfg, "save_interval_s", 0.0))
    # a save is collective across processes: a background one would interleave with the next
    # stage's collectives, so multi-process runs keep their last save in line
    background = saves if n_proc == 1 else None
    handed_off = False                     # the Checkpointer now belongs to `background`

    def save(s: int) -> None:
        """Checkpoint update s: in line, or (the last update, `background`) handed off."""
        nonlocal handed_off
        if saves is not None:
            saves.wait()                   # the save before (an earlier stage's) is on disk first
        opt = s < train_cfg.steps or getattr(train_cfg, "final_opt_state", True)
        write = _save(ck, s, state, data_iter, meta, _ckpt_metrics(history, best_metric), metrics_path, lay,
                      opt_state=opt)
        if background is not None and s == train_cfg.steps:
            background.submit(lambda: _write_and_close(write, ck), what=f"step {s} in {out}")
            handed_off = True
        else:
            write()

    def saves_at(s: int) -> bool:
        """Whether update s is checkpointed: the last one always, a save_every one once
        save_interval_s seconds have passed since the last save. Decided once per update."""
        if s == train_cfg.steps:
            return True
        if s % train_cfg.save_every:
            return False
        due = time.perf_counter() - t_saved >= interval
        if interval > 0 and n_proc > 1:
            # the processes' clocks disagree near the line, and a save is collective: process 0 decides
            from jax.experimental import multihost_utils  # late import: multi-process runs only
            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    def log(s: int, i: int, with_eval: bool = False) -> dict:
        """The record for update s (0-based index i: its learning rate)."""
        rec = {"step": s, **iv.record(), "lr": float(lrs[i]), "grad_norm": last_grad_norm,
               "tokens": tokens_total, "time": time.perf_counter() - t_run}
        if with_eval and eval_fn is not None:
            rec.update({f"eval_{k}": float(v) for k, v in eval_fn(lay.to_caller(state.params)).items()})
        _append(metrics_path, rec)
        return rec

    def settle(s: int, res, n_tok: int, save_now: bool = False) -> None:
        """Read update s's results (the one host sync per update, made once update s + 1 is
        queued behind it, or at once before a save: save_now, which also evaluates): count,
        log, skip or stop."""
        nonlocal tokens_total, skips, last_grad_norm, iv
        res = jax.device_get(res)
        tokens_total += n_tok              # consumed, trained on or skipped
        event = {"step": s, "event": "nonfinite", "loss": _f(res["loss"]), "grad_norm": _f(res["grad_norm"])}
        if not bool(res["finite"]):
            skips += 1
            if skips > limit:
                # the update queued after s saw the streak on the device and applied nothing, so
                # state.params are still those this update failed on
                _append(metrics_path, dict(event, status="diverged"))
                ck.wait()
                raise TrainingDiverged(s, ck.latest_step(), str(out), _f(res["loss"]), _f(res["grad_norm"]),
                                       params=lay.to_caller(state.params), history=history,
                                       skipped=skips - 1 if policy == "skip" else 0)
            _append(metrics_path, dict(event, status="skipped"))
            warnings.warn(f"step {s}: loss {event['loss']}, grad_norm {event['grad_norm']} not finite; update "
                          "skipped (TrainConfig.nonfinite='skip')", stacklevel=3)
        else:
            skips = 0
            iv.add(res, n_tok)
            last_grad_norm = _f(res["grad_norm"])
        if (s % train_cfg.log_every == 0 or save_now or s == 1) and iv.count:
            history.append(log(s, s - 1, with_eval=save_now))
            iv = _Interval()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{_f(res['loss']):.4f}", tok_s=f"{history[-1]['tokens_per_s']:.0f}"
                            if history else "-")

    # dispatch_ahead: update s's results are read after update s + 1 is dispatched, so the device
    # never waits on the host between updates (TPU/GPU steps are short); saves read theirs at once
    ahead = dispatch_ahead_on(getattr(train_cfg, "dispatch_ahead", "auto"), mesh)
    pending = None                         # (s, results on device, tokens) not yet read
    try:
        for i in range(start, train_cfg.steps):
            micro = []
            for _ in range(n_micro):
                try:
                    b = next(data_iter)
                except StopIteration:
                    b = None
                    break
                _check_batch(b, train_cfg)
                micro.append(b)
            if len(micro) < n_micro:
                if pending is not None:
                    settle(*pending)
                    pending = None
                warnings.warn(f"data iterator exhausted after step {i}; stopping early", stacklevel=2)
                if iv.count:                       # log the steps since the last record
                    history.append(log(i, i - 1))
                if i > start and last_saved != i:
                    save(i)
                break
            batch = stack_micro_batches(micro)
            if step_fn is None:
                # shardings of the global batch (each process holds micro_batch of its rows)
                glob = batch if n_proc == 1 else jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct((x.shape[0], x.shape[1] * n_proc) + x.shape[2:], x.dtype), batch)
                sh = make_step_shardings(state, teacher, glob, mesh, rules)
                step_fn = make_train_step(loss_fn, tx, mesh, sh, n_micro, trainable=trainable,
                                          compute_dtype=compute_dtype, param_bound=param_bound(train_cfg),
                                          max_skips=limit)
                streak = jax.device_put(np.int32(0), replicated(mesh))
            state, res = step_fn(state, teacher, _put(batch, sh.batch), streak)
            streak = res["skips"]
            s = i + 1
            _test_pause("step", s, out)
            n_tok = int(np.prod(np.shape(batch["inputs"]))) if "inputs" in batch else \
                int(np.prod(np.shape(jax.tree.leaves(batch)[0])[:2]))
            if pending is not None:
                settle(*pending)
            pending = (s, res, n_tok * n_proc)
            save_now = saves_at(s)
            if save_now or not ahead:
                settle(*pending, save_now=save_now)
                pending = None
            if save_now:
                save(s)
                last_saved, t_saved = s, time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
        if not handed_off:
            ck.close()     # waits for the async save in flight
    return lay.to_caller(state.params), history


def _start(ck: Checkpointer, state, data_iter, meta: dict, resume: bool, out: Path, lay: RunLayout, steps: int):
    """(state, history, finished) to continue from: restored from the latest checkpoint when
    resuming, else the fresh state (and stale checkpoints in out_dir are deleted); `lay` converts
    between the run's layout and the stacked one on disk. finished: the params (stacked, as the
    caller gets them) when the latest checkpoint is a last step saved without optimizer state
    (TrainConfig.final_opt_state=False) at or past `steps`; resuming one short of `steps` is refused."""
    finished = None
    history: list = []
    kept: list = []                      # the log records to keep (history plus skip events)
    latest = ck.latest_step()
    if resume and latest is not None:
        saved_meta = ck.restore_meta(latest)
        check_compatible(saved_meta, expected_stage=meta["stage"], expected_model=meta.get("model_config"))
        if not ck.has_opt_state(latest):
            if latest < steps:
                raise CheckpointError(f"{out}: checkpoint step {latest} ends an earlier run and was saved without "
                                      f"optimizer state (TrainConfig.final_opt_state=False), so it cannot be "
                                      f"continued to step {steps}; start afresh (resume=False), or load its "
                                      "params (load_model_dir) as a new run's initial params")
            finished = ck.restore_params(lay.disk_target(state).params, latest)
            return state, _records_to(out, latest)[1], finished
        state, data_state, _ = ck.restore(lay.disk_target(state), latest)
        state = lay.from_disk(state)
        if data_state and callable(getattr(data_iter, "set_state", None)):
            data_iter.set_state(data_state)
        else:
            warnings.warn("resuming with a data iterator that has no saved state (no get_state/set_state): "
                          "the data order is not replayed", stacklevel=3)
        kept, history = _records_to(out, latest)
    elif latest is not None:
        warnings.warn(f"{out} holds checkpoints {ck.all_steps()} from an earlier run; starting fresh (resume=False) "
                      "and deleting them", stacklevel=3)
        ck.delete_all()
    elif resume:
        warnings.warn(f"resume=True but {out} has no checkpoint; starting from step 0", stacklevel=3)
    _rewrite_metrics(out / METRICS_FILE, kept)
    return state, history, finished


def _records_to(out: Path, step: int) -> tuple[list, list]:
    """(every log record up to `step`, the history among them: no skip/diverged events)."""
    kept = [r for r in read_metrics(out) if r.get("step", 0) <= step]
    return kept, [r for r in kept if "status" not in r]


def _f(x) -> float:
    v = float(x)
    return v if math.isfinite(v) else str(v)  # JSON has no nan/inf literals


def _ckpt_metrics(history: list, best_metric: Optional[str]) -> Optional[dict]:
    if not best_metric:
        return None
    rec = history[-1] if history else {}
    if best_metric not in rec:
        raise ConfigError(f"best_metric {best_metric!r} is not a logged value; logged: {sorted(rec)}")
    return {best_metric: float(rec[best_metric])}


def _save(ck: Checkpointer, step: int, state, data_iter, meta: dict, metrics, metrics_path: Path,
          lay: RunLayout, opt_state: bool = True) -> Callable[[], None]:
    """Check update `step`'s state and snapshot it (state, data position) now; returns the write,
    to call at once or later from another thread (a BackgroundSaves)."""
    # a safety net behind the step's own check: a NaN/inf never reaches a checkpoint
    bad = nonfinite_leaves((state.params, state.opt_state))
    if bad:
        _append(metrics_path, {"step": step, "status": "diverged", "event": "nonfinite_state", "leaves": bad[:5]})
        ck.wait()
        raise TrainingDiverged(step, ck.latest_step(), str(ck.directory), "n/a", f"n/a (state leaves {bad[:5]})")
    disk_state, data_state = lay.to_disk(state), _data_state(data_iter)
    return lambda: ck.save(step, disk_state, data_state, meta, metrics=metrics, opt_state=opt_state)


def _write_and_close(write: Callable, ck: Checkpointer) -> None:
    """A handed-off last save: write it, then close the Checkpointer (which also finishes any
    earlier asynchronous save) whatever happened; the first failure is the one raised."""
    try:
        write()
    except BaseException:
        try:
            ck.close()
        except Exception:  # noqa: BLE001 - the write's failure is the one to report
            pass
        raise
    ck.close()


def _append(path: Path, rec: dict) -> None:
    if jax.process_index() != 0:
        return
    try:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        raise CheckpointError(f"cannot append to the metrics log {path}: {e}") from e


def _rewrite_metrics(path: Path, records: list) -> None:
    """Keep only the records up to the resumed step (a crashed run may have logged past it);
    written to a temporary file and renamed, so a kill here never loses the log."""
    if jax.process_index() != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot rewrite the metrics log {path}: {e}") from e


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
