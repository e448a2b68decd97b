"""Crash safety with real processes: a tiny `marjax distill` job SIGKILLed mid-step and while an
async checkpoint save is in flight resumes (`--resume`) from the last complete checkpoint, never a
partial one, and ends with the loss curve and params of an uninterrupted run; a full disk while
saving is a CheckpointError that leaves the previous checkpoint intact."""
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from marjax.errors import CheckpointError
from marjax.train.checkpoint import RUN_META, Checkpointer, load_model_dir
from marjax.train.loop import read_metrics, train
from reliability_helpers import (assert_same_params, curve, distill_env, run_distill, run_meta, saved_params,
                                 start_and_kill_at)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_loop import CFG, META, _params, ce_loss, grain_iter, tcfg  # noqa: E402  (the tiny CE trainer)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache):
    """An uninterrupted run: its loss curve and final params."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_distill(out, distill_env(xla_cache))
    return curve(out), saved_params(out)


def _steps_on_disk(out):
    with Checkpointer(out, read_only=True) as ck:     # read-only: does not clean tmp dirs
        return ck.all_steps()


def _tmp_dirs(out):
    return sorted(p.name for p in out.iterdir() if "orbax-checkpoint-tmp" in p.name)


def _resume_and_compare(out, env, reference):
    ref_curve, ref_params = reference
    run_distill(out, env, "--resume")
    assert curve(out) == ref_curve                      # every step once, in order, with the same numbers
    assert_same_params(saved_params(out), ref_params)
    assert _tmp_dirs(out) == []                         # the partial save was cleaned up, never read
    assert json.loads((out / RUN_META).read_text())["latest_step"] == 6


def test_kill_during_async_save_resumes_exactly(tmp_path, xla_cache):
    """Fast: two processes. The save of step 4 sleeps inside its background commit; the loop
    trains on through step 6 (its save then waits for step 4's), so the killed process logged an
    uninterrupted curve 1..6. Killed there, resumed from step 2, it must log that curve again."""
    out = tmp_path / "run"
    env = distill_env(xla_cache)
    start_and_kill_at(out, env, "save:4", until=lambda: run_meta(out).get("saving_step") == 4 and
                      any(r["step"] == 6 for r in curve(out)))
    uninterrupted = curve(out)
    assert [r["step"] for r in uninterrupted] == [1, 2, 3, 4, 5, 6]
    assert _tmp_dirs(out) and _tmp_dirs(out)[0].startswith("4.")    # the half-written step is there...
    assert _steps_on_disk(out) == [2]                                 # ...but is not a checkpoint
    assert run_meta(out)["latest_step"] == 2
    run_distill(out, env, "--resume")
    assert curve(out) == uninterrupted                   # steps 3-6 replayed: same batches, same numbers
    assert _tmp_dirs(out) == [] and _steps_on_disk(out) == [4, 6] and run_meta(out)["latest_step"] == 6


def test_kill_during_sync_save_resumes_exactly(tmp_path, xla_cache):
    """Under the malloc tunables (`marjax distill` from the command line re-executes with them) the
    stages save in line: killed inside step 4's save, the job has logged steps 1-4 and trained no
    further; resumed from step 2, it logs those numbers again and ends at step 6."""
    from marjax.app import hostmem
    if hostmem.hugepage_env({}, hostmem.thp_mode(), hostmem.glibc_version()) is None:
        pytest.skip("no glibc malloc tunables on this system: the job saves asynchronously")
    out = tmp_path / "run"
    env = distill_env(xla_cache, MARJAX_HUGEPAGES="1")
    start_and_kill_at(out, env, "save:4")     # paused inside the save: the loop waits on it
    killed = curve(out)
    assert [r["step"] for r in killed] == [1, 2, 3, 4]             # nothing trained past the save in flight
    assert _tmp_dirs(out) and _tmp_dirs(out)[0].startswith("4.") and _steps_on_disk(out) == [2]
    run_distill(out, env, "--resume")
    resumed = curve(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:4] == killed
    assert _tmp_dirs(out) == [] and _steps_on_disk(out) == [4, 6] and run_meta(out)["latest_step"] == 6


@pytest.mark.slow
def test_kill_during_async_save_matches_a_separate_run(tmp_path, xla_cache, reference):
    out = tmp_path / "run"
    env = distill_env(xla_cache)
    start_and_kill_at(out, env, "save:4", until=lambda: run_meta(out).get("saving_step") == 4 and
                      any(r["step"] == 5 for r in curve(out)))
    assert _steps_on_disk(out) == [2]
    _resume_and_compare(out, env, reference)


@pytest.mark.slow
def test_kill_mid_step_resumes_exactly(tmp_path, xla_cache, reference):
    out = tmp_path / "run"
    env = distill_env(xla_cache)
    # update 5 dispatched, its batch consumed, nothing saved; killed once step 4's save is final
    start_and_kill_at(out, env, "step:5", until=lambda: (out / "4").is_dir())
    assert _steps_on_disk(out) == [2, 4]
    assert [r["step"] for r in curve(out)] == [1, 2, 3, 4]
    _resume_and_compare(out, env, reference)


@pytest.mark.slow
def test_killed_three_times_resumes_exactly(tmp_path, xla_cache, reference):
    """Killed mid-step, resumed and killed in a save, resumed and killed mid-step again."""
    out = tmp_path / "run"
    env = distill_env(xla_cache)
    start_and_kill_at(out, env, "step:3", until=lambda: (out / "2").is_dir())   # step 2's save final
    assert _steps_on_disk(out) == [2]
    for pause, steps in (("save:4", [2]), ("step:6", [2, 4])):
        start_and_kill_at(out, env, pause, "--resume", until=lambda: (out / "4").is_dir() if pause == "step:6"
                          else run_meta(out).get("saving_step") == 4)
        assert _steps_on_disk(out) == steps, pause
    _resume_and_compare(out, env, reference)


def _mount_tmpfs(path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a size-limited directory")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({r.stderr.strip()}): disk-full test skipped")


def test_disk_full_while_saving(tmp_path):
    """A tmpfs with room for one checkpoint: the second save fails with a CheckpointError that says
    the disk is full and names the intact step; after making room, resume ends equal to an
    uninterrupted run."""
    tc = tcfg(steps=6, save_every=2, keep=1)
    p_ref, h_ref = train(ce_loss(CFG), _params(), None, grain_iter(4), tc, tmp_path / "ref", model_meta=META,
                         progress=False)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1800k")           # one tiny-model checkpoint is ~1.2 MB with its Adam moments
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError, match=r"step 4 .* the disk is full .* step 2, is intact"):
                train(ce_loss(CFG), _params(), None, grain_iter(4), tc, disk / "run", model_meta=META,
                      progress=False)
        assert _steps_on_disk(disk / "run") == [2]
        load_model_dir(disk / "run")                                # the previous checkpoint reads back
        assert json.loads((disk / "run" / RUN_META).read_text())["latest_step"] == 2
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        p_res, h_res = train(ce_loss(CFG), _params(), None, grain_iter(4), tc, disk / "run", model_meta=META,
                             resume=True, progress=False)
        keys = ("step", "loss", "grad_norm", "lr", "tokens")
        assert [{k: r[k] for k in keys} for r in h_res] == [{k: r[k] for k in keys} for r in h_ref]
        assert [r["step"] for r in read_metrics(disk / "run")] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(jax.tree.leaves(p_res), jax.tree.leaves(p_ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
