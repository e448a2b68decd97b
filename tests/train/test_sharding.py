"""Mesh, logical axes and sharding rules; the sharded train step equals the unsharded one."""
import dataclasses
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from marjax.config import MeshConfig, preset
from marjax.errors import ConfigError
from marjax.models.lm import SpikeSites, init_params, unroll_layers
from marjax.train.mesh import (AXES, DEFAULT_RULES, ShardingRules, batch_shardings, is_axes, logical_axes,
                               make_mesh, partition_spec)
from marjax.train.optim import decay_mask

from simulated_devices import run_on_devices   # tests/simulated_devices.py


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_axes)[0]}


def test_logical_axes_attention_and_ssm():
    att = _flat(logical_axes(jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), preset("tiny")))))
    assert att[".embed"] == ("vocab", "embed")
    assert att[".blocks.mixer.wq"] == ("layers", "embed", "heads")
    assert att[".blocks.mixer.wo"] == ("layers", "heads", "embed")
    assert att[".blocks.mlp.gate"] == ("layers", "embed", "mlp")
    assert att[".blocks.mlp.down"] == ("layers", "mlp", "embed")
    assert att[".blocks.mixer_norm"] == ("layers", "embed")
    assert att[".final_norm"] == ("embed",)
    ssm = _flat(logical_axes(jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), preset("tiny-ssm")))))
    assert ssm[".blocks.mixer.in_proj"] == ("layers", "embed", "ssm_inner")
    assert ssm[".blocks.mixer.out_proj"] == ("layers", "ssm_inner", "embed")
    assert ssm[".blocks.mixer.conv_w"] == ("layers", None, "ssm_inner")


def test_logical_axes_spike_sites_and_optimizer_state():
    # ATMN thresholds: per-channel (layers, width) or per-site scalar (layers,)
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class A:  # stands in for marjax.spiking.ATMNParams(a)
        a: jax.Array
    params = init_params(jax.random.PRNGKey(0), preset("tiny-ssm"))
    blocks = dataclasses.replace(params.blocks, spikes=SpikeSites(in_proj=A(jnp.zeros((2, 64))),
                                                                  mlp_down=A(jnp.zeros((2,)))))
    params = dataclasses.replace(params, blocks=blocks)
    ax = _flat(logical_axes(params))
    assert ax[".blocks.spikes.in_proj.a"] == ("layers", "act")
    assert ax[".blocks.spikes.mlp_down.a"] == ("layers",)
    dm = _flat(decay_mask(params))
    assert dm[".blocks.spikes.in_proj.a"] is False and dm[".blocks.mixer_norm"] is False
    assert dm[".blocks.mixer.z_bias"] is False and dm[".blocks.mixer.in_proj"] is True and dm[".embed"] is True
    # Adam moments mirror the params, so they get the same names through their field paths
    opt = _flat(logical_axes(optax.adam(1e-3).init(params)))
    assert opt["[0].mu.blocks.mixer.in_proj"] == ("layers", "embed", "ssm_inner")
    assert opt["[0].nu.embed"] == ("vocab", "embed")
    assert opt["[0].count"] == ()


def test_partition_spec_rules_and_divisibility_fallback():
    mesh = AbstractMesh((2, 2, 2), AXES)
    assert partition_spec(("layers", "embed", "heads"), (2, 64, 64), mesh) == P(None, "fsdp", "tensor")
    # 3 is not divisible by the tensor axis (2): replicated, the rest still sharded
    assert partition_spec(("layers", "embed", "heads"), (2, 64, 3), mesh) == P(None, "fsdp")
    assert partition_spec(("vocab", "embed"), (5, 7), mesh) == P()
    # a mesh axis is used once per array
    rules = ShardingRules().replace(mlp="fsdp")
    assert partition_spec(("embed", "mlp"), (8, 8), mesh, rules) == P("fsdp")
    # the batch over data x fsdp, a prefix when only that divides, else replicated
    sh = batch_shardings({"a": np.zeros((1, 8, 3)), "b": np.zeros((1, 2, 3)), "c": np.zeros((1, 3))},
                         mesh, leading=1)
    assert sh["a"].spec == P(None, ("data", "fsdp")) and sh["b"].spec == P(None, ("data",))
    assert sh["c"].spec == P()
    assert DEFAULT_RULES.mesh_axes("layers") == ()


