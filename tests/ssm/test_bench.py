"""`marjax bench ssd` on a small shape: both baselines equal the reference (the speedups compare
like with like), and the JSON names the backend and carries speedups and compile times."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from marjax.cli import main
from marjax.ssm import IMPL_FNS
from marjax.ssm.bench import _inputs, minimal_baseline, scan_baseline


def test_baselines_match_reference():
    x, log_a, B, C = _inputs(2, 128, 3, 8, 4, jnp.float32)
    want, _ = IMPL_FNS["reference"](x, log_a, B, C, jnp.zeros((2, 3, 8, 4)), None, "scan")
    for fn in (scan_baseline, minimal_baseline):
        np.testing.assert_allclose(jax.jit(fn)(x, log_a, B, C), want, rtol=1e-4, atol=1e-4)


def test_bench_ssd_json(tmp_path):
    out = tmp_path / "ssd.json"
    assert main(["bench", "ssd", "--lengths", "64", "--heads", "2", "--head-dim", "8", "--state", "8",
                 "--repeats", "1", "--impls", "auto,chunked", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == jax.default_backend()
    by = {r["impl"]: r for r in res["records"]}
    assert set(by) == {"scan", "minimal", "auto", "chunked"}
    assert min(by["scan"]["fwd_speedup"], by["minimal"]["fwd_speedup"]) <= 1.0 + 1e-9   # one of them is the base
    for r in by.values():
        assert r["fwd_s"] > 0 and r["fwd_bwd_compile_s"] > 0 and r["fwd_bwd_speedup"] > 0 and r["fwd_cpu_speedup"] > 0
    assert by["auto"]["auto_choice"]["impl"] in IMPL_FNS
