"""`marjax bench step|eval|atmn` on tiny shapes: the records hold the ratios, compile times and
machine header, and the eval bench's two scoring paths agree on the NLL."""
import json
import time
import warnings

import numpy as np
import pytest

from marjax.api import load, logits
from marjax.app.bench_eval import eval_bench, plain_nll
from marjax.app.benchkit import PeakProbe, _fastest_s, interleaved, matmul_peak_gflops
from marjax.cli import main
from marjax.eval.scoring import encode_text, prefix_token


def test_interleaved_times_every_function_and_peak_is_positive():
    calls = {"a": 0, "b": 0}

    def f(k):
        calls[k] += 1
        return k
    t = interleaved({"a": lambda: f("a"), "b": lambda: f("b")}, repeats=3, warmup=1)
    assert calls == {"a": 4, "b": 4}
    assert all(t[k]["min_s"] <= t[k]["median_s"] for k in t)
    assert all(len(t[k]["rounds_s"]) == 3 and min(t[k]["rounds_s"]) == t[k]["min_s"] for k in t)
    assert matmul_peak_gflops(n=128, repeats=2, min_s=0.0) > 0
    probe = PeakProbe(n=128, repeats=2, min_s=0.0)        # one best-of-2 peak per call: one per round
    interleaved({"a": lambda: f("a"), "peak": probe}, repeats=2, warmup=1)
    assert len(probe.gflops) == 3 and min(probe.gflops) > 0


def test_fastest_s_keeps_calling_until_min_s():
    """At least `repeats` calls, and more until min_s has passed: a peak measurement must outlast
    the slow window after a long program (benchkit.PEAK_MIN_S)."""
    n = {"calls": 0}

    def call():
        n["calls"] += 1
        time.sleep(0.01)
    assert _fastest_s(call, repeats=2, min_s=0.0) >= 0.01 and n["calls"] == 2
    n["calls"] = 0
    t0 = time.perf_counter()
    _fastest_s(call, repeats=2, min_s=0.1)
    assert time.perf_counter() - t0 >= 0.1 and n["calls"] > 2


@pytest.mark.slow   # ~16 s on a 2-core CPU: compiling the train step dominates
def test_bench_step_tiny_kd(tmp_path):
    out = tmp_path / "s.json"
    assert main(["bench", "step", "--model", "tiny", "--stages", "kd", "--seq-len", "16", "--micro-batch", "2",
                 "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["matmul_peak_gflops"] > 0
    (r,) = res["records"]
    assert r["stage"] == "kd" and r["tokens"] == 32 and np.isfinite(r["last_loss"]) and r["last_loss"] > 0
    assert r["step_over_parts_median"] > 0 and all(v > 0 for v in r["compile_s"].values())
    assert r["layer_layout"] == "stacked" and r["teacher_layout"] == "unrolled"   # "auto" on CPU
    assert len(r["round_peaks_gflops"]) == 1 and r["round_peaks_gflops"][0] > 0   # one round, its own peak
    assert set(r["peak_fraction_by_round"]) == {"teacher_fwd", "student_fwd_bwd", "step"}
    assert all(v > 0 for v in r["peak_fraction_by_round"].values())
    f = r["analytic_flops_per_token"]
    # 16 tokens fit one KL chunk: nothing is recomputed, the kd step counts exactly its two parts
    assert f["step"] == f["teacher_fwd"] + f["student_fwd_bwd"]


def test_bench_eval_paths_agree_on_the_nll():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = load("tiny")
    text = "the quick brown fox jumps over the lazy dog. " * 8
    r = eval_bench(m, text, window=32, max_tokens=100, batch_size=4, repeats=1)
    assert r["tokens"] == 100 and r["same_nll"], (r["nll_marjax"], r["nll_plain"])
    # independent of both: the plain loop's NLL against a numpy log-softmax of one full forward
    seq = np.asarray([prefix_token(m.tokenizer)] + encode_text(m.tokenizer, text)[:32])
    lg = np.asarray(logits(m, seq[None, :32]))[0].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    want = -(lg[np.arange(32), seq[1:33]] - lse).sum()
    total, n = plain_nll(m, seq, window=32)
    assert n == 32 and abs(float(total) - want) < 1e-3 * max(1.0, want)
