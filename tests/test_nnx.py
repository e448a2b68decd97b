"""Flax NNX modules (marjax/nnx.py) against the pure core on the same params."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

import marjax
from marjax import nnx as mnx
from marjax.errors import MarjaxError
from marjax.models import lm
from marjax.nn import mamba2
from marjax.spiking import ATMNParams, atmn

PRESET_NAMES = ["tiny", "tiny-ssm", "tiny-spiking"]


def _close(a, b, rtol=1e-5, atol=1e-6):
    ja, jb = jax.tree.structure(a), jax.tree.structure(b)
    assert ja == jb, f"{ja} != {jb}"
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _params(name, seed=0):
    cfg = marjax.preset(name)
    params = lm.init_params(jax.random.key(seed), cfg)
    if cfg.is_spiking:   # thresholds away from the init constant, so each site/channel differs
        sites = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(7), a.shape), params.blocks.spikes)
        params = dataclasses.replace(params, blocks=dataclasses.replace(params.blocks, spikes=sites))
    return cfg, params


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_lm_outputs_and_grads_match_core(name):
    cfg, params = _params(name)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    w = jax.random.normal(jax.random.key(2), (2, 12, cfg.vocab_size))

    def pure_loss(p):
        logits, _ = lm.forward(p, ids, cfg)
        return jnp.mean(jnp.tanh(logits) * w)

    def nnx_loss(model):
        return jnp.mean(jnp.tanh(model(ids)) * w)

    model = mnx.LM.from_params(params, cfg)
    loss_p, grads_p = jax.jit(jax.value_and_grad(pure_loss))(params)
    loss_m, grads_m = nnx.jit(nnx.value_and_grad(nnx_loss))(model)
    np.testing.assert_allclose(float(loss_m), float(loss_p), rtol=1e-6)
    # the gradient State laid back into the module layout gives the core's LMParams
    grads_m = nnx.merge(nnx.graphdef(model), grads_m).to_params()
    _close(grads_m, grads_p)
    assert float(jnp.max(jnp.abs(grads_p.blocks.mlp.down))) > 0
    if cfg.is_spiking:
        assert float(jnp.max(jnp.abs(grads_p.blocks.spikes.in_proj.a))) > 0


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_from_params_to_params_lossless(name):
    cfg, params = _params(name)
    model = mnx.LM.from_params(params, cfg)
    back = model.to_params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # split/merge (what nnx.jit does) keeps it too; the state holds one Param per core leaf
    graphdef, state = nnx.split(model)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(params))
    _close(nnx.merge(graphdef, state).to_params(), params, rtol=0, atol=0)


def test_taps_match_core():
    cfg, params = _params("tiny-spiking")
    ids = jax.random.randint(jax.random.key(3), (1, 8), 0, cfg.vocab_size)
    taps = ("prenorm", "spikes", "hidden")
    out_m, aux_m = mnx.LM.from_params(params, cfg).forward(ids, taps=taps, head=False)
    out_p, aux_p = lm.forward(params, ids, cfg, taps=taps, head=False)
    _close(out_m, out_p)
    _close(aux_m, aux_p)


def test_atmn_and_mixer_modules_match_core():
    acfg = marjax.ATMNConfig(T=3, tau=1.0)
    a = 0.2 * jax.random.normal(jax.random.key(0), (16,))
    neuron = mnx.ATMN.from_params(ATMNParams(a=a), acfg)
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    g_m = nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1))(neuron, x)
    g_p = jax.grad(lambda a, x: jnp.sum(atmn(x, ATMNParams(a=a), acfg) ** 2), argnums=(0, 1))(a, x)
    _close(g_m[0]["a"].get_value(), g_p[0])
    _close(g_m[1], g_p[1])
    assert neuron.spikes(x).shape == (3, 2, 5, 16)

    scfg = marjax.SSMConfig(n_heads=2, head_dim=8, state_dim=8, chunk_size=4, impl="chunked")
    mixer = mnx.DiscreteMamba2(32, scfg, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(2), (2, 6, 32))
    p = mixer.to_params()
    assert isinstance(p, mamba2.MixerParams)
    _close(mixer(u), mamba2.mixer(p, u, scfg)[0])
    # prefill 5 tokens then decode 1 through the cache == the full sequence
    y5, cache = mixer.step(u[:, :5], mixer.init_cache(2))
    y1, _ = mixer.step(u[:, 5:], cache)
    _close(jnp.concatenate([y5, y1], axis=1), mixer(u), rtol=1e-4, atol=1e-5)


def _spiking_mlp(rngs):
    acfg = marjax.ATMNConfig(T=4, tau=1.0, init_value=-1.0)
    return [mnx.SpikingLinear(16, 32, acfg, rngs=rngs, site="mlp_in"),
            mnx.SpikingLinear(32, 8, acfg, rngs=rngs, site="mlp_down")]


class _TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List(_spiking_mlp(rngs))

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


def test_spiking_linear_training_reduces_loss_and_round_trips():
    model = _TwoLayer(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jnp.tanh(x @ jax.random.normal(jax.random.key(2), (16, 8)))
    init = [l.to_params() for l in model.layers]
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    # thresholds were trained too (their grads flow through the surrogate)
    trained = [l.to_params() for l in model.layers]
    assert float(jnp.max(jnp.abs(trained[0].neuron.a - init[0].neuron.a))) > 1e-3
    # round trip: rebuilt layers give the same outputs, and the core function agrees
    rebuilt = [mnx.SpikingLinear.from_params(p, l.cfg, l.site) for p, l in zip(trained, model.layers)]
    _close(rebuilt[1](jax.nn.relu(rebuilt[0](x))), model(x), rtol=0, atol=0)
    p0 = trained[0]
    _close(model.layers[0](x), atmn(x, p0.neuron, model.layers[0].cfg) @ p0.kernel)
    # stats: per-micro-step firing fractions in [0, 1]
    _, stats = model.layers[0].with_stats(x)
    assert stats["nonzero"].shape == (4,) and 0 < float(stats["nonzero"][0]) <= 1


def test_nnx_vmap_over_inputs_and_an_ensemble():
    acfg = marjax.ATMNConfig(T=2)
    x = jax.random.normal(jax.random.key(0), (3, 4, 16))
    neuron = mnx.ATMN(16, acfg)
    per_example = nnx.vmap(lambda m, xi: m(xi), in_axes=(None, 0))(neuron, x)
    _close(per_example, neuron(x))
    # an ensemble of 5 neurons: the Param has a leading member axis, vmapped over
    a = jnp.linspace(-1.0, 1.0, 5)[:, None] * jnp.ones((5, 16))
    ensemble = mnx.ATMN.from_params(ATMNParams(a=a), acfg)
    ys = nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(ensemble, x)
    _close(ys, jnp.stack([atmn(x, ATMNParams(a=a[i]), acfg) for i in range(5)]))


def test_nnx_vmap_builds_stacked_blocks_for_scan():
    cfg = marjax.preset("tiny-ssm")

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
        return mnx.SSMBlock(cfg, rngs=rngs)

    blocks = make_blocks(nnx.Rngs(0))
    stacked = blocks.to_params()
    assert stacked.mixer.in_proj.shape[0] == cfg.n_layers
    assert not np.allclose(stacked.mixer.in_proj[0], stacked.mixer.in_proj[1])
    params = lm.LMParams(embed=0.1 * jax.random.normal(jax.random.key(1), (cfg.vocab_size, cfg.d_model)),
                         blocks=stacked, final_norm=jnp.ones((cfg.d_model,)))
    ids = jax.random.randint(jax.random.key(2), (1, 8), 0, cfg.vocab_size)
    _close(mnx.LM.from_params(params, cfg)(ids), lm.forward(params, ids, cfg)[0])
    # one layer, called directly (unstacked) == the core block
    x = jax.random.normal(jax.random.key(3), (1, 8, cfg.d_model))
    one = jax.tree.map(lambda a: a[0], stacked)
    pos = jnp.arange(8)[None]
    _close(mnx.SSMBlock.from_params(one, cfg)(x), lm.block(one, x, cfg, pos)[0])


def test_logical_axes_and_sharding():
    cfg, params = _params("tiny-spiking")
    model = mnx.LM.from_params(params, cfg)
    spec = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert spec["blocks"]["mixer"]["in_proj"].get_value() == P("layers", "embed", "ssm_inner")
    assert spec["blocks"]["spikes"]["mlp_down"]["a"].get_value() == P("layers", "act")
    assert spec["embed"].get_value() == P("vocab", "embed")
    # standalone modules get the names their leaves have inside the model, minus "layers"
    assert mnx.block_axes(params.blocks.mixer, stacked=True).in_proj == ("layers", "embed", "ssm_inner")
    lin = mnx.SpikingLinear(16, 8, cfg.atmn, rngs=nnx.Rngs(0), site="in_proj")
    lin_spec = nnx.get_partition_spec(nnx.state(lin, nnx.Param))
    assert lin_spec["kernel"].get_value() == P("embed", "ssm_inner")
    assert lin_spec["neuron"]["a"].get_value() == P("act")
    # mapped to a (2 fsdp x 2 tensor) mesh by the core's rules
    mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
    specs = mnx.partition_specs(model, mesh)
    assert specs["blocks"]["mixer"]["in_proj"].get_value() == P(None, "fsdp", "tensor")
    assert specs["embed"].get_value() == P("tensor", "fsdp")
    # placing on a real (1-device) mesh keeps values and runs
    real = marjax.train.mesh.make_mesh(marjax.config.MeshConfig())
    ids = jnp.zeros((1, 4), jnp.int32)
    before = model(ids)
    mnx.shard(model, real)
    _close(model(ids), before, rtol=0, atol=0)


def test_load_and_errors():
    with pytest.warns(UserWarning):
        model = mnx.LM.load("tiny")
    m = marjax.load("tiny")
    ids = np.array([[1, 2, 3, 4]])
    _close(model(jnp.asarray(ids)), marjax.logits(m, ids))
    assert model.as_model(m.tokenizer).config == m.config
    with pytest.raises(MarjaxError, match="n_layers"):
        mnx.LM.from_params(m.params, dataclasses.replace(m.config, n_layers=3))
    with pytest.raises(MarjaxError, match="site"):
        mnx.SpikingLinear(4, 4, marjax.ATMNConfig(), rngs=nnx.Rngs(0), site="attn")
