"""Checkpoints: exact round trip, retention, metadata checks, model loading, and restore onto a
different device count."""
import dataclasses
import functools
import json
import textwrap
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.config import MeshConfig, TrainConfig, preset
from marjax.errors import CheckpointError
from marjax.models.lm import init_params
from marjax.train.checkpoint import (Checkpointer, check_compatible, load_model_dir, make_meta, read_run_meta,
                                     tree_to_dict)
from marjax.train.mesh import make_mesh, shard_params
from marjax.train.optim import make_optimizer
from marjax.train.state import TrainState, abstract_state, init_state

from simulated_devices import run_on_devices   # tests/simulated_devices.py


def _steps(path) -> list:
    with Checkpointer(path) as ck:
        return ck.all_steps()
CFG = preset("tiny-ssm")


@functools.lru_cache(maxsize=None)
def _state(cfg=CFG, seed=0, trainable="mixer"):
    mesh = make_mesh(MeshConfig())
    p = shard_params(jax.jit(init_params, static_argnums=1)(jax.random.PRNGKey(seed), cfg), mesh)
    mask = None
    if trainable == "mixer":   # a multi_transform state with masked (stateless) leaves
        mask = jax.tree.map(lambda _: False, p)
        mask = dataclasses.replace(mask, blocks=dataclasses.replace(
            mask.blocks, mixer=jax.tree.map(lambda _: True, p.blocks.mixer)))
    tx = make_optimizer(TrainConfig(), p, mask)
    st = init_state(p, tx, seed, mesh)
    # non-trivial optimizer moments and rng, so the round trip is checked on real values
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), p)
    upd, opt = jax.jit(tx.update)(grads, st.opt_state, p)
    return TrainState(step=st.step + 7, params=jax.tree.map(lambda a, b: a + b, p, upd), opt_state=opt,
                      rng=jax.random.split(st.rng)[0])


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact_with_data_state_and_retention(tmp_path):
    st = _state()
    it = iter(grain.MapDataset.range(10).shuffle(seed=1).repeat().to_iter_dataset())
    next(it), next(it), next(it)
    ck = Checkpointer(tmp_path, keep=2)
    for s in (1, 2, 3):
        ck.save(s, st, it.get_state(), make_meta("kd", CFG, tokenizer_source="tiny"))
    ck.close()
    ck = Checkpointer(tmp_path, keep=2)   # reopened: sees the kept steps on disk
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    target = _state(seed=1)                             # other values, same structure
    restored, data_state, meta = ck.restore(abstract_state(target))
    _same(restored, st)
    it2 = iter(grain.MapDataset.range(10).shuffle(seed=1).repeat().to_iter_dataset())
    it2.set_state(data_state)
    assert [next(it2) for _ in range(5)] == [next(it) for _ in range(5)]
    assert meta["stage"] == "kd" and meta["model_kind"] == "ssm" and meta["latest_step"] == 3
    run = read_run_meta(tmp_path)
    assert run["latest_step"] == 3 and run["model_config"]["name"] == "tiny-ssm" and run["stage"] == "kd"
    ck.close()


def test_best_n_keeps_best_and_latest(tmp_path):
    st = _state(trainable="all")
    ck = Checkpointer(tmp_path, keep=2, best_metric="loss", best_mode="min")
    for s, loss in zip((1, 2, 3, 4, 5), (3.0, 1.0, 2.0, 5.0, 4.0)):
        ck.save(s, st, None, make_meta("kd", CFG), metrics={"loss": loss})
    ck.wait()
    assert ck.all_steps() == [2, 3, 5] and ck.best_step() == 2
    with pytest.raises(CheckpointError, match="best_metric 'loss' missing"):
        ck.save(6, st, None, make_meta("kd", CFG))
    ck.close()


def test_restore_refuses_other_structure(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, _state(trainable="all"), None, make_meta("kd", CFG))
    ck.close()
    other = _state(preset("tiny"), trainable="all")          # attention params, not SSM
    with pytest.raises(CheckpointError, match="different model or optimizer structure"):
        with Checkpointer(tmp_path) as ck:
            ck.restore(abstract_state(other))
    bigger = _state(dataclasses.replace(CFG, d_ff=256), trainable="all")
    with pytest.raises(CheckpointError, match="shapes differ"):
        with Checkpointer(tmp_path) as ck:
            ck.restore(abstract_state(bigger))
    with pytest.raises(CheckpointError, match="no checkpoint for step 9"):
        with Checkpointer(tmp_path) as ck:
            ck.restore(abstract_state(other), step=9)


def test_check_compatible():
    meta = make_meta("sbds", CFG)
    check_compatible(meta, expected_stage="sbds", expected_model=CFG)
    check_compatible(meta, expected_model="ssm")
    check_compatible(meta, expected_model=dataclasses.replace(CFG, name="renamed"))   # names do not matter
    with pytest.raises(CheckpointError, match="stage 'sbds', expected stage 'kd'"):
        check_compatible(meta, expected_stage="kd")
    with pytest.raises(CheckpointError, match=r"differs .* in \['mixer', 'ssm'\]"):
        check_compatible(meta, expected_model=preset("tiny"))
    with pytest.raises(CheckpointError, match="'ssm' model, expected 'spiking'"):
        check_compatible(meta, expected_model="spiking")


