"""The step profile probe's parsing (experiments/bench/step_profile_probe.py): a handwritten
compiled-HLO excerpt and trace, so a change in how it reads names, shapes or FLOPs fails here."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import step_profile_probe as P  # noqa: E402

HLO = """HloModule jit_step

%fused_computation.7 (param_0: f32[256,576], param_1: f32[576,1536]) -> f32[256,1536] {
  %param_0 = f32[256,576]{1,0} parameter(0)
  %param_1 = f32[576,1536]{1,0} parameter(1)
  ROOT %dot.3 = f32[256,1536]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.8 (param_0.1: f32[30,576,1536]) -> f32[576,1536] {
  %param_0.1 = f32[30,576,1536]{2,1,0} parameter(0)
  ROOT %ds = f32[576,1536]{1,0} bitcast(%param_0.1)
}

ENTRY %main (x: f32[256,576], w: f32[30,576,1536], y: f32[256,1536]) -> f32[576,1536] {
  %x = f32[256,576]{1,0} parameter(0)
  %w = f32[30,576,1536]{2,1,0} parameter(1)
  %y = f32[256,1536]{1,0} parameter(2)
  %ynn_fusion.1 = f32[256,1536]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.7
  %ynn_fusion.2 = f32[] fusion(%y), kind=kCustom, calls=%fused_computation.8
  %dynamic-slice_bitcast_fusion.3 = f32[576,1536]{1,0} fusion(%w), kind=kLoop, calls=%fused_computation.8
  %wrapped_broadcast.4 = f32[30,576,1536]{2,1,0} fusion(), kind=kLoop, calls=%fused_computation.8
  %while.5 = (s32[], f32[256,576]{1,0}) while(%x), condition=%c, body=%b
  ROOT %dot.6 = f32[576,1536]{1,0} dot(%x, %y), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}
"""


def test_hlo_ops_reads_shapes_and_dot_flops():
    ops = P.hlo_ops(HLO)
    assert ops["ynn_fusion.1"] == {"shape": "f32[256,1536]{1,0}", "flops": 2 * 256 * 576 * 1536}
    assert ops["dot.6"]["flops"] == 2 * 576 * 1536 * 256          # contracts dim 0 of x (256)
    assert ops["ynn_fusion.2"]["flops"] == 0 and ops["while.5"]["shape"] == "(tuple)"


@pytest.mark.parametrize("name,flops,expected", [
    ("ynn_fusion.1", 10, "products"), ("ynn_fusion.2", 0, "other ynn fusions"), ("dot.6", 0, "products"),
    ("dynamic-slice_bitcast_fusion.3", 0, "dynamic-slice"),
    ("bitcast_dynamic-update-slice_fusion.9", 0, "dynamic-update-slice"),
    ("wrapped_broadcast.4", 0, "zero-fill"), ("copy_bitcast_fusion.1", 0, "copy"), ("while.5", 0, "loop control"),
    ("multiply_add_fusion.54", 0, "other fusions")])
def test_kind(name, flops, expected):
    assert P.kind(name, flops) == expected


def test_summarize_shares_rates_and_host_time():
    events = [{"ph": "X", "name": "ynn_fusion.1", "dur": 4000.0}, {"ph": "X", "name": "ynn_fusion.1", "dur": 4000.0},
              {"ph": "X", "name": "wrapped_broadcast.4", "dur": 2000.0},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 1e6},          # runtime wrapper: dropped
              {"ph": "X", "name": "cond.97", "dur": 7e5},                          # a conditional's span: dropped
              {"ph": "X", "name": "cond_fusion.3", "dur": 0.0},                    # a fusion named cond_: kept
              {"ph": "X", "name": "PjitFunction(jit(step))", "dur": 500.0},       # not in the HLO: host
              {"ph": "i", "name": "dot.6", "dur": 9e9}]                            # not a complete event
    tot, cnt = P.op_times(events)
    assert "ThunkExecutor::Execute" not in tot and "dot.6" not in tot and cnt["ynn_fusion.1"] == 2
    assert "cond.97" not in tot and "cond_fusion.3" in tot
    res = P.summarize(tot, cnt, P.hlo_ops(HLO), steps=2, top=5)
    assert res["kinds"]["products"]["share"] == pytest.approx(0.8)
    assert res["kinds"]["zero-fill"]["ms_per_step"] == pytest.approx(1.0)
    assert res["op_ms_per_step"] == pytest.approx(5.0) and res["host_ms_per_step"] == pytest.approx(0.25)
    top = res["top"][0]
    assert top["op"] == "ynn_fusion.1" and top["calls_per_step"] == 1.0
    assert top["gflops"] == pytest.approx(2 * 256 * 576 * 1536 / 4e-3 / 1e9)


def test_plot_from_saved_summaries(tmp_path):
    tot, cnt = P.op_times([{"ph": "X", "name": "ynn_fusion.1", "dur": 4000.0},
                           {"ph": "X", "name": "wrapped_broadcast.4", "dur": 1000.0}])
    res = dict(P.summarize(tot, cnt, P.hlo_ops(HLO), steps=1), model="tiny", stage="kd", wall_s_per_step=0.01)
    f = tmp_path / "kd.json"
    f.write_text(__import__("json").dumps(res))
    assert P.main(["--plot", str(f), "--png", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(P.ConfigError, match="no such file"):
        P.main(["--plot", str(tmp_path / "nope.json"), "--png", str(tmp_path / "q.png")])
