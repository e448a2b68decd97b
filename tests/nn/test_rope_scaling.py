"""RoPE scaling: inverse frequencies against an independent float64 transcription of llama.cpp's
convert_hf_to_gguf llama3 factors (written per frequency, with its own branch order), linear
scaling, config validation and round trips."""
import math

import numpy as np
import pytest

from marjax.config import ModelConfig, RopeScaling, model_config_from_dict, preset, replace, to_dict
from marjax.errors import ConfigError
from marjax.nn.layers import rope_inv_freq


def _llamacpp_factors(hd, theta, factor, lo, hi, old):
    out = []
    for i in range(0, hd, 2):
        freq = 1.0 / theta ** (i / hd)
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out)


@pytest.mark.parametrize("hd,theta,rs", [
    (64, 500000.0, RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),     # Llama 3.2
    (128, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),     # Llama 3.1
    (16, 10000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 256)),
])
def test_llama3_matches_llamacpp_factors(hd, theta, rs):
    plain = np.asarray(rope_inv_freq(hd, theta), np.float64)
    scaled = np.asarray(rope_inv_freq(hd, theta, rs), np.float64)
    want = _llamacpp_factors(hd, theta, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                             rs.original_max_position_embeddings)
    np.testing.assert_allclose(plain / scaled, want, rtol=2e-6)
    assert (want == 1.0).any() and (want == rs.factor).any()          # all three bands present
    assert ((want > 1.0) & (want < rs.factor)).any()


def test_linear_and_none():
    plain = np.asarray(rope_inv_freq(16, 10000.0))
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(16, 10000.0, RopeScaling("linear", 4.0))), plain / 4,
                               rtol=1e-7)


def test_config_validation_and_round_trip():
    cfg = preset("llama-3.2-1b")
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    hash(cfg)                                                        # static under jit
    assert model_config_from_dict(to_dict(cfg)) == cfg
    ff = replace(preset("tiny"), rope_scaling=RopeScaling("freq_factors", 1.0, freq_factors=(1.0,) * 8))
    assert model_config_from_dict(to_dict(ff)) == ff.validate()
    for bad, msg in [(RopeScaling("yarn"), "rope_type"),
                     (RopeScaling("llama3", low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor"),
                     (RopeScaling("linear", factor=0.0), "factor"),
                     (RopeScaling("freq_factors", freq_factors=(1.0,) * 3), "head_dim // 2"),
                     ({"rope_type": "llama3"}, "RopeScaling or None")]:
        with pytest.raises(ConfigError, match=msg):
            ModelConfig(rope_scaling=bad).validate()
