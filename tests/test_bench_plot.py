"""`marjax bench plot`: the figure of a bench JSON shows that JSON's numbers (read back from the
drawn artists), every committed bench JSON draws, and bad input is refused by name."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from marjax.app.bench_plot import bench_kind, figure, plot_file
from marjax.cli import main
from marjax.errors import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(fig) -> dict:
    return {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}


def _close(fig):
    import matplotlib.pyplot as plt  # late import: matplotlib only for these tests
    plt.close(fig)


def test_decode_curve_draws_the_json_step_times():
    rec = json.loads((BENCH / "decode_curve_smollm2_q4.json").read_text())
    fig = figure(rec)
    try:
        lines = _lines(fig)
        for name, label in (("kv", "KV teacher"), ("ssm", "SSM student")):
            pts = rec["curve"][name]
            np.testing.assert_array_equal(lines[label].get_xdata(), [p["context"] for p in pts])
            np.testing.assert_allclose(lines[label].get_ydata(), [1e3 * p["step_s"] for p in pts])
        np.testing.assert_allclose(lines["KV / 3 (target)"].get_ydata(),
                                   [1e3 * p["step_s"] / 3 for p in rec["curve"]["kv"]])
    finally:
        _close(fig)


def test_step_bars_are_the_json_medians_and_peak_fractions():
    rec = json.loads((BENCH / "step_smollm2_heap.json").read_text())
    fig = figure(rec)
    try:
        ax_t, ax_p = fig.axes
        heights = [p.get_height() for p in ax_t.patches]
        n = len(rec["records"])
        teacher, student, step = heights[:n], heights[n:2 * n], heights[2 * n:3 * n]
        for r, t, s, st in zip(rec["records"], teacher, student, step):
            assert (t, s, st) == (r["times"]["teacher_fwd"]["median_s"], r["times"]["student_fwd_bwd"]["median_s"],
                                  r["times"]["step"]["median_s"])
        fracs = [p.get_height() for p in ax_p.patches]
        want = [r["peak_fraction_by_round"][k] for k in ("teacher_fwd", "student_fwd_bwd", "step")
                for r in rec["records"]]
        np.testing.assert_allclose(fracs, want)
    finally:
        _close(fig)


@pytest.mark.parametrize("name", ["ssd_cpu_4096_run6.json", "ssd_cpu_1024.json", "decode_smollm2_epyc_q8vnni.json",
                                  "eval_smollm2.json"] + [f"all_tiny/{k}.json" for k in
                                                          ("atmn", "decode", "eval", "ssd", "step")])
def test_committed_bench_jsons_draw(tmp_path, name):
    out = plot_file(BENCH / name, tmp_path)
    assert out == tmp_path / (Path(name).stem + ".png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_ssd_without_bench_field_is_read_as_ssd():
    rec = json.loads((BENCH / "ssd_cpu_1024.json").read_text())
    assert "bench" not in rec and bench_kind(rec) == "ssd"


def test_cli_writes_beside_the_json(tmp_path, capsys):
    src = tmp_path / "curve.json"
    shutil.copy(BENCH / "decode_curve_smollm2_q4.json", src)
    assert main(["bench", "plot", str(src)]) == 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG_MAGIC
    assert str(tmp_path / "curve.png") in capsys.readouterr().out


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("{not json", "is not JSON"),
    ('{"bench": "nope"}', "bench='nope'; plottable"),
    ('[1, 2]', "bench=None"),
    ('{"bench": "step", "records": [{"stage": "kd"}]}', "step record without the field 'times'"),
    ('{"bench": "decode"}', "none of 'curve', 'weights', 'llama_cpp'"),
])
def test_bad_input_is_refused_by_name(tmp_path, content, match):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        plot_file(path)
    assert str(path) in str(e.value)
    assert not (tmp_path / "r.png").exists()


def test_bench_all_plots_each_json(tmp_path):
    """`bench all --plot` runs the bench, then draws its JSON beside it (atmn: the fastest)."""
    assert main(["bench", "all", "--only", "atmn", "--json-dir", str(tmp_path), "--plot"]) == 0
    rec = json.loads((tmp_path / "atmn.json").read_text())
    assert rec["bench"] == "atmn" and rec["matmul_peak_gflops"] > 0
    assert (tmp_path / "atmn.png").read_bytes()[:8] == PNG_MAGIC

def test_bench_all_plot_needs_json_dir(capsys):
    assert main(["bench", "all", "--plot"]) == 1          # refused before any bench runs
    assert "give --json-dir" in capsys.readouterr().err
