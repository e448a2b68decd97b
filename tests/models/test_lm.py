"""The Llama / SSM LM: shapes, grads, rope layouts, cache decoding == full forward, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.config import preset
from marjax.errors import MarjaxError
from marjax.models.lm import (forward, forward_cached, init_cache, init_params, is_unrolled, unroll_cache,
                              unroll_layers)


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


@pytest.mark.parametrize("unrolled", [False, True], ids=["stacked", "unrolled"])
@pytest.mark.parametrize("name", ["tiny", "tiny-ssm"])
def test_cache_decode_equals_full_forward(name, unrolled):
    """Cached decoding (stacked params under the scan, or the unrolled decode layout with its
    per-layer cache) against the stacked full forward."""
    cfg = preset(name)
    p = init_params(jax.random.PRNGKey(0), cfg)
    ids = _ids(cfg, l=11)
    full, _ = forward(p, ids, cfg)
    if unrolled:
        p = unroll_layers(p)
        assert is_unrolled(p) and len(p.blocks) == cfg.n_layers and unroll_layers(p) is p
    cache = init_cache(cfg, 2, 16, unrolled=unrolled)
    step = jax.jit(forward_cached, static_argnames="cfg")
    out, cache = step(p, ids[:, :5], cache, cfg=cfg)
    outs = [out]
    for t in range(5, 11):
        out, cache = step(p, ids[:, t:t + 1], cache, cfg=cfg)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-ssm"])
def test_unrolled_forward_and_taps_equal_stacked(name):
    """The decode layout runs the same blocks in a Python loop: logits and the stacked (L, ...)
    taps equal the scan's; a cache in the other layout is refused."""
    cfg = preset(name)
    p = init_params(jax.random.PRNGKey(0), cfg)
    ids = _ids(cfg)
    u = unroll_layers(p)
    (lg, aux), (lg_u, aux_u) = forward(p, ids, cfg, taps=("prenorm",)), forward(u, ids, cfg, taps=("prenorm",))
    # two programs, so float32 sums in another order: a few ulps of logits up to ~20
    np.testing.assert_allclose(lg_u, lg, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(aux_u["prenorm"], aux["prenorm"], atol=2e-5, rtol=1e-5)
    assert aux_u["prenorm"].shape == (cfg.n_layers, 2, 2, 12, cfg.d_model)
    with pytest.raises(MarjaxError, match="layout"):
        forward_cached(u, ids[:, :3], init_cache(cfg, 2, 16), cfg)
    with pytest.raises(MarjaxError, match="layout"):
        forward_cached(p, ids[:, :3], init_cache(cfg, 2, 16, unrolled=True), cfg)


@pytest.mark.parametrize("name", ["tiny", "tiny-ssm"])
def test_stacked_prefill_then_unrolled_steps(name):
    """What `sampling.decode` does with stacked params: prefill under the scan, then unroll the
    params and the cache (`unroll_cache`) and decode token by token: equal to the full forward."""
    cfg = preset(name)
    p = init_params(jax.random.PRNGKey(0), cfg)
    ids = _ids(cfg, l=9)
    full, _ = forward(p, ids, cfg)
    out, cache = forward_cached(p, ids[:, :5], init_cache(cfg, 2, 16), cfg)
    u, cache = unroll_layers(p), unroll_cache(cache)
    assert len(cache["layers"]) == cfg.n_layers and unroll_cache(cache) is cache
    outs = [out]
    for t in range(5, 9):
        out, cache = forward_cached(u, ids[:, t:t + 1], cache, cfg)
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