def test_make_mesh_errors_name_the_fields():
    n = len(jax.devices())
    with pytest.raises(ConfigError, match="does not divide the device count"):
        make_mesh(MeshConfig(data=-1, fsdp=n + 1, tensor=1))
    with pytest.raises(ConfigError, match="MeshConfig.tensor"):
        make_mesh(MeshConfig(tensor=0))
    with pytest.raises(ConfigError, match="MeshConfig.data"):
        make_mesh(MeshConfig(data=0))
    m = make_mesh(MeshConfig())
    assert m.axis_names == AXES and m.shape["data"] == n


_SHARDED_VS_SINGLE = textwrap.dedent("""
    import json, sys, jax, jax.numpy as jnp, numpy as np, optax
    from marjax.config import MeshConfig, preset
    from marjax.models.lm import forward, init_params
    from marjax.train.mesh import make_mesh, init_sharded
    from marjax.train.optim import decay_mask
    from marjax.train.state import init_state
    from marjax.train.step import make_step_shardings, make_train_step
    assert len(jax.devices()) == 8

    def ce_loss(cfg):
        def loss_fn(student, teacher, batch, rng):
            logp = jax.nn.log_softmax(forward(student, batch["inputs"], cfg)[0], -1)
            nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
            s, n = jnp.sum(nll * batch["mask"]), jnp.sum(batch["mask"])
            return s, n, {"ce": (s, n)}
        return loss_fn
    out = {}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 8, 17)).astype(np.int32)        # 2 micro-batches of 8 sequences
    batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:], "mask": np.ones((2, 8, 16), np.float32)}
    batch["mask"][1, :, 10:] = 0.0                                   # unequal token counts
    for name in sys.argv[1:]:
        cfg = preset(name)
        tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1, mask=decay_mask)  # eps: no sign(~0 grad) flips
        res = {}
        for tag, mesh in (("single", make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])),
                          ("sharded", make_mesh(MeshConfig(2, 2, 2)))):
            params = init_sharded(lambda: init_params(jax.random.PRNGKey(0), cfg), mesh)
            state = init_state(params, tx, 0, mesh)
            sh = make_step_shardings(state, None, batch, mesh)
            step = make_train_step(ce_loss(cfg), tx, mesh, sh, accum_steps=2)
            losses = []
            for _ in range(2):
                state, o = step(state, None, jax.device_put(batch, sh.batch))
                losses.append(float(o["loss"]))
            leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
            res[tag] = {"loss": losses, "gn": float(o["grad_norm"]),
                        "params": {jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in leaves},
                        "specs": {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in leaves},
                        "n_shards": {jax.tree_util.keystr(k): len({str(s.index) for s in v.addressable_shards})
                                     for k, v in leaves}}
        out[name] = res
    print("RESULT" + json.dumps(out))
""")


def _run8(code: str, tmp_path, *args) -> str:
    return run_on_devices(["-c", code, *args], tmp_path, timeout=300).stdout


@pytest.mark.parametrize("model", ["tiny", pytest.param("tiny-ssm", marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(tmp_path, model):
    """2 steps (2 micro-batches each, unequal token counts) on a 2x2x2 mesh of 8 CPU devices
    equal the same steps on 1 device."""
    out = _run8(_SHARDED_VS_SINGLE, tmp_path, model)
    res = json.loads(out.split("RESULT", 1)[1])
    for name, r in res.items():
        single, sharded = r["single"], r["sharded"]
        np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5, err_msg=name)
        assert sharded["loss"][1] < sharded["loss"][0]
        np.testing.assert_allclose(sharded["gn"], single["gn"], rtol=1e-4, err_msg=name)
        for k, v in single["params"].items():
            np.testing.assert_allclose(np.array(sharded["params"][k]), np.array(v), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name} {k}")
        # the params really were split over the mesh
        assert "fsdp" in sharded["specs"][".embed"] and "tensor" in sharded["specs"][".embed"]
        assert sharded["n_shards"][".embed"] == 4 and single["n_shards"][".embed"] == 1
        assert sharded["n_shards"][".blocks.mlp.gate"] == 4
        mixer = ".blocks.mixer.in_proj" if name == "tiny-ssm" else ".blocks.mixer.wq"
        assert sharded["n_shards"][mixer] == 4


def test_unrolled_layers_take_the_axes_of_the_stacked_slices():
    """TrainConfig.layer_layout 'unrolled': each layer of the tuple gets the stacked leaf's axes
    without the leading 'layers' one, so it shards like that slice; decay_mask agrees too."""
    p = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), preset("tiny-ssm")))
    stacked, unrolled = logical_axes(p), logical_axes(unroll_layers(init_params(jax.random.PRNGKey(0),
                                                                                preset("tiny-ssm"))))
    assert type(unrolled.blocks) is tuple and len(unrolled.blocks) == preset("tiny-ssm").n_layers
    want = {k: v[1:] for k, v in _flat(stacked.blocks).items()}
    assert all(v[0] == "layers" for v in _flat(stacked.blocks).values())
    for layer in unrolled.blocks:
        assert _flat(layer) == want
    assert _flat(unrolled)[".embed"] == _flat(stacked)[".embed"]
    un_decay = decay_mask(unroll_layers(init_params(jax.random.PRNGKey(0), preset("tiny-ssm"))))
    st_decay = decay_mask(init_params(jax.random.PRNGKey(0), preset("tiny-ssm")))
    for layer in un_decay.blocks:
        assert jax.tree.leaves(layer) == jax.tree.leaves(st_decay.blocks)


