"""The Llama / SSM LM: shapes, grads, rope layouts, cache decoding == full forward, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.config import preset
from marjax.errors import MarjaxError
from marjax.models.lm import forward, forward_cached, init_cache, init_params


def _ids(cfg, b=2, l=12, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, cfg.vocab_size)


@pytest.mark.parametrize("name", ["tiny", "tiny-ssm"])
def test_forward_shapes_and_grads(name):
    cfg = preset(name)
    p = init_params(jax.random.PRNGKey(0), cfg)
    ids = _ids(cfg)
    lg, aux = forward(p, ids, cfg, taps=("prenorm", "postnorm", "hidden"))
    assert lg.shape == (2, 12, cfg.vocab_size) and lg.dtype == jnp.float32
    assert aux["prenorm"].shape == (cfg.n_layers, 2, 2, 12, cfg.d_model)
    assert aux["hidden"].shape == (2, 12, cfg.d_model)

    def loss(p):
        lg, _ = forward(p, ids, cfg)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg[:, :-1]), ids[:, 1:, None], -1))
    g = jax.grad(loss)(p)
    leaves = jax.tree.leaves(g)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert sum(float(jnp.abs(x).sum()) for x in leaves) > 0


def test_causality():
    cfg = preset("tiny")
    p = init_params(jax.random.PRNGKey(0), cfg)
    ids = _ids(cfg)
    ids2 = ids.at[:, 8:].set((ids[:, 8:] + 1) % cfg.vocab_size)
    a, _ = forward(p, ids, cfg)
    b, _ = forward(p, ids2, cfg)
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-3


def _llamacpp_permute(w, n_heads):
    """HF rotate-half q/k columns -> llama.cpp adjacent-pair order (our weights are (in, out))."""
    d_in, out = w.shape
    hd = out // n_heads
    return w.reshape(d_in, n_heads, 2, hd // 2).swapaxes(2, 3).reshape(d_in, out)


def test_rope_layouts_agree_with_permuted_weights():
    cfg = preset("tiny")
    p = init_params(jax.random.PRNGKey(0), cfg)
    m = p.blocks.mixer
    perm = jax.vmap(_llamacpp_permute, in_axes=(0, None))
    p2 = dataclasses.replace(p, blocks=dataclasses.replace(p.blocks, mixer=dataclasses.replace(
        m, wq=perm(m.wq, cfg.n_heads), wk=perm(m.wk, cfg.n_kv_heads))))
    cfg2 = dataclasses.replace(cfg, rope_layout="pairs")
    ids = _ids(cfg)
    np.testing.assert_allclose(forward(p, ids, cfg)[0], forward(p2, ids, cfg2)[0], atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-ssm"])
def test_cache_decode_equals_full_forward(name):
    cfg = preset(name)
    p = init_params(jax.random.PRNGKey(0), cfg)
    ids = _ids(cfg, l=11)
    full, _ = forward(p, ids, cfg)
    cache = init_cache(cfg, 2, 16)
    step = jax.jit(forward_cached, static_argnames="cfg")
    out, cache = step(p, ids[:, :5], cache, cfg=cfg)
    outs = [out]
    for t in range(5, 11):
        out, cache = step(p, ids[:, t:t + 1], cache, cfg=cfg)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-4)


def test_bad_ids():
    cfg = preset("tiny")
    p = init_params(jax.random.PRNGKey(0), cfg)
    with pytest.raises(MarjaxError, match="out of range"):
        forward(p, jnp.full((1, 3), cfg.vocab_size), cfg)
    with pytest.raises(MarjaxError, match="empty"):
        forward(p, jnp.zeros((1, 0), jnp.int32), cfg)
    with pytest.raises(MarjaxError, match="shape"):
        forward(p, jnp.zeros((3,), jnp.int32), cfg)
