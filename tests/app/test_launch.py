"""`marjax launch`: N local jax.distributed processes. Fast: the data shards of S processes
stack to the one-process batches; a 2-process smoke (gloo) sees the job's global devices.
Slow: a 2-process `marjax distill` gives the 1-process loss curve (same global batch), and a
resume of the 2-process run from its first checkpoint continues it exactly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marjax.io.tokenizer import ByteTokenizer
from marjax.train.data import make_dataset

REPO = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("MARJAX_COORDINATOR", "MARJAX_NUM_PROCESSES", "MARJAX_PROCESS_ID", "XLA_FLAGS", "MARJAX_TEST_PAUSE"):
        env.pop(k, None)
    env.update(extra)
    return env


def _marjax(args, env, timeout=900):
    r = subprocess.run([sys.executable, "-m", "marjax", *args], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_process_shards_stack_to_the_global_batches():
    docs = ["".join(chr(c) for c in np.random.default_rng(2).integers(97, 123, 700))]
    kw = dict(seq_len=8, seed=4)
    one = make_dataset(docs, ByteTokenizer(), batch_size=6, shard_index=0, shard_count=1, **kw)
    shards = [make_dataset(docs, ByteTokenizer(), batch_size=2, shard_index=s, shard_count=3, **kw) for s in range(3)]
    for k in range(40):         # ~4 epochs of 87 windows: crosses reshuffles
        want = next(one)
        got = [next(it) for it in shards]
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], err_msg=f"{k} {key}")
    states = [it.get_state() for it in shards]
    assert all(s["grain"] == states[0]["grain"] for s in states)
    fresh = make_dataset(docs, ByteTokenizer(), batch_size=2, shard_index=2, shard_count=3, **kw)
    fresh.set_state(states[0])     # process 0's saved state resumes shard 2
    np.testing.assert_array_equal(next(fresh)["inputs"], next(shards[2])["inputs"])


def test_launch_two_processes_smoke(tmp_path):
    """Each process initialises jax.distributed and sees the 2 x 2 global CPU devices."""
    _marjax(["launch", "--processes", "2", "--local-devices", "2", "--log-dir", str(tmp_path), "--",
             "marjax", "plan", "--teacher", "tiny", "--student", "tiny-ssm", "--stage", "kd", "--mesh", "2,2,1",
             "--seq-len", "32", "--micro-batch", "4", "--no-compile"], _env(), timeout=600)
    for i in range(2):
        log = (tmp_path / f"process_{i}.log").read_text()
        assert "mesh (data, fsdp, tensor) = 2x2x1 (4 devices)" in log, log[-2000:]


def test_launch_refuses_a_missing_command():
    r = subprocess.run([sys.executable, "-m", "marjax", "launch", "--processes", "2"], env=_env(),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1 and "give the command after '--'" in r.stderr


KD = ["--stage", "kd", "run.teacher=tiny", "train.seq_len=32", "train.steps=4", "train.save_every=2",
      "train.log_every=1", "train.warmup=1", "train.keep=2"]


def _curve(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_processes_agree_on_a_timed_save(tmp_path):
    """train.save_interval_s in a 2-process run: process 0's clock decides (a broadcast), so both
    skip the step-2 save together and both save step 4; a process alone in the save would hang."""
    env = _env()
    _marjax(["convert", "--model", "tiny", "--out", str(tmp_path / "ssm")], env)
    _marjax(["launch", "--processes", "2", "--log-dir", str(tmp_path / "logs"), "--", "marjax", "distill", *KD,
             f"run.student={tmp_path / 'ssm'}", "train.micro_batch=2", "train.batch_tokens=64",
             "train.save_interval_s=1e6", f"run.out={tmp_path / 'two'}"], env, timeout=600)
    assert sorted(int(p.name) for p in (tmp_path / "two").iterdir() if p.name.isdigit()) == [4]
    assert [r["step"] for r in _curve(tmp_path / "two")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_exactly(tmp_path):
    env = _env()
    _marjax(["convert", "--model", "tiny", "--out", str(tmp_path / "ssm")], env)
    kd = KD + [f"run.student={tmp_path / 'ssm'}"]
    # one process, 2 devices, global batch 4 x 32 tokens
    _marjax(["distill", *kd, "train.micro_batch=4", "train.batch_tokens=128", f"run.out={tmp_path / 'one'}"],
            _env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    # two processes of 1 device, 2 rows each: the same global batches
    two = ["distill", *kd, "train.micro_batch=2", "train.batch_tokens=64"]
    _marjax(["launch", "--processes", "2", "--log-dir", str(tmp_path / "logs"), "--", "marjax", *two,
             f"run.out={tmp_path / 'two'}"], env)
    one, dist = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert [r["step"] for r in dist] == [1, 2, 3, 4]
    for a, b in zip(one, dist):
        assert a["tokens"] == b["tokens"]
        for k in ("loss", "kl", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=f"step {a['step']} {k}")
    # resume the 2-process run from its step-2 checkpoint (step 4 removed): steps 3-4 again
    res = tmp_path / "res"
    shutil.copytree(tmp_path / "two", res)
    shutil.rmtree(res / "4")
    _marjax(["launch", "--processes", "2", "--log-dir", str(tmp_path / "logs2"), "--", "marjax", "distill", "--resume",
             *two[1:], f"run.out={res}"], env)
    again = _curve(res)
    assert again[:2] == dist[:2]                    # kept records, not a fresh start
    assert [r["step"] for r in again] == [1, 2, 3, 4] and again[2]["time"] != dist[2]["time"]
    for a, b in zip(dist[2:], again[2:]):
        for k in ("loss", "kl", "grad_norm", "lr", "tokens"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
