"""A test per layer of marjax.nn over a small parameter grid, each against an independent
formulation: numpy formulas (RMSNorm, SwiGLU, causal attention), the Mamba-2 mixer as its
materialised (l x l) per-head matrix applied to x plus the D skip, chunked prefill/decode with
the cache against one full pass (attention and the mixer), and the conv window carried across chunks."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.config import ModelConfig, SSMConfig
from marjax.models.lm import BlockParams, LMParams, init_block, init_params, param_dims
from marjax.nn import mamba2
from marjax.nn.layers import AttnParams, MLPParams, attention, dense, mlp, rms_norm
from marjax.train.mesh import ShardingRules
from marjax.typing import ArrayInfo, declarations, resolve_shape


def _attn_cfg(n_heads, n_kv, head_dim):
    return ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                       head_dim=head_dim, d_ff=48, max_seq_len=64)


def _ssm_cfg(n_heads, head_dim, state_dim, conv_kernel, chunk=4, impl="chunked"):
    return SSMConfig(n_heads=n_heads, head_dim=head_dim, state_dim=state_dim, conv_kernel=conv_kernel,
                     chunk_size=chunk, impl=impl)


def _mixer_params(key, d, sc):
    cfg = ModelConfig(name="t", vocab_size=64, d_model=d, n_layers=2, mixer="ssm", ssm=sc)
    p = init_block(key, cfg, jnp.float32).mixer
    k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, 1), 4)
    # random conv taps, D, biases: the identity init would hide a wrong conv or skip
    return mamba2.MixerParams(in_proj=p.in_proj, conv_w=0.5 * jax.random.normal(k1, p.conv_w.shape),
                              conv_b=0.1 * jax.random.normal(k2, p.conv_b.shape),
                              D=jax.random.normal(k3, p.D.shape), a_log_bias=p.a_log_bias * 0.25,
                              z_bias=0.1 * jax.random.normal(k4, p.z_bias.shape), out_proj=p.out_proj)


@pytest.mark.parametrize("d,eps", [(8, 1e-6), (33, 1e-5)])
def test_rms_norm(d, eps):
    x = np.random.default_rng(d).standard_normal((2, 5, d)).astype(np.float32)
    w = np.random.default_rng(d + 1).standard_normal(d).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w
    got = rms_norm(jnp.asarray(w), jnp.asarray(x), eps)
    chex.assert_shape(got, x.shape)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d,f", [(8, 16), (12, 40)])
def test_mlp_swiglu(d, f):
    rng = np.random.default_rng(f)
    g, u, dn = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((d, f), (d, f), (f, d)))
    x = rng.standard_normal((3, d)).astype(np.float32)
    a = x @ g
    want = (a / (1 + np.exp(-a)) * (x @ u)) @ dn
    got = mlp(MLPParams(jnp.asarray(g), jnp.asarray(u), jnp.asarray(dn)), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv,head_dim,chunks", [(4, 4, 8, (7,)), (4, 2, 8, (3, 1, 4)),
                                                         (2, 1, 16, (1, 1, 5))])
def test_attention_cache_chunks_equal_full_pass(n_heads, n_kv, head_dim, chunks):
    cfg = _attn_cfg(n_heads, n_kv, head_dim)
    p = init_block(jax.random.key(0), cfg, jnp.float32).mixer
    l = sum(chunks)
    x = jax.random.normal(jax.random.key(1), (2, l, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(l)[None], (2, l))
    full, _ = attention(p, x, cfg, pos)
    shape = (2, 16, n_kv, head_dim)
    cache, outs, start = (jnp.zeros(shape), jnp.zeros(shape)), [], 0
    for n in chunks:
        y, cache = attention(p, x[:, start:start + n], cfg, pos[:, start:start + n], cache)
        outs.append(y)
        start += n
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    # causal: the first token's output depends on that token only (softmax over one key = v)
    single, _ = attention(p, x[:, :1], cfg, pos[:, :1])
    chex.assert_trees_all_close(single, full[:, :1], rtol=1e-5, atol=1e-6)


SSM_GRID = [(2, 4, 4, 4), (3, 8, 2, 2), (1, 4, 8, 3)]     # (heads, head dim, state dim, conv kernel)


def _slow_but_first(cases):
    """The first case in the fast suite, the rest of the grid under -m slow (each compiles anew)."""
    return [c if i == 0 else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(cases)]


@pytest.mark.parametrize("h,p,n,k", _slow_but_first(SSM_GRID))
def test_mixer_equals_materialised_matrix_plus_skip(h, p, n, k):
    sc, d, l = _ssm_cfg(h, p, n, k), 16, 9
    prm = _mixer_params(jax.random.key(h * 10 + n), d, sc)
    u = jax.random.normal(jax.random.key(2), (2, l, d))
    out, _ = mamba2.mixer(prm, u, sc)
    M = mamba2.materialize(prm, u, sc)                                  # (b, h, l, l)
    chex.assert_shape(M, (2, h, l, l))
    assert np.allclose(np.triu(np.asarray(M), 1), 0.0)                 # causal
    xbc, z, _ = mamba2.split_in_proj(u @ prm.in_proj, sc)
    xbc, _ = mamba2.causal_conv(prm.conv_w, prm.conv_b, xbc)
    x = np.asarray(xbc[..., :h * p]).reshape(2, l, h, p)
    y = np.einsum("bhls,bshp->blhp", np.asarray(M), x) + np.asarray(prm.D)[:, None] * x
    zz = np.asarray(z) + np.asarray(prm.z_bias)
    want = (y.reshape(2, l, h * p) * zz / (1 + np.exp(-zz))) @ np.asarray(prm.out_proj)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("h,p,n,k,impl,chunks", _slow_but_first([(*g, impl, c) for impl, g, c in itertools.product(
    ("chunked", "reference"), SSM_GRID[:2], ((5, 1, 1, 4), (1, 1, 1, 1, 1, 6)))]))
def test_mixer_cache_chunks_equal_full_pass(h, p, n, k, impl, chunks):
    sc, d = _ssm_cfg(h, p, n, k, chunk=2, impl=impl), 16
    prm = _mixer_params(jax.random.key(7), d, sc)
    l = sum(chunks)
    u = jax.random.normal(jax.random.key(3), (2, l, d))
    full, _ = mamba2.mixer(prm, u, sc)
    cache, outs, start = mamba2.init_mixer_cache(2, sc), [], 0
    for m in chunks:
        y, cache = mamba2.mixer(prm, u[:, start:start + m], sc, cache)   # m == 1: the recurrent step
        outs.append(y)
        start += m
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, rtol=2e-4, atol=2e-5)
    chex.assert_shape(cache.conv, (2, k - 1, sc.conv_dim))


@pytest.mark.parametrize("k,splits", [(2, (3, 4)), (4, (1, 2, 5)), (4, (6, 1)), (3, (1, 1, 1, 1))])
def test_causal_conv_window_carried(k, splits):
    c, l = 5, sum(splits)
    rng = np.random.default_rng(k)
    w, b = rng.standard_normal((k, c)).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    x = rng.standard_normal((2, l, c)).astype(np.float32)
    padded = np.concatenate([np.zeros((2, k - 1, c), np.float32), x], 1)
    want = sum(padded[:, i:i + l] * w[i] for i in range(k)) + b             # conv_w[i] hits t-(k-1)+i
    full, tail = mamba2.causal_conv(jnp.asarray(w), jnp.asarray(b), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(full), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(tail), padded[:, -(k - 1):])
    prev, outs, start = None, [], 0
    for m in splits:
        y, prev = mamba2.causal_conv(jnp.asarray(w), jnp.asarray(b), jnp.asarray(x[:, start:start + m]), prev)
        outs.append(np.asarray(y))
        start += m
    np.testing.assert_allclose(np.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-ssm", "tiny-spiking"])
def test_params_match_their_declarations(name):
    """Every declared leaf of init_params has its declared shape (with L in front under blocks),
    and every declared logical axis is a ShardingRules field."""
    from marjax.config import preset
    cfg = preset(name)
    params, dims = init_params(jax.random.key(0), cfg), param_dims(cfg)
    seen = []

    def check(obj, lead):
        for field, info in declarations(obj).items():
            v = getattr(obj, field)
            if v is None:
                continue
            if isinstance(info, ArrayInfo):
                chex.assert_shape(v, lead + resolve_shape(info, dims))
                assert all(a is None or a in ShardingRules.names() for a in info.axes), (field, info.axes)
                seen.append(field)
            else:
                check(v, lead + tuple(dims["L"] for _ in info.lead))
    check(params, ())
    assert "embed" in seen and "down" in seen and ("in_proj" in seen or "wq" in seen)
    assert isinstance(params, LMParams) and isinstance(params.blocks, BlockParams)
    assert isinstance(params.blocks.mixer, mamba2.MixerParams if cfg.is_ssm else AttnParams)


def test_clip_token_grad_caps_outlier_tokens_only():
    from marjax.nn.layers import clip_token_grad
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    w = np.ones((2, 5, 1), np.float32)
    w[1, 2], w[0, 4] = 1e4, 30.0                     # two outlier tokens in the incoming gradient
    g = jax.random.normal(jax.random.key(1), (2, 5, 3)) * w
    y, vjp = jax.vjp(lambda v: clip_token_grad(v, 8.0), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    (gx,) = vjp(g)
    n = np.linalg.norm(np.asarray(g), axis=-1)
    cap = 8.0 * np.median(n)
    want = np.asarray(g) * np.minimum(1.0, cap / n)[..., None]
    np.testing.assert_allclose(np.asarray(gx), want, rtol=1e-5)
    assert np.isclose(np.linalg.norm(np.asarray(gx)[1, 2]), cap, rtol=1e-5)      # capped to the cap
    ordinary = n <= cap
    assert ordinary.sum() >= 8
    np.testing.assert_array_equal(np.asarray(gx)[ordinary], np.asarray(g)[ordinary])


def _dots(fn, *args) -> list:
    """(operand dtypes, result dtype) of every dot_general in fn's jaxpr, nested ones included."""
    out = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                out.append((tuple(str(v.aval.dtype) for v in e.invars), str(e.outvars[0].aval.dtype)))
            for p in e.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def test_dense_float32_is_the_plain_product():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x, w = jax.random.normal(k1, (2, 5, 16)), jax.random.normal(k2, (16, 24))
    np.testing.assert_array_equal(np.asarray(dense(x, w)), np.asarray(x @ w))
    assert dense(x, w, jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_dense_half_weights_multiply_in_half_precision_both_ways(x_dtype):
    """bf16 weights: every product, forward and backward, takes bf16 operands and accumulates in
    float32; values and gradients stay within bf16 rounding of the float32 ones."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k1, (4, 8, 64))
    w = jax.random.normal(k2, (64, 48)) / 8
    c = jax.random.normal(k3, (4, 8, 48))

    def loss32(x, w):
        return jnp.sum(jnp.sin(x @ w) * c)

    def loss16(x, w):
        y = dense(x.astype(x_dtype), w.astype(jnp.bfloat16))
        assert y.dtype == jnp.result_type(x_dtype, jnp.bfloat16)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)

    g32, g16 = jax.grad(loss32, (0, 1))(x, w), jax.grad(loss16, (0, 1))(x, w)
    for a, b in zip(g32, g16):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 2e-2
    dots = _dots(jax.grad(loss16, (0, 1)), x, w)
    assert len(dots) == 3, dots                       # forward, d/dx, d/dw
    assert all(ins == ("bfloat16", "bfloat16") and res == "float32" for ins, res in dots), dots
    y = dense(x, w.astype(jnp.bfloat16), jnp.float32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=5e-2, atol=5e-2)


def test_dense_float32_keeps_forward_mode():
    """No custom rule on the float32 path: jax.jvp works (the tangent of a linear map is itself)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    x, w, t = jax.random.normal(k1, (3, 4, 8)), jax.random.normal(k2, (8, 5)), jax.random.normal(k3, (3, 4, 8))
    y, ty = jax.jvp(lambda x: dense(x, w), (x,), (t,))
    np.testing.assert_allclose(np.asarray(ty), np.einsum("bld,df->blf", np.asarray(t), np.asarray(w)), rtol=1e-5,
                               atol=1e-5)
    assert y.shape == (3, 4, 5)
