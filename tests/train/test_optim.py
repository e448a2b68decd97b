"""The fused AdamW against the optax chain it replaces (clipping on and off, decayed and
undecayed leaves, the warmup + cosine schedule, frozen leaves), and the one-pass claim."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from marjax.config import TrainConfig, preset
from marjax.errors import ConfigError
from marjax.models.lm import init_params
from marjax.train.optim import AdamWState, decay_mask, fused_adamw, make_optimizer


def _run(tx, params, grads_seq):
    state = tx.init(params)
    upd = jax.jit(tx.update)
    for g in grads_seq:
        u, state = upd(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("clip_norm, grad_scale", [(1.0, 10.0), (0.0, 1e-4)])
def test_fused_adamw_matches_the_optax_chain(clip_norm, grad_scale):
    tc = TrainConfig(lr=3e-3, warmup=2, steps=6, clip_norm=clip_norm, weight_decay=0.1)
    params = init_params(jax.random.PRNGKey(0), preset("tiny-ssm"))
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    leaves, tdef = jax.tree.flatten(params)
    grads_seq = [jax.tree.unflatten(tdef, [grad_scale * jax.random.normal(jax.random.fold_in(k, i), x.shape)
                                           for i, x in enumerate(leaves)]) for k in keys]
    want_p, want_s = _run(make_optimizer(tc, params, impl="optax"), params, grads_seq)
    got_p, got_s = _run(make_optimizer(tc, params), params, grads_seq)
    assert isinstance(got_s, AdamWState) and int(got_s.count) == 6
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), want_p, params)
    assert min(jax.tree.leaves(moved)) > 0          # every leaf was updated (a test that can fail)
    # the same formulas to float32 rounding (6 steps; Adam's 1 / sqrt(nu) amplifies ulps a little)
    for name, want, got in (("params", want_p, got_p), ("mu", want_s[-1][0].mu, got_s.mu),
                            ("nu", want_s[-1][0].nu, got_s.nu)):
        jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7, err_msg=name), want, got)


def test_weight_decay_only_on_matrices_and_frozen_leaves_untouched():
    tc = TrainConfig(lr=1e-2, warmup=0, steps=3, weight_decay=0.5)
    params = init_params(jax.random.PRNGKey(0), preset("tiny-ssm"))
    zero = jax.tree.map(jnp.zeros_like, params)
    # zero gradients: only weight decay moves a param, and only a decayed one
    got, _ = _run(make_optimizer(tc, params), params, [zero])
    dm = decay_mask(params)
    jax.tree.map(lambda m, a, b: (np.testing.assert_array_less(np.abs(a) - 1e-12, np.abs(b) + (0 if m else 1e-30))
                                  if m else np.testing.assert_array_equal(a, b)), dm, got, params)
    frozen = jax.tree.map(lambda _: False, params)
    frozen = frozen.__class__(**{**frozen.__dict__, "final_norm": True})
    ones = jax.tree.map(jnp.ones_like, params)
    got, state = _run(make_optimizer(tc, params, frozen), params, [ones])
    assert not np.array_equal(got.final_norm, params.final_norm)
    np.testing.assert_array_equal(got.embed, params.embed)


def test_unknown_impl_is_refused():
    with pytest.raises(ConfigError, match="must be one of"):
        make_optimizer(TrainConfig(), {"w": jnp.ones((2, 2))}, impl="sgd")


def test_fused_adamw_needs_params():
    tx = fused_adamw(lambda c: 1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, decay_mask=decay_mask)
    p = {"w": jnp.ones((2, 2))}
    with pytest.raises(ConfigError, match="needs the params"):
        tx.update(p, tx.init(p))


def test_fused_adamw_clips_with_a_given_grad_norm():
    """The train step hands its grad norm to the update (no second sum over the gradients):
    the same update as the norm computed inside, and a different one for a different norm."""
    tc = TrainConfig(lr=1e-2, warmup=0, steps=3, clip_norm=0.5, weight_decay=0.1)
    params = init_params(jax.random.PRNGKey(0), preset("tiny-ssm"))
    tx = make_optimizer(tc, params)
    grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
    norm = optax.global_norm(grads)
    state = tx.init(params)
    inside, _ = jax.jit(tx.update)(grads, state, params)
    given, _ = jax.jit(lambda g, s, p, n: tx.update(g, s, p, grad_norm=n))(grads, state, params, norm)
    other, _ = jax.jit(lambda g, s, p, n: tx.update(g, s, p, grad_norm=n))(grads, state, params, 4 * norm)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), inside, given)
    # clipping scales g by clip / norm; Adam's first step normalises that away, except against eps
    # and the decay term, so a 4x larger norm moves the decayed leaves' updates measurably
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), inside, other)
    assert max(jax.tree.leaves(diffs)) > 0
