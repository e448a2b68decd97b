"""Training checkpoints (Orbax CheckpointManager) and loading a trained model from one.

A run directory:

    out_dir/
      marjax_checkpoint.json      {"format", "version", "stage", "model_kind", "model_config",
                                   "latest_step", "tokenizer_source"?, ...}
      metrics.jsonl               (written by the loop)
      <step>/params               student params          (Orbax StandardSave)
      <step>/train                {opt_state, step, rng}  (Orbax StandardSave; no opt_state in a
                                  last step saved with TrainConfig.final_opt_state=False)
      <step>/data                 data iterator state     (JSON; {} for plain iterators)
      <step>/meta                 the metadata above      (JSON)

Trees are stored as nested dicts keyed by field names (`params/blocks/mixer/wq`), so a checkpoint
does not depend on Python classes, and restore rebuilds the caller's pytree from a target of
`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`: Orbax reads each array straight into the
target sharding, so a checkpoint saved on 8 devices restores onto 1 (or any mesh).

    ck = Checkpointer(out_dir, keep=2)
    ck.save(step, state, data_state, meta); ck.wait(); ck.close()
    with BackgroundSaves() as saves: saves.submit(lambda: ..., what="step 6")   # a save off the main thread
    state, data_state, meta = ck.restore(abstract_state(state))
    cfg, params, tokenizer = load_model_dir(out_dir)

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when every
item is written, so a killed process leaves at most a tmp directory, which `all_steps()` never
lists; marjax_checkpoint.json is replaced atomically. A save that fails (disk full) raises
CheckpointError naming the step and the last complete one, which stays intact.

Untrusted files: only JSON and Orbax array files are read (nothing is unpickled or executed);
errors reading a corrupt step are CheckpointErrors naming the directory; a saved model_config whose
fields differ from this version's ModelConfig (a field added, renamed or removed) is refused with
the field names (`config_field_errors`) before any shape is built.

Test hook: env MARJAX_TEST_PAUSE="save:N" (tests/reliability) makes the background commit of
step N write `<out_dir>/.marjax_test_paused` and sleep before writing its data item, so a test
can kill the process while that async save is in flight.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import threading
import typing
import warnings
from pathlib import Path
from typing import Optional

import jax

from marjax.config import ModelConfig, model_config_from_dict, to_dict
from marjax.errors import CheckpointError
from marjax.io.resolve import resolve_tokenizer
from marjax.train.state import TrainState
from marjax.models.lm import init_params
from marjax.train.mesh import param_shardings

__all__ = ["Checkpointer", "load_model_dir", "load_on_mesh", "check_compatible", "read_run_meta", "make_meta", "model_kind",
           "RUN_META", "FORMAT", "tree_to_dict", "dict_to_tree", "config_field_errors", "PAUSE_ENV",
           "PAUSE_MARKER", "pause_target", "BackgroundSaves"]

RUN_META = "marjax_checkpoint.json"
FORMAT, VERSION = "marjax-checkpoint", 1
PAUSE_ENV, PAUSE_MARKER = "MARJAX_TEST_PAUSE", ".marjax_test_paused"
MAX_META_BYTES = 16 << 20       # marjax_checkpoint.json / meta items are small; refuse a huge one unread


def pause_target(kind: str) -> Optional[int]:
    """The step of MARJAX_TEST_PAUSE="<kind>:<step>" (test hook), else None."""
    v = os.environ.get(PAUSE_ENV, "")
    k, _, n = v.partition(":")
    return int(n) if k == kind and n.isdigit() else None


def _dataclass_in(tp):
    """The dataclass in a field annotation (X, Optional[X]), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def config_field_errors(saved: dict, cls=ModelConfig, where: str = "model_config") -> list:
    """How a saved config dict's fields differ from dataclass `cls` of this marjax version
    (nested configs included): ["model_config.ssm.foo: unknown ...", "...: missing ..."]."""
    if not isinstance(saved, dict):
        return [f"{where}: expected an object, got {type(saved).__name__}"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    errs = [f"{where}.{k}: unknown to this marjax version (renamed or removed)" for k in sorted(set(saved) - set(fields))]
    errs += [f"{where}.{k}: missing (saved by a version without it)" for k in sorted(set(fields) - set(saved))]
    for name in sorted(set(fields) & set(saved)):
        sub = _dataclass_in(hints.get(name))
        if sub is not None and saved[name] is not None:
            errs += config_field_errors(saved[name], sub, f"{where}.{name}")
    return errs


def _check_config_version(saved, source: str) -> None:
    errs = config_field_errors(saved)
    if errs:
        raise CheckpointError(f"{source}: the saved model_config does not match this marjax version's ModelConfig "
                              f"(format version {VERSION}): {'; '.join(errs[:8])}{' ...' if len(errs) > 8 else ''}. "
                              "Use the marjax version that wrote it, or edit the saved config")


def _pausing_json(run_dir: Path):
    """A JsonCheckpointHandler whose background write of step MARJAX_TEST_PAUSE="save:N" first
    marks and sleeps (test hook; built only when the variable is set). The instance's write
    function is wrapped, not subclassed: Orbax maps JsonSaveArgs to the exact handler class."""
    import orbax.checkpoint as ocp  # late import: orbax is slow to import and only needed when checkpointing
    target, h = pause_target("save"), ocp.JsonCheckpointHandler()
    write = h._save_fn

    async def _save_fn(x, directory):
        if Path(directory).parent.name.split(".")[0] == str(target):
            (run_dir / PAUSE_MARKER).write_text(f"save:{target}\n")
            await asyncio.sleep(600)           # yields: the training loop goes on meanwhile
        return await write(x, directory)
    h._save_fn = _save_fn
    return h


def model_kind(cfg: ModelConfig) -> str:
    return "spiking" if cfg.is_spiking else ("ssm" if cfg.is_ssm else "attention")


def make_meta(stage: str, model_cfg: Optional[ModelConfig] = None, **extra) -> dict:
    """Checkpoint metadata: stage, model kind and config (as a plain dict), plus JSON-able extras."""
    meta = {"format": FORMAT, "version": VERSION, "stage": stage}
    if model_cfg is not None:
        meta["model_config"] = to_dict(model_cfg)
        meta["model_kind"] = model_kind(model_cfg)
    meta.update(extra)
    return meta


def _normalise_meta(meta: dict) -> dict:
    """Fill format/model_kind for metadata built by hand (e.g. {'stage', 'model_config'})."""
    meta = json.loads(json.dumps(meta, default=str))
    meta.setdefault("format", FORMAT)
    meta.setdefault("version", VERSION)
    if "model_config" in meta and "model_kind" not in meta:
        mc = meta["model_config"]
        meta["model_kind"] = "spiking" if mc.get("atmn") else ("ssm" if mc.get("mixer") == "ssm" else "attention")
    return meta


# ----------------------------------------------------------------------------- tree <-> dict

def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_to_dict(tree) -> dict:
    """Nested dict {field: ...} of the tree's array leaves (None / empty nodes vanish)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        d = out
        names = [_key_name(k) for k in path]
        for n in names[:-1]:
            d = d.setdefault(n, {})
        d[names[-1]] = leaf
    return out


def _lookup(d: dict, names: list, what: str):
    cur = d
    for i, n in enumerate(names):
        if not isinstance(cur, dict) or n not in cur:
            raise CheckpointError(f"checkpoint {what} has no entry {'/'.join(names[:i + 1])}: it was saved from a "
                                  "different model or optimizer structure")
        cur = cur[n]
    return cur


def dict_to_tree(d: dict, target, what: str = "tree"):
    """Rebuild `target`'s pytree structure from a nested dict made by tree_to_dict."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = [_lookup(d, [_key_name(k) for k in path], what) for path, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _flat_shapes(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(_key_name(k) for k in path): tuple(x.shape) for path, x in flat if hasattr(x, "shape")}


def _check_against(saved_tree, target: dict, what: str) -> None:
    """Compare the saved arrays' paths and shapes with the restore target before reading, so a
    mismatch is one clear CheckpointError (not failed reads inside Orbax)."""
    saved, want = _flat_shapes(saved_tree), _flat_shapes(target)
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    if missing or extra:
        raise CheckpointError(f"checkpoint {what} were saved from a different model or optimizer structure: "
                              f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    bad = {k: (saved[k], want[k]) for k in want if saved[k] != want[k]}
    if bad:
        raise CheckpointError(f"checkpoint {what} shapes differ from the model's; (saved, expected): "
                              f"{dict(list(bad.items())[:5])}")


def _abstract(tree):
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- manager

class Checkpointer:
    """Orbax CheckpointManager over the run directory: keep the latest `keep` steps (or, with
    `best_metric`, the best `keep` by that metric plus the latest step), asynchronous saves
    (the next save or `wait()` waits for the previous one)."""

    def __init__(self, directory, *, keep: int = 2, best_metric: Optional[str] = None, best_mode: str = "min",
                 async_save: bool = True, read_only: bool = False):
        # read_only: only open an existing directory (Orbax's own read_only mode logs warnings)
        import orbax.checkpoint as ocp  # late import: orbax is slow to import and only needed when checkpointing
        self._ocp = ocp
        if keep is not None and keep < 1:
            raise CheckpointError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.read_only, self.async_save = read_only, async_save
        self.best_metric, self.best_mode = best_metric, best_mode
        policy, best_fn = None, None
        if best_metric:
            from orbax.checkpoint import checkpoint_managers as cm  # late import: orbax is slow to import and only needed when checkpointing
            best_fn = lambda m: float(m[best_metric])  # noqa: E731
            # BestN keeps the last `n` of the ascending sort: reverse=True keeps the smallest.
            # LatestN(1): the newest step survives too, so resume never loses progress.
            # (best_fn is still given: Orbax only writes per-step metrics when it is set.)
            policy = cm.AnyPreservationPolicy([
                cm.LatestN(n=1), cm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=keep)])
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=None if best_metric else keep, preservation_policy=policy, best_fn=best_fn,
            best_mode=best_mode, create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only)     # a killed save's tmp dir is removed, never read
        data_handler = _pausing_json(self.directory) if pause_target("save") is not None else ocp.JsonCheckpointHandler()
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": data_handler, "meta": ocp.JsonCheckpointHandler()}
        with _ReadErrors(self.directory):      # it reads every step's _CHECKPOINT_METADATA
            self.mgr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)
        self._pending: Optional[int] = None     # the step of the latest save call (maybe in flight)
        self._failed = False                     # a failed save was reported: close() does not repeat it

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queries
    def latest_step(self) -> Optional[int]:
        return self.mgr.latest_step()

    def all_steps(self) -> list:
        return sorted(self.mgr.all_steps())

    def best_step(self) -> Optional[int]:
        """The kept step with the best `best_metric` (None without one)."""
        return self.mgr.best_step() if self.best_metric else None

    # -- save / restore
    def save(self, step: int, state, data_state: Optional[dict], meta: dict, metrics: Optional[dict] = None,
             opt_state: bool = True) -> None:
        """Save the train state (params separately from opt_state/step/rng), the data iterator
        state and the metadata at `step`; updates marjax_checkpoint.json. opt_state=False leaves
        the optimizer state out (the end of a run nothing continues: `has_opt_state`)."""
        ocp = self._ocp
        if self.read_only:
            raise CheckpointError(f"checkpoint directory {self.directory} was opened read-only")
        if self.best_metric and (metrics is None or self.best_metric not in metrics):
            raise CheckpointError(f"best_metric {self.best_metric!r} missing from the save metrics "
                                  f"{sorted(metrics or {})}")
        meta = dict(_normalise_meta(meta), latest_step=int(step))
        train = {"step": state.step, "rng": state.rng}
        if opt_state:
            train["opt_state"] = tree_to_dict(state.opt_state)
        args = ocp.args.Composite(params=ocp.args.StandardSave(tree_to_dict(state.params)),
                                  train=ocp.args.StandardSave(train),
                                  data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                                  meta=ocp.args.JsonSave(meta))
        prev, self._pending = self._pending, int(step)
        try:
            self.mgr.save(int(step), args=args, metrics=metrics)   # also surfaces the previous async save's error
            self._write_run_meta(meta)
        except Exception as e:  # noqa: BLE001 - only I/O failures are rewrapped
            if not _is_io_error(e):
                raise
            raise self._save_failed(prev if prev is not None and prev not in self.all_steps() else step, e) from e

    def _save_failed(self, step: Optional[int], e: BaseException) -> CheckpointError:
        self._failed = True
        # free what the failed save wrote (a partial step is never read) and record the last
        # complete step, both best effort: the disk may still be full
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._refresh_run_meta()
        except Exception:  # noqa: BLE001 - the error below is the one to report
            pass
        full = any(getattr(x, "errno", None) == 28 or "No space left" in str(x) or "os_error_code='28'" in str(x)
                   for x in _chain(e))                                          # ENOSPC, also via tensorstore
        try:
            done = self.mgr.reload() or self.mgr.latest_step()
        except Exception:  # noqa: BLE001 - only for the message
            done = None
        kept = f"the last complete checkpoint, step {done}, is intact" if done is not None else \
            "no complete checkpoint exists yet"
        why = "the disk is full (no space left on device)" if full else f"{type(e).__name__}: {e}"
        what = f"checkpoint step {step}" if step is not None else "an asynchronous checkpoint save"
        return CheckpointError(f"saving {what} in {self.directory} failed: {why}; {kept} (resume=True "
                               "continues from it)")

    def restore(self, target_state, step: Optional[int] = None):
        """(state, data_state, meta) at `step` (default: latest) onto `target_state`'s structure,
        dtypes and shardings (a TrainState of arrays or of ShapeDtypeStructs)."""
        ocp = self._ocp
        step = self._resolve_step(step)
        target = _abstract(target_state)
        t_params = tree_to_dict(target.params)
        t_train = {"opt_state": tree_to_dict(target.opt_state), "step": target.step, "rng": target.rng}
        saved = self._item_metadata(step)
        if "opt_state" not in saved["train"]:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} holds no optimizer state (saved with "
                                  "TrainConfig.final_opt_state=False at the end of a run): only its params can be "
                                  "read (restore_params, load_model_dir)")
        _check_against(saved["params"], t_params, "params")
        _check_against(saved["train"], t_train, "optimizer state")
        with self._reading(step):
            got = self.mgr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(t_params), train=ocp.args.StandardRestore(t_train),
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        for item in ("data", "meta"):
            if got[item] is not None and not isinstance(got[item], dict):
                raise CheckpointError(f"checkpoint {self.directory / str(step) / item}: expected a JSON object, got "
                                      f"{type(got[item]).__name__}")
        state = TrainState(step=got["train"]["step"], params=dict_to_tree(got["params"], target.params, "params"),
                           opt_state=dict_to_tree(got["train"]["opt_state"], target.opt_state, "optimizer state"),
                           rng=got["train"]["rng"])
        return state, (got["data"] or None), got["meta"]

    def has_opt_state(self, step: Optional[int] = None) -> bool:
        """Whether step (default: latest) holds the optimizer state (Checkpointer.save opt_state)."""
        return "opt_state" in self._item_metadata(self._resolve_step(step))["train"]

    def restore_params(self, target_params, step: Optional[int] = None):
        """Only the params item (no optimizer state is read)."""
        ocp = self._ocp
        step = self._resolve_step(step)
        target = _abstract(target_params)
        t_params = tree_to_dict(target)
        _check_against(self._item_metadata(step)["params"], t_params, "params")
        with self._reading(step):
            got = self.mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(t_params)))
        return dict_to_tree(got["params"], target, "params")

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self._resolve_step(step)
        meta_file = self.directory / str(step) / "meta" / "metadata"
        if meta_file.is_file() and meta_file.stat().st_size > MAX_META_BYTES:
            raise CheckpointError(f"checkpoint metadata {meta_file} is {meta_file.stat().st_size} bytes; a marjax "
                                  f"one is a few KB (limit {MAX_META_BYTES}): not reading it")
        with self._reading(step):
            meta = self.mgr.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint metadata {meta_file}: expected a JSON object, got {type(meta).__name__}")
        return meta

    def _item_metadata(self, step: int):
        with self._reading(step):
            saved = self.mgr.item_metadata(step)
        for item in ("params", "train"):
            if saved.get(item) is None:
                raise CheckpointError(f"checkpoint {self.directory / str(step)} has no readable {item!r} item "
                                      "(missing or corrupt Orbax metadata)")
        return saved

    def _reading(self, step: int):
        return _ReadErrors(self.directory / str(step))

    def delete_all(self) -> None:
        """Remove every saved step (a fresh run reusing the directory)."""
        for s in self.all_steps():
            self.mgr.delete(s)

    def wait(self) -> None:
        try:
            self.mgr.wait_until_finished()
            self._refresh_run_meta()
        except Exception as e:  # noqa: BLE001 - an async save's failure surfaces here
            raise self._save_failed(self._pending, e) from e

    def close(self) -> None:
        try:
            self.mgr.wait_until_finished()
            if not self.read_only:
                self._refresh_run_meta()
        except Exception as e:  # noqa: BLE001 - an async save's failure surfaces here
            try:
                self.mgr.close()
            except Exception:  # noqa: BLE001 - the same failure again
                pass
            if not self._failed:
                raise self._save_failed(self._pending, e) from e
            return
        self.mgr.close()

    # -- internals
    def _resolve_step(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; saved steps: {steps}")
        return int(step)

    def _write_run_meta(self, meta: dict) -> None:
        if jax.process_index() != 0:
            return
        run = {k: v for k, v in meta.items()}
        # latest finished step: Orbax already lists the step whose async save is in flight, which
        # is not restorable yet (its predecessor is: a save waits for the previous one)
        saving = meta.get("latest_step")
        done = saving if not self.async_save else self._done_step(exclude=saving)
        run["latest_step"] = None if done is None else int(done)
        run["saving_step"] = meta.get("latest_step")
        _atomic_write(self.directory / RUN_META, json.dumps(run, indent=1))

    def _done_step(self, exclude: Optional[int] = None) -> Optional[int]:
        """The latest finalised step: Orbax's list also holds a step whose save is in flight or
        failed; on a local disk a step is final once its directory has its own name."""
        return max((s for s in self.mgr.all_steps() if s != exclude and (self.directory / str(s)).is_dir()),
                   default=None)

    def _refresh_run_meta(self) -> None:
        path = self.directory / RUN_META
        if not path.is_file() or jax.process_index() != 0:
            return
        try:
            run = json.loads(path.read_text())
        except ValueError:                  # rewritten from the step's own meta below
            run = {}
        if not isinstance(run, dict):
            run = {}
        done = self._done_step()
        run["latest_step"] = None if done is None else int(done)
        run.pop("saving_step", None)
        _atomic_write(path, json.dumps(run, indent=1))


class BackgroundSaves:
    """Checkpoint saves that finish in a background thread while the caller goes on.

    `marjax pipeline` hands each stage's final save here (`train(..., saves=)`) and starts the next
    stage, so the write overlaps that stage's setup and compile instead of holding the run up: on
    the 2-core VM a save costs about 7-13 s of kernel time per GB (the page cache's fresh pages),
    8-25 s per SmolLM2 stage. The save itself is the ordinary synchronous one, run in the thread
    on the final state, which the thread keeps alive until it is written. At most one is in
    flight: `submit` first waits for the one before, and so does `train` before its own first save. `wait()` joins and raises the first failure as a
    CheckpointError; leaving a `with` block waits too (a failure there does not hide an exception
    already on its way out: it is chained as a warning).

        with BackgroundSaves() as saves:
            params, _ = train(..., saves=saves)      # returns while its last save is written
            ...                                      # next stage
        # every checkpoint is on disk here
    """

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[tuple] = None       # (what, exception) of a failed save

    def __enter__(self) -> "BackgroundSaves":
        return self

    def __exit__(self, tp, e, tb) -> None:
        if e is None:
            self.wait()
            return
        try:
            self.wait()
        except CheckpointError as err:           # the exception on its way out wins
            warnings.warn(f"{err} (while handling {tp.__name__}: {e})", stacklevel=2)

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn, what: str) -> None:
        """Run `fn()` (a save and its close) in a fresh thread, after the previous one finished."""
        self.wait()

        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by wait(), in the caller's thread
                self._failure = (what, e)

        self._thread = threading.Thread(target=run, name=f"marjax-save:{what}")
        self._thread.start()

    def wait(self) -> None:
        """Join the save in flight (if any); raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            what, e = self._failure
            self._failure = None
            if isinstance(e, CheckpointError):
                raise e
            raise CheckpointError(f"the background save of {what} failed: {type(e).__name__}: {e}") from e


class _ReadErrors:
    """Turn whatever Orbax / tensorstore / json raise on a corrupt step into one CheckpointError
    naming the step directory (marjax's own errors pass through)."""

    def __init__(self, where: Path):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, tp, e, tb):
        if e is None or isinstance(e, (CheckpointError, KeyboardInterrupt, MemoryError)) or \
                not isinstance(e, Exception):
            return False
        raise CheckpointError(f"cannot read checkpoint {self.where}: corrupt or incomplete "
                              f"({type(e).__name__}: {str(e)[:300]})") from e


