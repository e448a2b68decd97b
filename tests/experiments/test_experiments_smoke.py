"""Smoke tests of the issue-7 experiment scripts: each main() runs end to end on a tiny setup
(1-layer d32 teacher, a few steps, 2 zero-shot items) and writes its table, JSON and plot."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import ablation_ladder, alpha_beta_grid, atmn_sweep, main_table  # noqa: E402
from experiments import common as C  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    return root / "runs", root / "results"


def _args(dirs, only):
    """Smoke flags; `only` picks variants so that the scripts share most runs through the cache
    (main's spiking row = grid's (0.2, 0.7) = sweep's T=4; main's binary row = the ladder's)."""
    runs, results = dirs
    return ["--smoke", "--runs-dir", str(runs), "--results-dir", str(results), "--only", only]


def _check_outputs(results: Path, stem: str, n_rows: int):
    md = (results / f"{stem}.md").read_text()
    payload = json.loads((results / f"{stem}.json").read_text())
    assert (results / f"{stem}.png").stat().st_size > 1000
    assert md.count("\n| ") >= n_rows + 1          # header + rows
    for rows in payload["results"].values():
        for r in rows:
            assert np.isfinite(r["ppl"]) and r["ppl"] > 1.0
    return md, payload


def test_ladder_and_cache(dirs):
    assert ablation_ladder.main(_args(dirs, "binary spikes;+ ATMN (ternary)")) == 0
    md, payload = _check_outputs(dirs[1], "ablation_ladder", 2)
    r = payload["results"]["binary spikes"][0]
    assert 0.0 <= r["agreement"] <= 1.0 and r["kl"] >= 0.0 and 0.0 <= r["firing_rate"] <= 1.0
    assert r["atmn"]["ternary"] is False and payload["results"]["+ ATMN (ternary)"][0]["atmn"]["ternary"] is True
    assert "binary spikes -> + ATMN (ternary)" in md
    # a second run reuses the cached runs and metrics: identical numbers
    assert ablation_ladder.main(_args(dirs, "binary spikes;+ ATMN (ternary)")) == 0
    again = json.loads((dirs[1] / "ablation_ladder.json").read_text())
    assert again["results"]["binary spikes"][0]["ppl"] == r["ppl"]


def test_grid_and_sweep(dirs):
    assert alpha_beta_grid.main(_args(dirs, "(0.2, 0.7)")) == 0
    _check_outputs(dirs[1], "alpha_beta_grid", 1)
    assert atmn_sweep.main(_args(dirs, "T=2;T=4")) == 0
    md, payload = _check_outputs(dirs[1], "atmn_sweep", 2)
    assert [r[0]["atmn"]["T"] for r in payload["results"].values()] == [2, 4]
    assert "## T (tau 2, readout ones)" in md


def test_main_table(dirs):
    assert main_table.main(_args(dirs, "spiking student (MAR);binary-spike baseline")) == 0
    md, payload = _check_outputs(dirs[1], "main_table", 4)
    assert list(payload["results"]) == ["teacher", "dense SSM", "spiking student (MAR)", "binary-spike baseline"]
    assert "firing_rate" not in payload["results"]["teacher"][0]


def test_agreement_and_kl_oracle():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(3, 5, 7))
    s = rng.normal(size=(3, 5, 7))
    agree, kl = C.agreement_and_kl(s, t)
    p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    q = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    assert np.isclose(kl, np.mean(np.sum(p * np.log(p / q), -1)))
    assert agree == np.mean(t.argmax(-1) == s.argmax(-1))
    assert C.agreement_and_kl(t, t) == (1.0, pytest.approx(0.0, abs=1e-12))


def test_aggregate_and_compare():
    rows = {"a": [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}], "b": [{"x": 5.0}, {"x": 5.5}, {"x": 6.0}]}
    assert C.aggregate(rows["a"], "x") == (2.0, 1.0, 3)
    txt, better, beyond = C.compare(rows, "a", "b", "x", higher_is_better=True)
    assert better and beyond            # diff 3.5 > sqrt(1 + 0.25)
    _, better, _ = C.compare(rows, "a", "b", "x", higher_is_better=False)
    assert not better
    assert C.fmt_pm(rows["a"], "x", 1) == "2.0 ± 1.0"
