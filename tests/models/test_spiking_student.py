"""The spiking student (stage 2): the decoded ATMN forward equals the explicit T-pass sparse
evaluation (sum over micro-steps of projections of the int spike trains, weights pre-scaled by V),
per site and for whole blocks / the whole model against a hand-written re-implementation of the
block (conv, SSD token scan, gating, MLP) in which every spiking projection runs as T sparse
passes; firing-rate taps against spikes counted by hand; threshold init; site subsets; errors."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.config import ATMNConfig, preset
from marjax.errors import ConfigError
from marjax.models import lm
from marjax.models.lm import init_params
from marjax.models.spiking import make_spiking_student, spiking_config
from marjax.spiking import ATMNParams, atmn, atmn_spikes, calibrate_a, readout_coeffs
from marjax.ssm.reference import ssd_reference

B, L = 2, 12
VARIANTS = {
    "ternary-ones": dict(T=4, tau=2.0),
    "binary-taupow": dict(T=4, tau=2.0, readout="tau_pow", ternary=False),
    "ternary-round": dict(T=2, tau=1.0, quantizer="round"),
}


def _ids(cfg, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, L), 0, cfg.vocab_size)


def _dense():
    cfg = preset("tiny-ssm")
    return cfg, _init(jax.random.PRNGKey(0), cfg)


def _jitter(params, key):
    """Spread every threshold around its value so per-channel V really differs across channels."""
    sp = params.blocks.spikes
    names = [f.name for f in dataclasses.fields(sp)]
    keys = dict(zip(names, jax.random.split(key, len(names))))
    new = {n: (None if getattr(sp, n) is None else
               ATMNParams(a=getattr(sp, n).a + 0.3 * jax.random.normal(keys[n], getattr(sp, n).a.shape)))
           for n in names}
    blocks = dataclasses.replace(params.blocks, spikes=dataclasses.replace(sp, **new))
    return dataclasses.replace(params, blocks=blocks)


_CACHE = {}
_init = jax.jit(init_params, static_argnums=(1,))
# jitted once per (cfg, taps): the CPU is shared, so no op-by-op dispatch of whole models
forward = jax.jit(lm.forward, static_argnames=("cfg", "taps", "head"))
block = jax.jit(lambda p, x, cfg, pos: lm.block(p, x, cfg, pos)[0], static_argnums=(2,))


def _student(variant, init="stats", sites=None):
    """(cfg, calibrated params, params with jittered thresholds), built once per variant."""
    key = (variant, init, sites)
    if key not in _CACHE:
        dcfg, dp = _dense()
        kw = dict(VARIANTS[variant], init=init)
        if sites is not None:
            kw["sites"] = sites
        at = ATMNConfig(**kw)
        cfg = spiking_config(dcfg, at)
        p = jax.jit(lambda d, i: make_spiking_student(d, dcfg, at, calib_ids=i)[1])(dp, _ids(dcfg, seed=7))
        _CACHE[key] = (cfg, p, _jitter(p, jax.random.PRNGKey(3)))
    return _CACHE[key]


def _layer(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _site_weights(blk, site):
    """The projection(s) each site feeds (layer-sliced BlockParams)."""
    return {"in_proj": [blk.mixer.in_proj], "out_proj": [blk.mixer.out_proj],
            "mlp_in": [blk.mlp.gate, blk.mlp.up], "mlp_down": [blk.mlp.down]}[site]


def _np_spikes(x, V, at):
    """The ATMN recurrence as a plain numpy loop (float32; shares no code with marjax.spiking)."""
    x = np.asarray(x, np.float32)
    V = np.broadcast_to(np.asarray(V, np.float32), x.shape)
    k = np.float32(0.5 if at.quantizer == "round" else 1.0)
    u, out = np.zeros_like(x), []
    for t in range(at.T):
        h = x if t == 0 else u / np.float32(at.tau)
        s = (h >= k * V).astype(np.float32) - ((h <= -k * V).astype(np.float32) if at.ternary else 0)
        u = h - s * V
        out.append(s)
    return np.stack(out)


def _t_pass(x, a, W, atmn_cfg):
    """sum_t c_t (s_t @ (V * W)): T sparse passes of the spike train (numpy loop) through the
    projection with V folded into the weight rows (what the energy model charges: accumulates)."""
    V = np.exp(np.asarray(a, np.float32))
    s = _np_spikes(x, V, atmn_cfg)
    Wv = (V[:, None] if V.ndim == 1 else V) * np.asarray(W, np.float64)
    c = [1.0 if atmn_cfg.readout == "ones" else atmn_cfg.tau ** t for t in range(atmn_cfg.T)]
    return sum(c[t] * (s[t].astype(np.float64) @ Wv) for t in range(atmn_cfg.T))


@partial(jax.jit, static_argnums=(3,))
def _t_pass_jax(x, a, W, atmn_cfg):
    """_t_pass traceable (for the hand-written jitted block): spikes from atmn_spikes, int8."""
    V = jnp.exp(a)
    s = atmn_spikes(x, V, atmn_cfg.T, atmn_cfg.tau, atmn_cfg.ternary, atmn_cfg.quantizer)
    assert s.dtype == jnp.int8
    Wv = (V[:, None] if V.ndim == 1 else V) * W
    c = readout_coeffs(atmn_cfg)
    hi = jax.lax.Precision.HIGHEST
    return sum(float(c[t]) * jnp.matmul(s[t].astype(jnp.float32), Wv, precision=hi) for t in range(atmn_cfg.T))


def _decoded(x, a, atmn_cfg):
    """What the model's neuron feeds its projection: marjax.spiking.atmn's own forward (the
    custom_vjp scan), not a re-decoding of the test's spike train."""
    return np.asarray(atmn(jnp.asarray(x), ATMNParams(jnp.asarray(a)), atmn_cfg))