def _atomic_write(path: Path, text: str) -> None:
    """Write then rename: a kill or a full disk never leaves a half-written file in place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _is_io_error(e: BaseException) -> bool:
    """OSError, or what tensorstore raises for a failed write (a ValueError with a status code)."""
    return any(isinstance(x, OSError) or (isinstance(x, (ValueError, RuntimeError)) and any(
        t in str(x) for t in ("RESOURCE_EXHAUSTED", "No space left", "os_error_code", "Failed writing")))
        for x in _chain(e))


def _chain(e: BaseException):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


# ----------------------------------------------------------------------------- model loading

def read_run_meta(path) -> dict:
    """marjax_checkpoint.json of a run directory."""
    p = Path(path) / RUN_META
    if not p.is_file():
        raise CheckpointError(f"{path} is not a marjax checkpoint directory (no {RUN_META})")
    if p.stat().st_size > MAX_META_BYTES:
        raise CheckpointError(f"{p} is {p.stat().st_size} bytes; a marjax one is a few KB (limit {MAX_META_BYTES})")
    try:
        meta = json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:   # bad JSON, not UTF-8, 5000-digit ints, deep nesting
        raise CheckpointError(f"{p} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


_STRUCTURAL = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "mixer", "ssm",
               "atmn", "tie_embeddings", "rope_layout")


def check_compatible(meta: dict, expected_stage: Optional[str] = None, expected_model=None) -> None:
    """Refuse a checkpoint from another stage, or of another model (a ModelConfig, a config
    dict, or a model kind 'attention' | 'ssm' | 'spiking'), with a CheckpointError."""
    if not isinstance(meta, dict) or meta.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"not marjax checkpoint metadata: {meta!r:.200}")
    if expected_stage is not None and meta.get("stage") != expected_stage:
        raise CheckpointError(f"checkpoint is from stage {meta.get('stage')!r}, expected stage {expected_stage!r}; "
                              "use the output directory of that stage (or a new directory without resume)")
    if expected_model is None:
        return
    meta = _normalise_meta(meta)
    if isinstance(expected_model, str):
        if meta.get("model_kind") != expected_model:
            raise CheckpointError(f"checkpoint holds a {meta.get('model_kind')!r} model, expected {expected_model!r}")
        return
    want = to_dict(expected_model) if isinstance(expected_model, ModelConfig) else dict(expected_model)
    have = meta.get("model_config")
    if have is None:
        raise CheckpointError("checkpoint metadata has no model_config to check against the expected model")
    _check_config_version(have, "checkpoint")
    want, have = json.loads(json.dumps(want, default=str)), json.loads(json.dumps(have, default=str))
    diff = {k: (have.get(k), want.get(k)) for k in _STRUCTURAL if have.get(k) != want.get(k)}
    if diff:
        raise CheckpointError(f"checkpoint model ({have.get('name')!r}) differs from the expected model "
                              f"({want.get('name')!r}) in {sorted(diff)}; (checkpoint, expected): {diff}")


def load_model_dir(path, *, step: Optional[int] = None, mesh=None, rules=None):
    """(ModelConfig, params, tokenizer or None) from a marjax run directory (latest step by
    default). Params land on the default device, or sharded by `rules` on `mesh` when given.
    The tokenizer comes from the metadata's "tokenizer_source" (a model name/path)."""
    run = read_run_meta(path)
    ck = Checkpointer(path, read_only=True, async_save=False, keep=None)
    try:
        meta = ck.restore_meta(step)
        if "model_config" not in meta:
            raise CheckpointError(f"checkpoint {path} has no model_config in its metadata")
        _check_config_version(meta["model_config"], f"checkpoint {path}")
        try:
            cfg = model_config_from_dict(meta["model_config"])
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {path}: bad model_config in metadata: {e}") from e
        shapes = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), cfg))
        if mesh is not None:
            sh = param_shardings(shapes, mesh, rules)
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            sh = jax.tree.map(lambda _: dev, shapes)
        target = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, sh)
        params = ck.restore_params(target, step)
    finally:
        ck.close()
    tok = _load_tokenizer(meta.get("tokenizer_source") or run.get("tokenizer_source"))
    return cfg, params, tok