def test_load_model_dir(tmp_path):
    st = _state(trainable="all")
    ck = Checkpointer(tmp_path)
    ck.save(4, st, None, make_meta("kd", CFG, tokenizer_source="tiny"))
    ck.close()
    cfg, params, tok = load_model_dir(tmp_path)
    assert cfg == CFG
    _same(params, st.params)
    pytest.importorskip("marjax.io.resolve")
    assert tok is not None and tok.decode(tok.encode("hi")) == "hi"
    with pytest.raises(CheckpointError, match="not a marjax checkpoint directory"):
        load_model_dir(tmp_path / "nothing")


TC = TrainConfig(steps=4, seq_len=16, micro_batch=8, batch_tokens=128, lr=1e-2, warmup=1, save_every=2, log_every=1)


def _seq(j):
    x = ((j + np.arange(17) * (1 + j % 3)) % 64).astype(np.int32)
    return {"inputs": x[:-1], "targets": x[1:], "mask": np.ones(16, np.float32)}


def data_iter():
    return iter(grain.MapDataset.range(32).shuffle(seed=0).repeat().map(_seq).batch(8).to_iter_dataset())


def flat(tree) -> dict:
    """{'a/b/c': array} over a state's tree_to_dict."""
    d = tree_to_dict(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(d)[0]}


_OTHER_DEVICE_COUNT = textwrap.dedent("""
    import dataclasses, sys, jax, jax.numpy as jnp, numpy as np
    from marjax.config import MeshConfig
    from marjax.models.lm import forward, init_params
    from marjax.train.checkpoint import Checkpointer
    from marjax.train.loop import train
    from marjax.train.mesh import make_mesh, shard_params
    from marjax.train.optim import make_optimizer
    from marjax.train.state import abstract_state, init_state
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import CFG, TC, data_iter, flat
    assert len(jax.devices()) == 8
    d = sys.argv[1]
    mesh = make_mesh(MeshConfig(2, 2, 2))
    p = shard_params(init_params(jax.random.PRNGKey(1), CFG), mesh)
    target = init_state(p, make_optimizer(TC, p), 1, mesh)
    # the full state saved on 1 device, restored sharded over 8
    with Checkpointer(d) as ck:
        state, data_state, meta = ck.restore(abstract_state(target))
    saved = np.load(d + "/../one_device.npz")
    got = flat(state)
    assert sorted(got) == sorted(saved.files), (sorted(got)[:5], sorted(saved.files)[:5])
    for k, v in got.items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)
    mu = state.opt_state.mu.blocks.mixer.in_proj
    assert len({str(s.index) for s in mu.addressable_shards}) == 4, mu.sharding

    def loss_fn(student, teacher, batch, rng):
        logp = jax.nn.log_softmax(forward(student, batch["inputs"], CFG)[0], -1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        s, n = jnp.sum(nll * batch["mask"]), jnp.sum(batch["mask"])
        return s, n, {"ce": (s, n)}
    # resume training on the 2x2x2 mesh: steps 3 and 4
    params, hist = train(loss_fn, p, None, data_iter(), TC, d, mesh=mesh, resume=True, progress=False,
                         model_meta={"stage": "kd", "model_config": dataclasses.asdict(CFG)})
    assert [h["step"] for h in hist] == [1, 2, 3, 4], hist
    np.savez(d + "/../eight_devices.npz", **flat(params))
    print("OK")
""")


def test_restore_onto_a_different_device_count(tmp_path):
    """A state saved on 1 device restores exactly onto a 2x2x2 mesh and resumes training there;
    the 8-device checkpoint loads back onto 1 device."""
    d = tmp_path / "run"
    st = dataclasses.replace(_state(trainable="all"), step=jnp.int32(2))
    it = data_iter()
    next(it), next(it)
    ck = Checkpointer(d)
    ck.save(2, st, it.get_state(), make_meta("kd", CFG))
    ck.close()
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "tokens": 128 * s}) + "\n"
                                             for s in (1, 2)))
    np.savez(tmp_path / "one_device.npz", **flat(st))
    r = run_on_devices(["-c", _OTHER_DEVICE_COUNT, d, Path(__file__).parent], tmp_path, timeout=300)
    assert "OK" in r.stdout, r.stdout[-2000:]
    assert _steps(d) == [2, 4]
    cfg, params, _ = load_model_dir(d)                  # saved sharded over 8 devices, read onto 1
    assert cfg == CFG
    saved = np.load(tmp_path / "eight_devices.npz")
    got = flat(params)
    assert sorted(got) == sorted(saved.files)
    for k, v in got.items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)
    assert not np.array_equal(got["blocks/mixer/in_proj"], np.asarray(st.params.blocks.mixer.in_proj))
    assert read_run_meta(d)["latest_step"] == 4
