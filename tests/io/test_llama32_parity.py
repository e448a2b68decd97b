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


@pytest.mark.parametrize("variant", ["llama3", "llama3_short", "linear"])
def test_rope_scaling_survives_gguf(tmp_path, variant):
    """save_gguf writes the scaling as llama.cpp does (rope_freqs divisors, or linear type +
    factor); load_gguf reads it back as the same RopeScaling and the same logits past 1000."""
    from marjax.io.gguf import load_gguf, save_gguf
    ref = np.load(DATA / f"reference_{variant}.npz")
    cfg, params = _load(tmp_path, variant)
    save_gguf(tmp_path / "m.gguf", cfg, params, qtype="F32")
    cfg2, params2, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg2.rope_scaling == cfg.rope_scaling
    late = ref["positions"] >= 1000
    ours = _logits(cfg2, params2, ref["ids"])[ref["positions"][late]]
    np.testing.assert_allclose(ours, ref["logits"][late], atol=1e-3, rtol=0)


def test_gguf_rope_freqs_and_refusals():
    """Per-frequency factors that match no named type are kept exactly; yarn is refused."""
    from marjax.io.gguf import gguf_config
    from marjax.errors import CheckpointError

    class T:   # a ReaderTensor stand-in: F32 data
        def __init__(self, a):
            import gguf
            self.data, self.tensor_type, self.name, self.shape = a, gguf.GGMLQuantizationType.F32, "rope_freqs.weight", a.shape
    fields = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.block_count": 2, "llama.feed_forward_length": 96,
              "llama.vocab_size": 128}
    f = np.linspace(1.0, 3.0, 8).astype(np.float32)
    cfg = gguf_config(fields, {"rope_freqs.weight": T(f)})
    assert cfg.rope_scaling.rope_type == "freq_factors" and cfg.rope_scaling.freq_factors == tuple(f.tolist())
    from marjax.nn.layers import rope_inv_freq
    plain = np.asarray(rope_inv_freq(16, cfg.rope_theta))
    np.testing.assert_allclose(np.asarray(rope_inv_freq(16, cfg.rope_theta, cfg.rope_scaling)), plain / f, rtol=1e-6)
    with pytest.raises(CheckpointError, match="yarn"):
        gguf_config({**fields, "llama.rope.scaling.type": "yarn"}, {})
    with pytest.raises(CheckpointError, match="head_dim // 2"):
        gguf_config(fields, {"rope_freqs.weight": T(f[:5])})
