"""`marjax pipeline --preset tiny` end to end (CI runs it in the fast suite), with its models
bounded against their teachers, and the pipeline's config file / overrides."""
import json

import pytest

from marjax.app.pipeline import PIPELINES, PipelineConfig
from marjax.app.runner import apply_sections, load_config, read_toml
from marjax.cli import main
from marjax.errors import ConfigError
from marjax.train.checkpoint import Checkpointer


def test_tiny_pipeline_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    assert main(["pipeline", "--preset", "tiny", "--out", str(out), "--quiet", "sbds.steps=60"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert set(res["models"]) == {"teacher", "ssm", "spiking"}
    ppl = {n: res["models"][n]["ppl"]["token_ppl"] for n in ("teacher", "ssm", "spiking")}
    # a byte-level teacher trained 150 steps is far below uniform (256); its students stay close
    assert ppl["teacher"] < 20.0
    assert ppl["ssm"] < 1.5 * ppl["teacher"], ppl
    assert ppl["spiking"] < 2.0 * ppl["ssm"], ppl
    assert res["ppl_ratio_spiking_vs_ssm"] == pytest.approx(ppl["spiking"] / ppl["ssm"])
    assert 0.0 < res["models"]["spiking"]["firing_rate"] < 1.0
    assert res["models"]["spiking"]["energy_ratio_vs_teacher"] < 1.0
    # the resolved config is recorded, the override included
    assert res["config"]["sbds"]["steps"] == 60 and res["config"]["atmn"]["reset_grad"] == "full"
    assert res["steps"]["sbds"] == 60
    for f in ("README.md", "loss_curves.png", "firing_rates.png", "energy.json", "energy.png"):
        assert (out / f).is_file(), f
    for stage in ("pretrain", "kd", "sbds"):
        hist = [json.loads(l) for l in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert hist[-1]["loss"] < hist[0]["loss"], stage
    # every stage's last checkpoint (written in the background) is on disk, without Adam moments
    for stage, steps in res["steps"].items():
        with Checkpointer(out / stage, read_only=True, async_save=False) as ck:
            assert ck.latest_step() == steps and not ck.has_opt_state(), stage
    # --resume finds every stage finished: nothing retrains, the same models evaluate the same
    mtimes = {st: (out / st / "metrics.jsonl").stat().st_mtime_ns for st in res["steps"]}
    assert main(["pipeline", "--preset", "tiny", "--out", str(out), "--quiet", "sbds.steps=60", "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert {n: again["models"][n]["ppl"]["token_ppl"] for n in ppl} == ppl
    assert {st: (out / st / "metrics.jsonl").stat().st_mtime_ns for st in res["steps"]} == mtimes


def test_pipeline_config_file_and_overrides(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[atmn]\nT = 2\nquantizer = "round"\n[distill]\nrate_weight = 0.5\nrate_target = 0.1\n'
                 '[sbds]\nsteps = 7\n[train]\nlr = 0.001\n')
    pc = load_config(PIPELINES["tiny"], str(f), ["atmn.tau=0.5", "recipe.align_lr=2"])
    assert isinstance(pc, PipelineConfig)
    assert (pc.atmn.T, pc.atmn.quantizer, pc.atmn.tau) == (2, "round", 0.5)
    assert (pc.distill.rate_weight, pc.sbds.steps, pc.train.lr, pc.recipe.align_lr) == (0.5, 7, 0.001, 2.0)
    assert pc.train.seq_len == PIPELINES["tiny"].train.seq_len            # untouched fields keep the preset's
    pc.validate()
    with pytest.raises(ConfigError, match="unknown config key 'Tee'"):
        load_config(PIPELINES["tiny"], None, ["atmn.Tee=2"])
    with pytest.raises(ConfigError, match="reset_grad"):
        load_config(PIPELINES["tiny"], None, ["atmn.reset_grad=sometimes"]).validate()
    with pytest.raises(ConfigError, match="sbds.steps"):
        load_config(PIPELINES["tiny"], None, ["sbds.steps=0"]).validate()


def test_read_toml_and_apply_sections(tmp_path):
    """The two halves of load_config that scripts with tables of their own (experiments/) call."""
    f = tmp_path / "p.toml"
    f.write_text('[atmn]\nT = 3\n[[variant]]\nname = "x"\n')
    data = read_toml(f)
    assert data == {"atmn": {"T": 3}, "variant": [{"name": "x"}]}
    del data["variant"]
    pc = apply_sections(PIPELINES["tiny"], data)
    assert pc.atmn.T == 3 and pc.atmn.tau == PIPELINES["tiny"].atmn.tau
    with pytest.raises(ConfigError, match="unknown config key 'variant'"):
        apply_sections(PIPELINES["tiny"], {"variant": [{"name": "x"}]})
    with pytest.raises(ConfigError, match="config file not found"):
        read_toml(tmp_path / "missing.toml")
    f.write_text("[atmn\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_toml(f)
