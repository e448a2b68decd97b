"""experiments/kd_sensitivity.py: the one-ulp perturbation and the pinned config it reads."""
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments import kd_sensitivity as K  # noqa: E402
from marjax.errors import ConfigError  # noqa: E402


def test_perturb_moves_each_float_weight_by_one_ulp_and_nothing_else():
    tree = {"w": jnp.linspace(-3.0, 5.0, 4097, dtype=jnp.float32), "ids": jnp.arange(7, dtype=jnp.int32)}
    assert K.perturb(tree, 0) is tree
    out = K.perturb(tree, 1)
    w, pw = np.asarray(tree["w"]), np.asarray(out["w"])
    nz = w != 0
    rel = (pw[nz] - w[nz]) / w[nz]
    # one float32 step of relative size 2^-23 (a value's ulp is 2^-23..2^-24 of it): rounded to
    # the neighbouring float or back onto itself, never further
    steps = np.abs(pw[nz].view(np.int32) - w[nz].view(np.int32))
    assert steps.max() <= 2 and np.abs(rel).max() <= 2.0 ** -22
    assert (steps > 0).mean() > 0.4                       # most weights move
    assert (rel > 0).mean() > 0.3 and (rel < 0).mean() > 0.3   # both signs
    np.testing.assert_array_equal(np.asarray(out["ids"]), np.asarray(tree["ids"]))
    assert not np.array_equal(pw, np.asarray(K.perturb(tree, 2)["w"]))   # seeds differ


def test_the_committed_config_pins_the_pipeline_stage_one(tmp_path):
    pc, variants, perts = K.load(str(ROOT / "experiments/configs/kd_sensitivity.toml"))
    assert (pc.train.lr, pc.train.clip_norm, pc.train.batch_tokens, pc.kd.steps) == (3e-4, 1.0, 256, 100)
    assert [v["name"] for v in variants][0] == "base" and perts == [0, 1, 2]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[variant]]\nname = "x"\nlr = 1.0\n')
    with pytest.raises(ConfigError, match="known keys"):
        K.load(str(bad))
    bad.write_text("[train]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match="no \\[\\[variant\\]\\]"):
        K.load(str(bad))
    bad.write_text('[train]\nlearning_rate = 1e-3\n[[variant]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="learning_rate"):
        K.load(str(bad))
