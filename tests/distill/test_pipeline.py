"""`marjax pipeline --preset tiny` end to end (CI runs it in the fast suite)."""
import json

from marjax.cli import main


def test_tiny_pipeline_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    assert main(["pipeline", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert set(res["models"]) == {"teacher", "ssm", "spiking"}
    for name in ("teacher", "ssm", "spiking"):
        assert res["models"][name]["ppl"]["token_ppl"] > 1.0
    assert 0.0 < res["models"]["spiking"]["firing_rate"] < 1.0
    for f in ("README.md", "loss_curves.png", "firing_rates.png", "energy.json", "energy.png"):
        assert (out / f).is_file(), f
    # each stage's loss fell
    for stage in ("pretrain", "kd", "sbds"):
        hist = [json.loads(l) for l in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert hist[-1]["loss"] < hist[0]["loss"], stage
