"""The example notebooks run top to bottom (nbclient + ipykernel, the [notebooks] extra) and
are committed without outputs."""
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
# Executing them takes minutes on a shared CPU (02: ~2 min wall under load), so execution is
# `slow`; the fast suite checks that they are stripped, their figures committed and their code
# cells compile.
FIGURES = {"01_smollm2_chat_and_logits.ipynb": ["smollm2_logits.png"],
           "02_ssd_atmn_in_your_model.ipynb": ["own_model_training.png"],
           "03_llama_to_ssm_to_spiking.ipynb": ["firing_rates.png", "energy_breakdown.png"]}


def test_notebooks_present_and_stripped():
    assert {p.name for p in NOTEBOOKS} == set(FIGURES)
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                    f"{path.name}: outputs not stripped (clear them before committing)"
                compile("".join(cell["source"]), f"{path.name}:{cell.get('id')}", "exec")
        for fig in FIGURES[path.name]:
            assert (ROOT / "docs" / fig).is_file(), f"docs/{fig} (made by {path.name}) is not committed"


def _run(path: Path, tmp_path: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    # run in a copy of examples/ next to a scratch docs/, so the committed figures are not rewritten
    work = tmp_path / "examples"
    work.mkdir()
    (tmp_path / "docs").mkdir()
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}}).execute()
    for fig in FIGURES[path.name]:
        assert (tmp_path / "docs" / fig).stat().st_size > 1000, f"{path.name} did not write {fig}"
    return time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    print(f"{path.name}: {_run(path, tmp_path):.0f} s")
