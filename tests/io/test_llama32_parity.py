"""Llama-3.2-shaped parity with transformers (float32) at positions past 1000, where RoPE
scaling matters: a tiny random checkpoint (tied embeddings, GQA, bf16 weights, the hub's
config.json spelling) and reference logits made once by tests/io/make_llama32_reference.py
(torch + transformers in a separate venv); this test needs neither."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from marjax.config import RopeScaling, replace
from marjax.io.hf import load_hf
from marjax.models.lm import forward

DATA = Path(__file__).parents[1] / "data" / "llama32_tiny"
VARIANTS = {"llama3": "config.json", "llama3_short": "config_llama3_short.json", "linear": "config_linear.json"}


def _load(tmp_path, variant):
    d = tmp_path / variant
    d.mkdir()
    shutil.copy(DATA / "model.safetensors", d / "model.safetensors")
    shutil.copy(DATA / VARIANTS[variant], d / "config.json")
    cfg, params, _ = load_hf(str(d))
    return cfg, params


def _logits(cfg, params, ids):
    return np.asarray(jax.jit(lambda p, x: forward(p, x, cfg)[0])(params, ids[None]))[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_past_1000(tmp_path, variant):
    ref = np.load(DATA / f"reference_{variant}.npz")
    cfg, params = _load(tmp_path, variant)
    conf = json.loads((DATA / VARIANTS[variant]).read_text())
    kind = conf["rope_scaling"].get("rope_type", conf["rope_scaling"].get("type"))
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == kind
    assert cfg.tie_embeddings and params.lm_head is None and cfg.n_kv_heads < cfg.n_heads
    pos = ref["positions"]
    assert len(ref["ids"]) > 1000 and (pos >= 1000).sum() >= 64
    ours = _logits(cfg, params, ref["ids"])[pos]
    np.testing.assert_allclose(ours, ref["logits"], atol=1e-3, rtol=0)
    # the check can tell: plain RoPE (the old behaviour) misses the reference past 1000
    plain = _logits(replace(cfg, rope_scaling=None), params, ref["ids"])[pos]
    late = pos >= 1000
    assert np.abs(plain[late] - ref["logits"][late]).max() > 1e-2


def test_rope_scaling_round_trips_through_save_hf(tmp_path):
    from marjax.io.hf import read_config, save_hf
    cfg, params = _load(tmp_path, "llama3")
    save_hf(tmp_path / "out", cfg, params)
    conf = read_config(str(tmp_path / "out"))
    assert conf["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    del conf["marjax"]   # read back through the plain Llama path (what transformers reads)
    (tmp_path / "out" / "config.json").write_text(json.dumps(conf))
    cfg2, _, _ = load_hf(str(tmp_path / "out"))
    assert cfg2.rope_scaling == cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
