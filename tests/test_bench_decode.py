"""`marjax bench decode` on the tiny preset: cached and full-forward greedy decoding agree, the
full-forward baseline grows its prefix bucket by bucket, and the quantised-weights rows are
measured against float32 in the same run."""
import json
import warnings

import jax

from marjax.api import load
from marjax.bench import FULL_BUCKET, STACKED, _decode_weights
from marjax.cli import main
from marjax.kernels import cpu_kernels


def test_bench_decode_tiny(tmp_path, capsys):
    out = tmp_path / "d.json"
    # 16 prompt + 50 new tokens: prefixes 16..65 -> buckets of 64 and 128 tokens
    assert main(["bench", "decode", "--model", "tiny", "--new-tokens", "50", "--curve", "16,64",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["matmul_peak_gflops"] > 0 and res["device"].startswith(res["backend"])
    dec = res["decode"][0]
    assert dec["same_tokens"] is True
    assert FULL_BUCKET == 64 and dec["full_buckets"] == [64, 128]
    kv, ssm = res["curve"]["kv"], res["curve"]["ssm"]
    assert kv[1]["cache_bytes"] > kv[0]["cache_bytes"]          # KV cache grows with context
    assert ssm[1]["cache_bytes"] == ssm[0]["cache_bytes"]        # SSM state does not
    # bytes a step streams: every f32 weight (tiny ties its embedding: read whole, as the head)
    # plus the cache or state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = load("tiny")
    assert t.config.tie_embeddings and kv[0]["weight_bytes"] == 4 * sum(x.size for x in jax.tree.leaves(t.params))
    assert ssm[0]["weight_bytes"] > kv[0]["weight_bytes"]       # in_proj's x, z, B, C, dt outgrow q, k, v
    assert all(r["bytes_per_step"] == r["weight_bytes"] + r["cache_bytes"] for r in kv + ssm)
    kx = res["curve"]["kv_xla_attention"]                        # the teacher again, XLA's attention
    assert [r["context"] for r in kx] == [16, 64] and all(r["step_s"] > 0 for r in kx)
    assert "llama.cpp peer skipped" in capsys.readouterr().out   # tiny is no GGUF


def test_decode_weights_rows_against_f32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the preset's weights are random
        m = load("tiny")
    res = _decode_weights(m, prompt_len=4, n_new=6, modes=["int8"], repeats=1)
    rows = {r["weights"]: r for r in res["rows"]}
    # f32 (decode layout) is always the baseline; with the native kernel built, int8 runs it and
    # "int8 xla" the dequantising matmul it replaces
    assert set(rows) == {"f32", "int8", STACKED} | ({"int8 xla"} if cpu_kernels.available() else set())
    assert rows[STACKED]["same_tokens_as_f32"]           # the stacked layout decodes the same tokens
    assert rows["f32"]["tok_s_over_f32"] == 1.0 and rows["f32"]["same_tokens_as_f32"]
    assert rows["int8"]["tok_s_over_f32"] > 0
    assert rows["int8"]["weight_bytes"] < 0.35 * rows["f32"]["weight_bytes"]