def load_on_mesh(name_or_path, mesh, rules=None, *, dtype: Optional[str] = None, step: Optional[int] = None):
    """(cfg, params, tokenizer) with every param leaf created directly in its sharding on `mesh`
    (by `rules`; each device reads only its slices, no full copy on one device): a marjax run
    directory through Orbax, anything else (.gguf, HF / Llamba / marjax model dir, preset)
    through marjax.io.sharded.load_sharded."""
    # late import: the io readers (gguf, safetensors) are only needed when loading from a file
    from marjax.io.sharded import load_sharded   # late import: as above
    from marjax.train.mesh import param_shardings   # late import: as above (only with a mesh)
    from marjax.io.resolve import KNOWN_MODELS, smollm2_gguf_path   # late import: as above
    path = os.fspath(name_or_path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, RUN_META)):
        return load_model_dir(path, step=step, mesh=mesh, rules=rules)
    named = path.strip().lower() in KNOWN_MODELS
    cfg, params, tok = load_sharded(smollm2_gguf_path() if named else path,
                                    lambda shapes: param_shardings(shapes, mesh, rules), dtype=dtype)
    return (dataclasses.replace(cfg, name="smollm2-135m-instruct") if named else cfg), params, tok


def _load_tokenizer(src: Optional[str]):
    if not src:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # a preset source warns about random weights
            return resolve_tokenizer(src)          # the tokenizer only, not the whole teacher
    except Exception as e:  # noqa: BLE001 - the params are still usable without a tokenizer
        warnings.warn(f"checkpoint tokenizer source {src!r} could not be loaded ({e}); no tokenizer", stacklevel=3)
        return None