_UNROLLED_LOOP = textwrap.dedent("""
    import dataclasses, json, sys, jax, jax.numpy as jnp, numpy as np
    from marjax.config import MeshConfig, TrainConfig, preset
    from marjax.models.lm import forward, init_params
    from marjax.train.checkpoint import load_model_dir
    from marjax.train.loop import train
    from marjax.train.mesh import make_mesh
    import marjax.train.loop as loop
    assert len(jax.devices()) == 8
    cfg = preset("tiny-ssm")

    def loss_fn(student, teacher, batch, rng):
        logp = jax.nn.log_softmax(forward(student, batch["inputs"], cfg)[0], -1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll), jnp.float32(nll.size), {}

    def batches():
        r = np.random.default_rng(0)
        while True:
            ids = r.integers(0, 256, (8, 17)).astype(np.int32)
            yield {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    specs = []
    make_step = loop.make_train_step
    def spy(loss, tx, mesh, sh, *a, **k):     # the shardings the unrolled step was built with
        specs.append(str(sh.state.params.blocks[0].mlp.gate.spec))
        return make_step(loss, tx, mesh, sh, *a, **k)
    out = {}
    mesh = make_mesh(MeshConfig(2, 2, 2))
    for layout in ("stacked", "unrolled"):
        tc = TrainConfig(steps=3, seq_len=16, micro_batch=8, batch_tokens=128, lr=1e-2, warmup=1, save_every=3,
                         layer_layout=layout)
        loop.make_train_step = spy if layout == "unrolled" else make_step
        p, h = train(loss_fn, init_params(jax.random.PRNGKey(0), cfg), None, batches(), tc,
                     sys.argv[1] + "/" + layout, model_meta={"stage": "pretrain", "model_config": dataclasses.asdict(cfg)},
                     progress=False, mesh=mesh)
        _, q, _ = load_model_dir(sys.argv[1] + "/" + layout)
        out[layout] = {"loss": [r["loss"] for r in h], "gate": np.asarray(p.blocks.mlp.gate).tolist(),
                       "saved_equal": all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
                                          for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))}
    out["specs"] = specs
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow   # fast siblings: the unrolled layers' axes (above), the stacked sharded step, the unrolled loop
def test_unrolled_layout_trains_sharded(tmp_path):
    """The trainer in the unrolled layout on a 2x2x2 mesh of 8 CPU devices: each layer sharded as
    its stacked slice would be, the same losses and params as the stacked run up to rounding, and
    a stacked checkpoint equal to the returned params."""
    res = json.loads(_run8(_UNROLLED_LOOP, tmp_path, str(tmp_path)).split("RESULT", 1)[1])
    assert res["specs"] and all("fsdp" in s and "tensor" in s for s in res["specs"]), res["specs"]
    st, un = res["stacked"], res["unrolled"]
    np.testing.assert_allclose(un["loss"], st["loss"], rtol=1e-5)
    np.testing.assert_allclose(np.array(un["gate"]), np.array(st["gate"]), rtol=1e-4, atol=1e-5)
    assert st["saved_equal"] and un["saved_equal"]