def _rms(w, x, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


@partial(jax.jit, static_argnums=(2,))
def _manual_block(blk, x, cfg):
    """One spiking block written out by hand; every spiking projection is a T-pass evaluation."""
    sc, at, hi = cfg.ssm, cfg.atmn, jax.lax.Precision.HIGHEST

    def proj(site, u, W):
        n = getattr(blk.spikes, site)
        return jnp.matmul(u, W, precision=hi) if n is None else _t_pass_jax(u, n.a, W, at)

    mx = blk.mixer
    zxbca = proj("in_proj", _rms(blk.mixer_norm, x, cfg.rms_eps), mx.in_proj)
    c, di, H, P, N = sc.conv_dim, sc.d_inner, sc.n_heads, sc.head_dim, sc.state_dim
    xbc, z, alog = zxbca[..., :c], zxbca[..., c:c + di], zxbca[..., c + di:]
    K = mx.conv_w.shape[0]
    padded = jnp.pad(xbc, ((0, 0), (K - 1, 0), (0, 0)))
    xbc = sum(padded[:, k:k + L] * mx.conv_w[k] for k in range(K)) + mx.conv_b
    xs = xbc[..., :H * P].reshape(B, L, H, P)
    Bm = xbc[..., H * P:H * P + H * N].reshape(B, L, H, N)
    Cm = xbc[..., H * P + H * N:].reshape(B, L, H, N)
    log_a = -jax.nn.softplus(alog + mx.a_log_bias)
    y, _ = ssd_reference(xs, log_a, Bm, Cm, jnp.zeros((B, H, P, N)))
    y = (y + mx.D[:, None] * xs).reshape(B, L, di)
    x_mid = x + proj("out_proj", y * jax.nn.silu(z + mx.z_bias), mx.out_proj)
    h2 = _rms(blk.mlp_norm, x_mid, cfg.rms_eps)
    hid = jax.nn.silu(proj("mlp_in", h2, blk.mlp.gate)) * proj("mlp_in", h2, blk.mlp.up)
    return x_mid + proj("mlp_down", hid, blk.mlp.down)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_site_decoded_projection_equals_t_pass(variant):
    cfg, _, p = _student(variant)
    _, aux = forward(p, _ids(cfg), cfg, taps=("site_inputs", "spikes"))
    at = cfg.atmn
    for site in ("in_proj", "out_proj", "mlp_in", "mlp_down"):
        xs = aux["site_inputs"][site]
        assert xs.shape[:3] == (cfg.n_layers, B, L)
        for i in range(cfg.n_layers):
            blk = _layer(p.blocks, i)
            a = getattr(blk.spikes, site).a
            x = xs[i]
            dec = _decoded(x, a, at)
            # the spike train is a quantiser of x, not x itself (so the check below is not trivial)
            assert np.abs(dec - np.asarray(x)).max() > 1e-3
            for W in _site_weights(blk, site):
                want = _t_pass(x, a, W, at)
                got = np.asarray(dec, np.float64) @ np.asarray(W, np.float64)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_and_model_equal_manual_t_pass(variant):
    cfg, _, p = _student(variant)
    ids = _ids(cfg)
    logits, aux = forward(p, ids, cfg, taps=("prenorm", "hidden"))
    x = jnp.take(p.embed, ids, axis=0)
    pos = jnp.broadcast_to(jnp.arange(L)[None], (B, L))
    for i in range(cfg.n_layers):
        blk = _layer(p.blocks, i)
        x_in = aux["prenorm"][i, 0]
        np.testing.assert_allclose(x_in, x, rtol=1e-5, atol=1e-5)   # the chained manual stream
        got = block(blk, x_in, cfg, pos)
        want = _manual_block(blk, x_in, cfg)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        x = _manual_block(blk, x, cfg)
    h = _rms(p.final_norm, x, cfg.rms_eps)
    np.testing.assert_allclose(aux["hidden"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, h @ p.embed.T, rtol=1e-4, atol=1e-4)
    # the spiking student really differs from its dense source (the neurons are in the path)
    dcfg, dp = _dense()
    assert float(jnp.abs(forward(dp, ids, dcfg)[0] - logits).max()) > 1e-2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_firing_rate_taps_match_counted_spikes(variant):
    cfg, _, p = _student(variant)
    _, aux = forward(p, _ids(cfg), cfg, taps=("site_inputs", "spikes"))
    at = cfg.atmn
    assert set(aux["spikes"]) == set(at.sites)
    for site in at.sites:
        st = aux["spikes"][site]
        for k in ("nonzero", "pos", "neg"):
            assert st[k].shape == (cfg.n_layers, at.T)
        for i in range(cfg.n_layers):
            a = getattr(_layer(p.blocks, i).spikes, site).a
            s = _np_spikes(aux["site_inputs"][site][i], np.exp(np.asarray(a)), at)
            axes = tuple(range(1, s.ndim))
            np.testing.assert_allclose(st["nonzero"][i], (s != 0).mean(axes), atol=1e-6)
            np.testing.assert_allclose(st["pos"][i], (s > 0).mean(axes), atol=1e-6)
            np.testing.assert_allclose(st["neg"][i], (s < 0).mean(axes), atol=1e-6)
            if not at.ternary:
                assert float(st["neg"][i].max()) == 0.0
        assert 0.0 < float(st["nonzero"][:, 0].mean()) < 1.0


def test_stats_init_calibrates_thresholds():
    dcfg, dp = _dense()
    calib = _ids(dcfg, seed=7)
    at = ATMNConfig(**VARIANTS["ternary-ones"], init="stats")
    cfg, p, _ = _student("ternary-ones")        # make_spiking_student(dp, dcfg, at, calib), jitted
    assert cfg.is_spiking and cfg.atmn == at and cfg.name == "tiny-spiking"
    widths = {"in_proj": cfg.d_model, "out_proj": cfg.ssm.d_inner, "mlp_in": cfg.d_model, "mlp_down": cfg.d_ff}
    for site, w in widths.items():
        a = getattr(p.blocks.spikes, site).a
        assert a.shape == (cfg.n_layers, w)
        assert bool(jnp.all(jnp.isfinite(a)))
        assert float(jnp.abs(a - at.init_value).max()) > 1e-2
    # layer 0's in_proj site sees the normed embeddings: calibrate on those directly
    x0 = _rms(dp.blocks.mixer_norm[0], jnp.take(dp.embed, calib, axis=0), dcfg.rms_eps)
    np.testing.assert_allclose(p.blocks.spikes.in_proj.a[0], calibrate_a(x0, at).a, rtol=1e-5, atol=1e-5)
    # the dense weights are carried over untouched
    np.testing.assert_array_equal(p.blocks.mlp.down, dp.blocks.mlp.down)
    with pytest.raises(ConfigError, match="calib"):
        make_spiking_student(dp, dcfg, at)


def test_constant_init_and_granularity():
    dcfg, dp = _dense()
    cfg, p = make_spiking_student(dp, dcfg, ATMNConfig(init="constant", init_value=-0.7))
    for site in ("in_proj", "out_proj", "mlp_in", "mlp_down"):
        np.testing.assert_array_equal(getattr(p.blocks.spikes, site).a, np.float32(-0.7))
    _, p2 = make_spiking_student(dp, dcfg, ATMNConfig(granularity="site", init_value=0.25))
    assert p2.blocks.spikes.mlp_down.a.shape == (dcfg.n_layers,)
    np.testing.assert_array_equal(p2.blocks.spikes.mlp_down.a, np.float32(0.25))


def test_site_subset_runs_and_leaves_others_dense():
    cfg, _, p = _student("ternary-ones", sites=("mlp_in", "mlp_down"))
    sp = p.blocks.spikes
    assert sp.in_proj is None and sp.out_proj is None
    assert sp.mlp_in is not None and sp.mlp_down is not None
    ids = _ids(cfg)
    logits, aux = forward(p, ids, cfg, taps=("spikes", "prenorm"))
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert set(aux["spikes"]) == {"mlp_in", "mlp_down"}
    pos = jnp.broadcast_to(jnp.arange(L)[None], (B, L))
    for i in range(cfg.n_layers):
        blk = _layer(p.blocks, i)
        x_in = aux["prenorm"][i, 0]
        np.testing.assert_allclose(block(blk, x_in, cfg, pos), _manual_block(blk, x_in, cfg),
                                   rtol=1e-5, atol=1e-5)


def test_attention_config_rejected():
    cfg = preset("tiny")
    p = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), cfg))   # shapes suffice: it must fail first
    with pytest.raises(ConfigError, match="attention"):
        make_spiking_student(p, cfg, ATMNConfig())
