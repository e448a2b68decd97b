"""Stage-1 init is exact where it should be; each stage's loss falls on a tiny run."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.config import DistillConfig, preset
from marjax.distill.init import init_from_attention
from marjax.distill.stages import make_loss, trainable_mask
from marjax.errors import ConfigError
from marjax.models.lm import init_params
from marjax.nn import mamba2


def _teacher():
    cfg = preset("tiny")
    return cfg, init_params(jax.random.PRNGKey(0), cfg)


def test_init_is_causal_linear_attention_without_decay():
    tcfg, tp = _teacher()
    scfg, sp = init_from_attention(tp, tcfg, decay_bias=-40.0)   # softplus(-40) ~ 4e-18: no decay
    layer = jax.tree.map(lambda a: a[0], sp.blocks.mixer)
    att = jax.tree.map(lambda a: a[0], tp.blocks.mixer)
    u = jax.random.normal(jax.random.PRNGKey(3), (2, 9, tcfg.d_model))
    y, _ = mamba2.mixer(layer, u, scfg.ssm)
    # unnormalised causal linear attention with the copied (un-rotated) weights, GQA heads repeated
    b, l, _ = u.shape
    hd, hq, rep = tcfg.head_dim, tcfg.n_heads, tcfg.n_heads // tcfg.n_kv_heads
    q = (u @ att.wq).reshape(b, l, hq, hd)
    k = jnp.repeat((u @ att.wk).reshape(b, l, tcfg.n_kv_heads, hd), rep, axis=2)
    v = jnp.repeat((u @ att.wv).reshape(b, l, tcfg.n_kv_heads, hd), rep, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((l, l)))
    ref = jnp.einsum("bhts,bshd->bthd", s, v).reshape(b, l, -1) @ att.wo
    np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-4)


def test_init_copies_everything_but_mixers():
    tcfg, tp = _teacher()
    scfg, sp = init_from_attention(tp, tcfg)
    assert scfg.is_ssm and scfg.ssm.n_heads == tcfg.n_heads
    np.testing.assert_array_equal(sp.embed, tp.embed)
    np.testing.assert_array_equal(sp.blocks.mlp.down, tp.blocks.mlp.down)
    np.testing.assert_array_equal(sp.blocks.mixer_norm, tp.blocks.mixer_norm)
    decay = np.exp(-jax.nn.softplus(sp.blocks.mixer.a_log_bias))
    assert np.all(decay > 0.98)


def _batch(cfg, b=4, l=16, seed=0):
    ids = jax.random.randint(jax.random.PRNGKey(seed), (b, l + 1), 0, cfg.vocab_size)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": jnp.ones((b, l), jnp.float32)}


@pytest.mark.parametrize("stage", ["orient", "align", "kd"])
def test_stage1_losses_fall(stage):
    import optax
    tcfg, tp = _teacher()
    scfg, sp = init_from_attention(tp, tcfg)
    loss_fn = make_loss(stage, tcfg, scfg, DistillConfig())
    mask = trainable_mask(sp, "mixer" if stage != "kd" else "all")
    batch = _batch(tcfg)
    opt = optax.masked(optax.adam(3e-3), mask)
    state = opt.init(sp)

    @jax.jit
    def step(p, s):
        (l, _), g = jax.value_and_grad(lambda p: (lambda r: (r[0] / r[1], r))(loss_fn(p, tp, batch, None)),
                                       has_aux=True)(p)
        g = jax.tree.map(lambda gi, m: gi if m else jnp.zeros_like(gi), g, mask)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    losses = []
    for _ in range(15):
        sp, state, l = step(sp, state)
        losses.append(float(l))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.9 * losses[0], losses
    if stage != "kd":  # MOHAWK steps 1-2 leave the MLPs alone
        np.testing.assert_array_equal(sp.blocks.mlp.up, tp.blocks.mlp.up)


@pytest.mark.parametrize("unrolled", [False, True])
def test_align_loss_matches_a_layer_by_layer_loop(unrolled):
    """The align stage's targets (the teacher's block outputs, read off its forward) against each
    teacher block run again, one layer after the other; loss and gradient, in both teacher layouts."""
    from marjax.distill.losses import hidden_alignment_loss
    from marjax.models.lm import block, unroll_layers
    tcfg, tp = _teacher()
    scfg, sp = init_from_attention(tp, tcfg)
    sp = dataclasses.replace(sp, blocks=jax.tree.map(   # students that differ from the teacher
        lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(7), a.shape, a.dtype), sp.blocks))
    batch = _batch(tcfg, b=2, l=12)
    batch["mask"] = batch["mask"].at[1, 8:].set(0.0)
    ids = batch["inputs"]
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
    n_layers = tcfg.n_layers

    def loop_loss(p):
        x = jnp.take(tp.embed, ids, axis=0)
        y_s, y_t = [], []
        for i in range(n_layers):
            t_layer = jax.tree.map(lambda a: a[i], tp.blocks)
            s_layer = jax.tree.map(lambda a: a[i], p.blocks)
            y_s.append(block(s_layer, x, scfg, pos)[0])
            x = block(t_layer, x, tcfg, pos)[0]
            y_t.append(x)
        s, c = hidden_alignment_loss(jnp.stack(y_s), jnp.stack(y_t), batch["mask"])
        return s / c

    loss_fn = make_loss("align", tcfg, scfg, DistillConfig())
    teacher = unroll_layers(tp) if unrolled else tp

    def stage_loss(p):
        s, c, _ = loss_fn(p, teacher, batch, None)
        return s / c

    want, g_want = jax.value_and_grad(loop_loss)(sp)
    got, g_got = jax.jit(jax.value_and_grad(stage_loss))(sp)
    assert float(want) > 1e-3   # the students differ from the teacher: a loss to match
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got.blocks.mixer), jax.tree.leaves(g_want.blocks.mixer)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_stage_config_errors():
    tcfg, tp = _teacher()
    scfg, _ = init_from_attention(tp, tcfg)
    with pytest.raises(ConfigError, match="spiking"):
        make_loss("sbds", scfg, scfg, DistillConfig())
    with pytest.raises(ConfigError, match="vocab"):
        make_loss("kd", tcfg, dataclasses.replace(scfg, vocab_size=300), DistillConfig())
    with pytest.raises(ConfigError, match="attention teacher"):
        make_loss("orient", scfg, scfg, DistillConfig())


def test_fit_mixer_scale_reduces_orientation_error():
    from marjax.distill.init import fit_mixer_scale
    from marjax.distill.losses import matrix_orientation_loss
    from marjax.models.lm import forward
    tcfg, tp = _teacher()
    scfg, sp = init_from_attention(tp, tcfg)
    ids = _batch(tcfg)["inputs"]

    def orient_err(p):
        _, aux = forward(tp, ids, tcfg, taps=("mixer_io", "attn"), head=False)
        M = jax.vmap(lambda m, u: mamba2.materialize(m, u, scfg.ssm))(p.blocks.mixer, aux["mixer_io"]["input"])
        s, c = matrix_orientation_loss(M, aux["attn"])
        return float(s / c)

    before = orient_err(sp)
    sp2 = fit_mixer_scale(sp, scfg, tp, tcfg, ids)
    after = orient_err(sp2)
    assert after < 0.8 * before, (before, after)
    # only the C columns of in_proj change
    np.testing.assert_array_equal(sp2.blocks.mixer.out_proj, sp.blocks.mixer.out_proj)
    d = scfg.ssm.d_inner + scfg.ssm.n_heads * scfg.ssm.state_dim
    np.testing.assert_array_equal(sp2.blocks.mixer.in_proj[..., :d], sp.blocks.mixer.in_proj[..., :d])


def test_token_grad_clip_binds_in_sbds_only():
    """distill.token_grad_clip caps per-token gradients inside the spiking student's forward in
    SBDS (the loss value is unchanged, the gradient changes when the cap binds) and is ignored by
    the other stages."""
    from marjax.config import ATMNConfig
    from marjax.models.spiking import make_spiking_student
    tcfg, tp = _teacher()
    scfg, sp = init_from_attention(tp, tcfg)
    batch = _batch(scfg, seed=5)
    pcfg, pp = make_spiking_student(sp, scfg, ATMNConfig(T=2, quantizer="round", init="stats"), batch["inputs"])
    on, off = DistillConfig(stage="sbds", token_grad_clip=1.0), DistillConfig(stage="sbds")

    def loss_and_grad(dcfg, stage, s_cfg, s_params, teacher, t_cfg):
        f = make_loss(stage, t_cfg, s_cfg, dataclasses.replace(dcfg, stage=stage))
        return jax.jit(jax.value_and_grad(lambda p: (lambda s, n, m: s / n)(*f(p, teacher, batch, None))))(s_params)

    (l_on, g_on), (l_off, g_off) = (loss_and_grad(d, "sbds", pcfg, pp, sp, scfg) for d in (on, off))
    np.testing.assert_allclose(float(l_on), float(l_off), rtol=1e-6)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off)))
    assert diff > 1e-6                              # a cap at the median binds on half the tokens
    (_, k_on), (_, k_off) = (loss_and_grad(d, "kd", scfg, sp, tp, tcfg) for d in (on, off))
    for a, b in zip(jax.tree.leaves(k_on), jax.tree.leaves(k_off)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
