"""Helpers for the fault tests: a tiny `marjax distill` job run as a real process, and a
persistent XLA compile cache shared by those processes (only compile time changes; see
tests/reliability/test_determinism.py for the check that cached executables give the same bits)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 6, 2
# a tiny kd stage: random "tiny" teacher (byte tokenizer), stage-1 student initialised from it
DISTILL = ["--stage", "kd", "run.teacher=tiny", "train.seq_len=32", "train.micro_batch=2",
           "train.batch_tokens=64", f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.log_every=1",
           "train.warmup=1", "train.keep=2"]
CURVE_KEYS = ("step", "loss", "kl", "lr", "grad_norm", "tokens")


def distill_env(xla_cache: str, **extra) -> dict:
    """The job's environment. MARJAX_HUGEPAGES=0: no malloc tunables, so the job saves its
    checkpoints asynchronously, the mode most of these tests kill it in (under the tunables the
    stages save synchronously: marjax.app.hostmem.heap_kept); pass MARJAX_HUGEPAGES="1" for those."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=xla_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), MARJAX_HUGEPAGES="0")
    env.pop("GLIBC_TUNABLES", None)
    env.pop("MARJAX_TEST_PAUSE", None)
    env.update(extra)
    return env


def distill_cmd(out: Path, *args) -> list:
    return [sys.executable, "-m", "marjax", "distill", *DISTILL, f"run.out={out}", *args]


def run_distill(out: Path, env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(distill_cmd(out, *args), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def start_and_kill_at(out: Path, env: dict, pause: str, *args, until=None, timeout: float = 300) -> subprocess.Popen:
    """Start the job with MARJAX_TEST_PAUSE=pause, wait until it reports the pause point (and
    `until()` holds, when given), then SIGKILL it."""
    marker = out / ".marjax_test_paused"
    p = subprocess.Popen(distill_cmd(out, *args), env=dict(env, MARJAX_TEST_PAUSE=pause), cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while not marker.exists():
            if p.poll() is not None:
                raise AssertionError(f"job ended (rc {p.returncode}) before pausing at {pause}: "
                                     f"{p.stderr.read()[-2000:]}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"job did not reach {pause} in {timeout} s")
            time.sleep(0.05)
        while until is not None and not until() and p.poll() is None and time.time() - t0 < timeout:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    marker.unlink()
    return p


def run_meta(out: Path) -> dict:
    try:
        return json.loads((out / "marjax_checkpoint.json").read_text())
    except (OSError, ValueError):
        return {}


def curve(out: Path) -> list:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in CURVE_KEYS} for r in recs]


def saved_params(out: Path) -> dict:
    from marjax.train.checkpoint import load_model_dir, tree_to_dict
    import jax
    _, params, _ = load_model_dir(out)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_params(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
