"""`marjax convert` writes an SSM directory that loads back to the same (converted) model."""
import jax.numpy as jnp
import numpy as np

import marjax
from marjax.cli import main
from marjax.app.recipe import Recipe
from marjax.distill.init import init_from_attention


def test_convert_round_trip(tmp_path):
    out = tmp_path / "ssm"
    assert main(["convert", "--model", "tiny", "--out", str(out)]) == 0
    m = marjax.load(str(out))
    t = marjax.load("tiny")
    # convert's default decay bias is the pipeline recipe's (one recipe everywhere)
    scfg, sp = init_from_attention(t.params, t.config, decay_bias=Recipe().decay_bias)
    assert m.config.is_ssm and m.config.ssm == scfg.ssm
    ids = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(marjax.logits(m, ids), marjax.logits(marjax.Model(scfg, sp, t.tokenizer), ids),
                               atol=1e-5)
