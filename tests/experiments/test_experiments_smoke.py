"""Smoke tests of the experiment scripts: each main() runs end to end on a tiny setup (1-layer d32
teacher, a few steps, 2 zero-shot items) and writes its table, JSON and plot.

The fast test runs one variant of the ladder, the grid and the main table: the same SBDS run
everywhere (the ladder's "+ pre-norm features" = the grid's (0.2, 0.7) = the main table's
spiking row), so after the shared setup only one spiking student is trained and the rest comes
from the cache. The slow test runs two variants of the ladder and of atmn_sweep (which pins its
own base, so it trains its own runs): orderings, the binary row, a real T sweep."""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import ablation_ladder, alpha_beta_grid, atmn_sweep, frontier, main_table  # noqa: E402
from experiments import common as C  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    return root / "runs", root / "results"


def _args(dirs, only):
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


@pytest.mark.slow   # 50 s of the fast suite's 8 minutes; the configs are checked fast (test_experiment_configs_parse)
def test_each_script_runs(dirs):
    assert ablation_ladder.main(_args(dirs, "+ pre-norm features")) == 0
    _, payload = _check_outputs(dirs[1], "ablation_ladder", 1)
    r = payload["results"]["+ pre-norm features"][0]
    assert 0.0 <= r["agreement"] <= 1.0 and r["kl"] >= 0.0 and 0.0 < r["firing_rate"] <= 1.0
    assert r["energy_pj_per_token"] > 0 and set(r["tasks"]) == {"piqa"}
    assert r["distill"]["feature"] == "prenorm" and r["atmn"]["T"] == 2 and r["atmn"]["quantizer"] == "round"

    # the other scripts reuse that run: identical numbers, read from the cache
    assert alpha_beta_grid.main(_args(dirs, "(0.2, 0.7)")) == 0
    _, grid = _check_outputs(dirs[1], "alpha_beta_grid", 1)
    assert grid["results"]["(0.2, 0.7)"][0]["ppl"] == r["ppl"]
    assert main_table.main(_args(dirs, "spiking student (MAR)")) == 0
    _, main = _check_outputs(dirs[1], "main_table", 3)
    assert list(main["results"]) == ["teacher", "dense SSM", "spiking student (MAR)"]
    assert "firing_rate" not in main["results"]["teacher"][0]
    assert main["results"]["spiking student (MAR)"][0]["ppl"] == r["ppl"]


@pytest.mark.slow
def test_two_variant_scripts(dirs):
    assert ablation_ladder.main(_args(dirs, "binary spikes;+ ATMN (ternary)")) == 0
    md, payload = _check_outputs(dirs[1], "ablation_ladder", 2)
    assert payload["results"]["binary spikes"][0]["atmn"]["ternary"] is False
    assert payload["results"]["+ ATMN (ternary)"][0]["atmn"]["ternary"] is True
    assert "binary spikes -> + ATMN (ternary)" in md
    assert atmn_sweep.main(_args(dirs, "T=2;T=4")) == 0
    md, payload = _check_outputs(dirs[1], "atmn_sweep", 2)
    assert [r[0]["atmn"]["T"] for r in payload["results"].values()] == [2, 4]
    # the ATMN sweep pins its own base (floor quantizer): different runs from the ladder's
    s4 = payload["results"]["T=4"][0]
    assert s4["atmn"]["quantizer"] == "floor" and 0.0 <= s4["agreement"] <= 1.0
    assert "## T (tau 1, readout ones)" in md


def test_only_rejects_unknown_variant(dirs):
    from marjax.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown variants"):
        ablation_ladder.main(_args(dirs, "no such row"))


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


def test_experiment_configs_parse():
    """The shipped configs parse, and the rows the scripts compare share their SBDS run."""
    cfgs = {n: C.load_experiment(str(C.ROOT / "configs" / f"{n}.toml"))
            for n in ("ablation_ladder", "alpha_beta_grid", "atmn_sweep", "main_table", "frontier")}
    v = {(n, x.name): x for n, e in cfgs.items() for x in e.variants}
    mar = v[("ablation_ladder", "+ pre-norm features")]
    # the ladder, the grid, the main table and the frontier's chosen default are one run
    for other in (("alpha_beta_grid", "(0.2, 0.7)"), ("main_table", "spiking student (MAR)"),
                  ("frontier", "round, T=2, reset full, rate 1 -> 0.1")):
        assert (v[other].atmn, v[other].distill) == (mar.atmn, mar.distill), other
    # ... and it is the pipelines' stage-2 coder (PIPELINE_ATMN / PIPELINE_DISTILL), but for the
    # per-token gradient cap against the SBDS gradient explosion that the pipelines add (the tables
    # were made before it); the frontier has that coder's own row. The SmolLM2 preset then lowers
    # the rate weight to 0.25 (its better kd-100 SSM; experiments/README.md, "The default pipeline")
    from marjax.app.pipeline import PIPELINE_ATMN, PIPELINE_DISTILL, PIPELINES
    assert mar.atmn == PIPELINE_ATMN
    assert dataclasses.replace(mar.distill, token_grad_clip=PIPELINE_DISTILL.token_grad_clip) == PIPELINE_DISTILL
    assert (mar.distill.token_grad_clip, PIPELINE_DISTILL.token_grad_clip) == (0.0, 8.0)
    row = v[("frontier", "round, T=2, reset full, rate 1 -> 0.1, token clip 8")]
    assert (row.atmn, row.distill) == (PIPELINE_ATMN, PIPELINE_DISTILL)
    pipe = PIPELINES["smollm2"]
    assert pipe.atmn == PIPELINE_ATMN and pipe.distill == dataclasses.replace(PIPELINE_DISTILL, rate_weight=0.25)
    # the ATMN sweep pins its own base (T 4, floor): its T sweep includes that base point
    assert v[("atmn_sweep", "T=4")].atmn == cfgs["atmn_sweep"].variants[2].atmn
    assert v[("ablation_ladder", "binary spikes")].atmn.ternary is False
    assert all(len(e.seeds) == 3 for n, e in cfgs.items() if n != "frontier")


def test_frontier_marks_the_pipelines_own_row():
    """The frontier's "default" row is the one whose ATMN and SBDS configs are the pipeline's
    (every field but the stage name), whatever its name; no row matches when one field differs."""
    from marjax.app.pipeline import PIPELINE_ATMN, PIPELINE_DISTILL
    atmn = json.loads(json.dumps(dataclasses.asdict(PIPELINE_ATMN)))
    distill = dict(json.loads(json.dumps(dataclasses.asdict(PIPELINE_DISTILL))), stage="sbds")
    res = {"a": [{"atmn": dict(atmn, T=4), "distill": distill}],
           "b": [{"atmn": atmn, "distill": dict(distill, rate_weight=0.0)}],
           "c": [{"atmn": atmn, "distill": distill}]}
    assert frontier.pipeline_row(res) == "c"
    res["c"][0]["atmn"] = dict(atmn, sites=tuple(atmn["sites"]))     # as a freshly trained row holds it
    assert frontier.pipeline_row(res) == "c"
    del res["c"]
    assert frontier.pipeline_row(res) == ""
