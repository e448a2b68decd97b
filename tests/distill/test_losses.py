"""Distillation losses against numpy / dense oracles: chunked KL (values and grads), KL
directions, masking, top-k, feature / alignment / orientation losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.distill.losses import (chunked_kd_loss, dense_kd_loss, feature_loss, hidden_alignment_loss,
                                   kd_from_topk, matrix_orientation_loss)
from marjax.errors import MarjaxError

B, L, D, V = 2, 11, 8, 19   # L deliberately not a multiple of the chunk sizes used


def _inputs(seed=0, scale=1.5):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    ht = jax.random.normal(k[0], (B, L, D))
    hs = jax.random.normal(k[1], (B, L, D))
    wt = scale * jax.random.normal(k[2], (D, V)) / np.sqrt(D)
    ws = scale * jax.random.normal(k[3], (D, V)) / np.sqrt(D)
    mask = (jax.random.uniform(k[4], (B, L)) > 0.3).astype(jnp.float32)
    return ht, hs, wt, ws, mask


def _np_kl(zp, zq, T=1.0):
    """numpy float64 KL(p||q) per token from logits."""
    def logsm(z):
        z = np.asarray(z, np.float64) / T
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logsm(zp), logsm(zq)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.parametrize("chunk", [4, 5, 128])
def test_chunked_equals_dense_values_and_grads(chunk):
    ht, hs, wt, ws, mask = _inputs()
    tg = jax.random.randint(jax.random.PRNGKey(9), (B, L), 0, V)
    kw = dict(alpha=0.2, beta=0.7, temperature=1.7, ce_targets=tg, ce_weight=0.3)

    def chunked(hs, ws):
        s, n, _ = chunked_kd_loss(ht, hs, wt, ws, mask, chunk=chunk, **kw)
        return s / n

    def dense(hs, ws):
        s, n, _ = dense_kd_loss(ht @ wt, hs @ ws, mask, **kw)
        return s / n

    vc, gc = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hs, ws)
    vd, gd = jax.value_and_grad(dense, argnums=(0, 1))(hs, ws)
    np.testing.assert_allclose(vc, vd, rtol=1e-5)
    for a, b in zip(gc, gd):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    _, _, m = chunked_kd_loss(ht, hs, wt, ws, mask, chunk=chunk, **kw)
    _, _, md = dense_kd_loss(ht @ wt, hs @ ws, mask, **kw)
    for name in ("fkl", "rkl", "ce"):
        np.testing.assert_allclose(m[name][0], md[name][0], rtol=1e-5)


def test_kl_directions_against_numpy():
    ht, hs, wt, ws, mask = _inputs(1)
    zt, zs = np.asarray(ht @ wt), np.asarray(hs @ ws)
    m = np.asarray(mask)
    for T in (1.0, 2.0):
        fwd = (_np_kl(zt, zs, T) * m).sum()
        rev = (_np_kl(zs, zt, T) * m).sum()
        s, n, _ = chunked_kd_loss(ht, hs, wt, ws, mask, alpha=1.0, beta=0.0, temperature=T, chunk=4)
        np.testing.assert_allclose(s, fwd, rtol=1e-5)
        assert float(n) == m.sum()
        s, _, _ = chunked_kd_loss(ht, hs, wt, ws, mask, alpha=0.0, beta=1.0, temperature=T, chunk=4)
        np.testing.assert_allclose(s, rev, rtol=1e-5)
        assert abs(fwd - rev) > 1e-3 * fwd   # the two directions really differ here
    s, _, _ = chunked_kd_loss(ht, hs, wt, ws, mask, alpha=1.0, beta=0.0, temperature=2.0, chunk=4,
                              scale_by_t2=True)
    np.testing.assert_allclose(s, 4.0 * (_np_kl(zt, zs, 2.0) * m).sum(), rtol=1e-5)


def test_kl_zero_when_student_equals_teacher():
    ht, _, wt, _, mask = _inputs(2)
    s, n, m = chunked_kd_loss(ht, ht, wt, wt, mask, alpha=0.2, beta=0.7, chunk=4)
    assert abs(float(s)) < 1e-5 and float(n) > 0
    g = jax.grad(lambda h: chunked_kd_loss(ht, h, wt, wt, mask, alpha=0.2, beta=0.7, chunk=4)[0])(ht)
    assert float(jnp.max(jnp.abs(g))) < 1e-5


def test_masked_tokens_do_not_contribute():
    ht, hs, wt, ws, mask = _inputs(3)
    s0, n0, _ = chunked_kd_loss(ht, hs, wt, ws, mask, alpha=0.5, beta=0.5, chunk=4)
    off = np.asarray(mask) == 0
    assert off.any()
    # scramble the masked positions of the student: the loss must not move
    hs2 = jnp.where(jnp.asarray(off)[..., None], 100.0 * jax.random.normal(jax.random.PRNGKey(7), hs.shape), hs)
    s1, n1, _ = chunked_kd_loss(ht, hs2, wt, ws, mask, alpha=0.5, beta=0.5, chunk=4)
    np.testing.assert_allclose(s0, s1, rtol=1e-6)
    assert float(n0) == float(n1) == np.asarray(mask).sum()
    g = jax.grad(lambda h: chunked_kd_loss(ht, h, wt, ws, mask, alpha=0.5, beta=0.5, chunk=4)[0])(hs)
    assert float(jnp.max(jnp.abs(g[jnp.asarray(off)]))) == 0.0


def _topk_of(ht, wt, k):
    lp = jax.nn.log_softmax(ht @ wt, -1)
    return jax.lax.top_k(lp, k)


@pytest.mark.parametrize("tail", ["uniform", "renorm"])
def test_topk_with_full_vocab_equals_dense(tail):
    ht, hs, wt, ws, mask = _inputs(4)
    v, i = _topk_of(ht, wt, V)
    for T in (1.0, 1.5):
        kw = dict(alpha=0.3, beta=0.6, temperature=T)
        s, n, _ = kd_from_topk(v, i, hs, ws, mask, chunk=4, tail=tail, **kw)
        sd, nd, _ = dense_kd_loss(ht @ wt, hs @ ws, mask, **kw)
        np.testing.assert_allclose(s, sd, rtol=1e-5)
        assert float(n) == float(nd)
        g = jax.grad(lambda w: kd_from_topk(v, i, hs, w, mask, chunk=4, tail=tail, **kw)[0])(ws)
        gd = jax.grad(lambda w: dense_kd_loss(ht @ wt, hs @ w, mask, **kw)[0])(ws)
        np.testing.assert_allclose(g, gd, rtol=1e-4, atol=1e-6)


def test_topk_uniform_tail_equals_reconstructed_teacher():
    """k < V: the 'uniform' loss is the exact KL against the teacher rebuilt from top-k + flat tail."""
    ht, hs, wt, ws, mask = _inputs(5)
    k = 5
    v, i = _topk_of(ht, wt, k)
    pk = np.exp(np.asarray(v, np.float64))
    p = np.tile(((1 - pk.sum(-1)) / (V - k))[..., None], (1, 1, V))
    np.put_along_axis(p, np.asarray(i), pk, axis=-1)
    T = 1.3
    logit_t = np.log(p) / T          # p^_T proportional to p^(1/T)
    zs = np.asarray(hs @ ws)
    m = np.asarray(mask)
    fwd = (_np_kl(logit_t, zs / T) * m).sum()
    rev = (_np_kl(zs / T, logit_t) * m).sum()
    s, _, met = kd_from_topk(v, i, hs, ws, mask, alpha=1.0, beta=0.0, temperature=T, chunk=3)
    np.testing.assert_allclose(s, fwd, rtol=1e-4)
    np.testing.assert_allclose(met["rkl"][0], rev, rtol=1e-4)
    # renorm mode: teacher and student renormalised on the top-k set for the reverse KL
    _, _, met_r = kd_from_topk(v, i, hs, ws, mask, alpha=1.0, beta=0.0, temperature=T, chunk=3, tail="renorm")
    assert float(met_r["rkl"][0]) < float(met["rkl"][0])   # ignores student mass outside the top-k


def test_feature_loss_hand_checked():
    ft = np.zeros((2, 1, 3, 2), np.float32)
    fs = np.zeros((2, 1, 3, 2), np.float32)
    fs[0, 0, 0] = [3.0, 4.0]     # layer 0, token 0: norm 5
    fs[1, 0, 0] = [0.0, 1.0]     # layer 1, token 0: norm 1
    fs[1, 0, 1] = [6.0, 8.0]     # layer 1, token 1: norm 10
    fs[0, 0, 2] = [1e3, 0.0]     # token 2 is masked out
    mask = np.array([[1.0, 1.0, 0.0]], np.float32)
    s, n = feature_loss(jnp.asarray(ft), jnp.asarray(fs), jnp.asarray(mask))
    # token 0: (5 + 1)/2 = 3, token 1: (0 + 10)/2 = 5
    np.testing.assert_allclose(s, 8.0, rtol=1e-6)
    assert float(n) == 2.0
    g = jax.grad(lambda x: feature_loss(jnp.asarray(ft), x, jnp.asarray(mask))[0])(jnp.asarray(ft))
    assert np.isfinite(np.asarray(g)).all()   # zero difference: zero, not NaN, gradient


def test_hidden_alignment_and_orientation_hand_checked():
    yt = np.zeros((2, 1, 2, 2), np.float32)
    ys = np.zeros_like(yt)
    ys[0, 0, 0] = [3.0, 4.0]
    ys[1, 0, 1] = [0.0, 2.0]
    s, n = hidden_alignment_loss(jnp.asarray(ys), jnp.asarray(yt), jnp.ones((1, 2)))
    np.testing.assert_allclose(s, 7.0)
    assert float(n) == 4.0
    s, n = hidden_alignment_loss(jnp.asarray(ys), jnp.asarray(yt), jnp.asarray([[1.0, 0.0]]))
    np.testing.assert_allclose(s, 5.0)
    assert float(n) == 2.0

    A = np.tril(np.ones((1, 2, 3, 3), np.float32)) / np.arange(1, 4)[:, None]   # (b, h, l, l)
    M = A.copy()
    M[0, 1, 2] += [0.0, 3.0, 4.0]          # head 1, row 2: error norm 5
    M[0, 0, 1] += [1.0, 0.0, 0.0]          # head 0, row 1: error norm 1
    s, n = matrix_orientation_loss(jnp.asarray(M), jnp.asarray(A))
    np.testing.assert_allclose(s, 6.0, rtol=1e-6)
    assert float(n) == 6.0                  # 2 heads x 3 rows
    s, n = matrix_orientation_loss(jnp.asarray(M), jnp.asarray(A), jnp.asarray([[1.0, 1.0, 0.0]]))
    np.testing.assert_allclose(s, 1.0, rtol=1e-6)   # row 2 masked
    assert float(n) == 4.0
    # leading layer axis, as the stage code calls it
    s, n = matrix_orientation_loss(jnp.asarray(np.stack([M, A])), jnp.asarray(np.stack([A, A])))
    np.testing.assert_allclose(s, 6.0, rtol=1e-6)
    assert float(n) == 12.0


def test_bad_shapes_raise():
    ht, hs, wt, ws, mask = _inputs()
    with pytest.raises(MarjaxError, match="mask"):
        chunked_kd_loss(ht, hs, wt, ws, mask[:, :-1], alpha=1.0, beta=0.0)
    with pytest.raises(MarjaxError, match="vocab"):
        chunked_kd_loss(ht, hs, wt, ws[:, :-1], mask, alpha=1.0, beta=0.0)
    with pytest.raises(MarjaxError, match="ce_targets"):
        chunked_kd_loss(ht, hs, wt, ws, mask, alpha=1.0, beta=0.0, ce_weight=1.0)
    with pytest.raises(MarjaxError, match="temperature"):
        dense_kd_loss(ht @ wt, hs @ ws, mask, alpha=1.0, beta=0.0, temperature=0.0)



def _max_logits(jaxpr) -> int:
    """Largest (..., V)-shaped array other than a head matrix anywhere in a jaxpr (sub-jaxprs
    of scan / remat included), in elements."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = tuple(getattr(v.aval, "shape", ()))
            if len(shape) >= 2 and shape[-1] == V and shape != (D, V):
                best = max(best, int(np.prod(shape)))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _max_logits(inner))
    return best


