"""experiments/bench/paired_pytest.py: both sides run side by side on their own core with their
own environment, both core orders, and a failing side fails the comparison."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "bench"))
import paired_pytest  # noqa: E402

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pairs need two cores")

_PROBE = """
import os
def test_side():
    assert len(os.sched_getaffinity(0)) == 1          # pinned to one core
    assert os.environ["PAIR_SIDE"] in ("a", "b")
    assert os.environ["PAIR_SIDE"] != os.environ.get("PAIR_FAIL_ON")
"""


@pytest.fixture
def probe(tmp_path):
    f = tmp_path / "test_probe.py"
    f.write_text(_PROBE)
    return str(f)


def test_pairs_pin_swap_and_record(tmp_path, probe):
    out = tmp_path / "pairs.json"
    assert paired_pytest.main(["--a", "PAIR_SIDE=a", "--b", "PAIR_SIDE=b", "--json", str(out), "--", probe]) == 0
    rec = json.loads(out.read_text())
    assert [p["core_of_a"] for p in rec["pairs"]] == sorted(os.sched_getaffinity(0))[:2]   # a on each core
    for p in rec["pairs"]:
        assert p["b_over_a"] == pytest.approx(p["b_s"] / p["a_s"]) and "1 passed" in p["summary"]


def test_a_failing_side_fails_the_comparison(probe):
    with pytest.raises(SystemExit, match="side b failed"):
        paired_pytest.main(["--a", "PAIR_SIDE=a", "--b", "PAIR_SIDE=b", "--b", "PAIR_FAIL_ON=b", "--", probe])
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        paired_pytest.main(["--a", "NOEQUALS", "--", probe])
