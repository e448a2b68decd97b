"""Sharded loading on 8 simulated CPU devices: GGUF (F32 and Q8_0), HF Llama safetensors, Llamba,
a marjax spiking safetensors dir and an Orbax run dir become params whose every leaf is in its
target sharding, equal to the unsharded load, each device holding (and each read returning)
only its block, and no full array of a sharded leaf ever passed to jax.device_put."""
import json

from simulated_devices import run_on_devices   # tests/simulated_devices.py


_SCRIPT = r'''
import dataclasses, json, sys, warnings
import jax, jax.numpy as jnp, numpy as np, optax
from marjax.config import MeshConfig, preset, replace
from marjax.io import load_gguf, load_hf, save_gguf, save_hf, save_llamba
from marjax.io.tokenizer import ByteTokenizer
from marjax.models.lm import init_params
from marjax.models.spiking import make_spiking_student
from marjax.train.checkpoint import Checkpointer, load_model_dir, load_on_mesh, make_meta
from marjax.train.mesh import ShardingRules, make_mesh, param_shardings
from marjax.train.state import TrainState

tmp = sys.argv[1]
assert len(jax.devices()) == 8
key = jax.random.PRNGKey(3)
tiny, tssm = preset("tiny"), preset("tiny-ssm")
p_att = init_params(key, tiny)
p_ssm = init_params(key, tssm)
p_ssm = dataclasses.replace(p_ssm, blocks=dataclasses.replace(p_ssm.blocks, mixer=dataclasses.replace(
    p_ssm.blocks.mixer, a_log_bias=jnp.zeros_like(p_ssm.blocks.mixer.a_log_bias))))   # Llamba has none
scfg, p_spk = make_spiking_student(p_ssm, tssm, preset("tiny-spiking").atmn)
tok = ByteTokenizer()
save_gguf(f"{tmp}/f32.gguf", tiny, p_att, tok, qtype="F32")
save_gguf(f"{tmp}/q8.gguf", tiny, p_att, tok, qtype="Q8_0")
save_hf(f"{tmp}/llama", tiny, p_att, tok)
save_llamba(f"{tmp}/llamba", tssm, p_ssm, tok)
save_hf(f"{tmp}/spiking", scfg, p_spk, tok)
ck = Checkpointer(f"{tmp}/run", keep=1, async_save=False)
tx = optax.adam(1e-3)
ck.save(1, TrainState(step=jnp.int32(1), params=p_ssm, opt_state=tx.init(p_ssm), rng=jax.random.PRNGKey(0)),
        {}, make_meta("kd", tssm))
ck.close()
plain = {"f32.gguf": load_gguf(f"{tmp}/f32.gguf")[1], "q8.gguf": load_gguf(f"{tmp}/q8.gguf")[1],
         "llama": load_hf(f"{tmp}/llama")[1], "llamba": load_hf(f"{tmp}/llamba")[1],
         "spiking": load_hf(f"{tmp}/spiking")[1], "run": load_model_dir(f"{tmp}/run")[1]}

# spies: every block a loader reads must have the shard shape of its leaf, and jax.device_put
# must never see a full array of a leaf that is split
reads, puts = [], []
orig_cb, orig_put = jax.make_array_from_callback, jax.device_put
def cb_spy(shape, sharding, cb, *a, **k):
    want = sharding.shard_shape(shape)
    def wrapped(index):
        out = cb(index)
        reads.append((tuple(shape), want, tuple(np.shape(out))))
        return out
    return orig_cb(shape, sharding, wrapped, *a, **k)
def put_spy(x, *a, **k):
    puts.extend(tuple(np.shape(v)) for v in jax.tree.leaves(x) if hasattr(v, "shape"))
    return orig_put(x, *a, **k)
jax.make_array_from_callback, jax.device_put = cb_spy, put_spy

res = {}
for mesh_shape in [(2, 2, 2), (1, 2, 4)]:
    mesh = make_mesh(MeshConfig(*mesh_shape))
    for name, ref in plain.items():
        reads.clear(); puts.clear()
        cfg, params, _ = load_on_mesh(f"{tmp}/{name}", mesh)
        target = param_shardings(params, mesh)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        tflat = jax.tree.leaves(target)
        rflat = jax.tree.leaves(ref)
        assert len(flat) == len(tflat) == len(rflat), (name, len(flat), len(tflat), len(rflat))
        split, full_shapes = 0, set()
        for (path, a), t, r in zip(flat, tflat, rflat):
            where = f"{name} {mesh_shape} {jax.tree_util.keystr(path)}"
            assert a.sharding.is_equivalent_to(t, a.ndim), (where, a.sharding, t)
            assert a.dtype == r.dtype and a.shape == r.shape, (where, a.dtype, r.dtype)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(r), err_msg=where)
            want = t.shard_shape(a.shape)
            assert all(s.data.shape == want for s in a.addressable_shards), where
            if want != a.shape:
                split += 1
                full_shapes.add(a.shape)
        if name != "run":     # Orbax restores by itself; the file readers go through the callback
            assert reads and all(w == g for _, w, g in reads), [r for r in reads if r[1] != r[2]][:3]
        assert not (set(puts) & full_shapes), (name, sorted(set(puts) & full_shapes))
        res[f"{name}{mesh_shape}"] = {"leaves": len(flat), "split": split, "reads": len(reads)}
print("RESULT" + json.dumps(res))
'''


def test_sharded_loads_on_8_devices(tmp_path):
    r = run_on_devices(["-c", _SCRIPT, tmp_path], tmp_path)
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert len(res) == 12
    for name, rec in res.items():
        assert rec["split"] >= 5, (name, rec)     # most weights really are split, not replicated