def test_chunked_never_builds_full_logits():
    ht, hs, wt, ws, mask = _inputs()
    f = lambda hs, ws: chunked_kd_loss(ht, hs, wt, ws, mask, alpha=0.2, beta=0.7, chunk=4)[0]
    assert _max_logits(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hs, ws).jaxpr) == B * 4 * V   # one chunk
    g = lambda hs, ws: dense_kd_loss(ht @ wt, hs @ ws, mask, alpha=0.2, beta=0.7)[0]
    assert _max_logits(jax.make_jaxpr(jax.grad(g, argnums=(0, 1)))(hs, ws).jaxpr) == B * L * V


def test_relative_feature_loss_is_scale_free():
    from marjax.distill.losses import feature_loss
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    ft = jax.random.normal(k1, (3, 2, 5, 8))
    fs = ft + 0.1 * jax.random.normal(k2, ft.shape)
    m = jnp.ones((2, 5))
    s1, n1 = feature_loss(ft, fs, m, relative=True)
    s2, n2 = feature_loss(1000.0 * ft, 1000.0 * fs, m, relative=True)
    np.testing.assert_allclose(s1 / n1, s2 / n2, rtol=1e-5)
    expect = np.mean(np.linalg.norm(np.asarray(ft - fs), axis=-1) / np.linalg.norm(np.asarray(ft), axis=-1))
    np.testing.assert_allclose(s1 / n1, expect, rtol=1e-5)
