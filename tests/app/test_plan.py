"""`marjax plan` on tiny presets over 8 simulated devices: the printed fields, and the analytic
FLOPs per token against XLA's cost analysis of the (scan-unrolled) train step."""
import json

import pytest

from simulated_devices import run_on_devices   # tests/simulated_devices.py


def _plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    r = run_on_devices(["-m", "marjax", "plan", *args, "--json", out], tmp_path)
    return r.stdout, json.loads(out.read_text())


@pytest.mark.parametrize("stage,teacher,student", [("kd", "tiny", "tiny-ssm"), ("pretrain", "tiny", "tiny")])
def test_plan_fields_and_flops_agree(tmp_path, stage, teacher, student):
    text, p = _plan(tmp_path, "--teacher", teacher, "--student", student, "--stage", stage, "--mesh", "2,2,2",
                    "--seq-len", "64", "--micro-batch", "8", "--no-compile")
    for field in ("per-device bytes:", "student params", "optimizer state", "teacher params",
                  "activations (analytic)", "FLOPs per token:", "analytic total", "xla cost analysis",
                  "analytic / xla", "tokens/s ceiling", "H100 SXM (bf16 989 TFLOP/s)", "TPU v5e (bf16 197 TFLOP/s)",
                  "compiled: no"):
        assert field in text, field
    assert p["devices"] == 8 and p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    b = p["bytes_per_device"]
    assert b["student params"] > 0 and b["optimizer state"] >= 2 * b["student params"] * 0.99   # two Adam moments
    assert (b["teacher params"] > 0) == (stage != "pretrain")
    assert 0.9 <= p["ratio_analytic_over_xla"] <= 1.1, p["ratio_analytic_over_xla"]
    # XLA counts a while loop's body once: the step as lowered (layer scans) must count less
    assert p["xla_flops_per_token_loop_bodies_once"] < 0.8 * p["xla_flops_per_token"]
    ceil = p["tokens_per_s_ceiling"]["H100 SXM (bf16 989 TFLOP/s)"]
    assert abs(ceil - 8 * 989e12 / p["xla_flops_per_token"]) < 1e-6 * ceil


def test_plan_counts_the_kl_recompute_only_over_several_chunks(tmp_path):
    """The KL loss rematerialises its chunks only when the sequence spans more than one: the
    analytic count must add both heads' recompute (2 d V each) exactly then, as XLA's count does."""
    plans = {}
    for chunk in (64, 32):   # seq_len 64: one chunk, then two
        _, plans[chunk] = _plan(tmp_path, "--teacher", "tiny", "--student", "tiny-ssm", "--stage", "kd", "--mesh",
                                "2,2,2", "--seq-len", "64", "--micro-batch", "8", "--no-compile",
                                "--kl-chunk", str(chunk))
    one, two = plans[64], plans[32]
    heads = 2 * 64 * 256 + 2 * 64 * 256            # tiny and tiny-ssm: d 64, V 256
    assert two["analytic_flops_per_token"]["total"] - one["analytic_flops_per_token"]["total"] == heads
    xla_extra = two["xla_flops_per_token"] - one["xla_flops_per_token"]
    assert 0.95 * heads <= xla_extra <= 1.15 * heads, (xla_extra, heads)   # + the recomputed KL's elementwise work
    assert "teacher head (fwd)" in one["analytic_flops_per_token"]
    assert "teacher head (fwd+remat)" in two["analytic_flops_per_token"]
    assert 0.9 <= one["ratio_analytic_over_xla"] <= 1.1, one["ratio_analytic_over_xla"]


@pytest.mark.slow
def test_plan_compiles_and_reports_xla_memory(tmp_path):
    text, p = _plan(tmp_path, "--teacher", "tiny", "--student", "tiny-ssm", "--stage", "sbds", "--mesh", "2,2,2",
                    "--seq-len", "64", "--micro-batch", "8", "--compute-dtype", "float32")
    assert p["compiled"] and "compiled: yes" in text and "xla argument_size" in text
    b, m = p["bytes_per_device"], p["xla_memory"]
    state = b["student params"] + b["optimizer state"] + b["teacher params"]
    # the step's arguments per device: the sharded state and teacher, plus the batch and scalars
    assert state <= m["argument_size_in_bytes"] <= 1.1 * state + 64 * 1024
