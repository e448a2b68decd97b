"""The training loop: loss falls, exact resume, accumulation = one big batch, divergence stop,
trainable masks, bf16 compute."""
import dataclasses
import itertools
import json
import threading
import time
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from marjax.config import MeshConfig, TrainConfig, preset
from marjax.errors import CheckpointError, ConfigError
from marjax.models.lm import forward, init_params
from marjax.train.checkpoint import BackgroundSaves, Checkpointer, load_model_dir
from marjax.train.loop import TrainingDiverged, read_metrics, train
from marjax.train.mesh import make_mesh, shard_params
from marjax.train.optim import accum_steps, lr_schedule, make_optimizer
from marjax.train.state import init_state
from marjax.train.step import make_step_shardings, make_train_step, stack_micro_batches

CFG = preset("tiny")
L = 16


def _steps(path) -> list:
    with Checkpointer(path) as ck:
        return ck.all_steps()




def ce_loss(cfg):
    def loss_fn(student, teacher, batch, rng):
        logp = jax.nn.log_softmax(forward(student, batch["inputs"], cfg)[0], -1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        s, n = jnp.sum(nll * batch["mask"]), jnp.sum(batch["mask"])
        if "poison" in batch:    # a batch that makes the loss NaN (divergence test)
            s = s * jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, 1.0)
        return s, n, {"ce": (s, n), "mask_frac": (n, jnp.float32(batch["mask"].size))}
    return loss_fn


def _sequence(j: int) -> dict:
    """A learnable toy language: arithmetic progressions mod 32."""
    r = np.random.default_rng(j)
    start, stride = r.integers(0, 32), r.integers(1, 4)
    x = ((start + stride * np.arange(L + 1)) % 32).astype(np.int32)
    mask = np.ones(L, np.float32)
    mask[: j % 4] = 0.0                      # unequal token counts per sequence
    return {"inputs": x[:-1], "targets": x[1:], "mask": mask}


def grain_iter(batch_size: int, seed: int = 0):
    """A real Grain iterator (get_state/set_state)."""
    ds = grain.MapDataset.range(64).shuffle(seed=seed).repeat().map(_sequence).batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


class Crashing:
    """Delegates to an iterator and raises after `n` batches (a simulated kill)."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == 0:
            raise RuntimeError("simulated crash")
        self.n -= 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


def tcfg(**kw):
    base = dict(steps=6, seq_len=L, micro_batch=4, batch_tokens=4 * L, lr=1e-2, warmup=1, log_every=1,
                save_every=3, keep=2)
    base.update(kw)
    return TrainConfig(**base)


META = {"stage": "pretrain", "model_config": dataclasses.asdict(CFG)}


def _params():
    return init_params(jax.random.PRNGKey(0), CFG)


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
    for (k, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(k))


def test_accum_steps_and_schedule():
    assert accum_steps(tcfg(batch_tokens=8 * L)) == 2
    with pytest.raises(ConfigError, match="batch_tokens"):
        accum_steps(tcfg(batch_tokens=6 * L))
    sched = lr_schedule(tcfg(steps=10, warmup=4, lr=1.0))
    np.testing.assert_allclose([float(sched(s)) for s in (0, 3, 4, 10)], [0.2, 0.8, 1.0, 0.1], rtol=1e-6)


def test_loss_falls_and_log(tmp_path):
    params0 = _params()
    before = np.asarray(params0.embed).copy()
    params, hist = train(ce_loss(CFG), params0, None, grain_iter(4), tcfg(log_every=2, save_every=6),
                         tmp_path, model_meta=META, progress=False)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], [h["loss"] for h in hist]
    np.testing.assert_array_equal(np.asarray(params0.embed), before)   # the caller's params are not donated
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 4, 6]
    for key in ("loss", "ce", "mask_frac", "lr", "grad_norm", "tokens", "tokens_per_s", "time"):
        assert key in recs[-1], key
    assert recs[-1]["tokens"] == 6 * 4 * L
    # (sum, count) metrics reduce exactly: mask_frac over the log interval (steps 5-6)
    it = grain_iter(4)
    masks = [next(it)["mask"] for _ in range(6)][4:]
    np.testing.assert_allclose(recs[-1]["mask_frac"], sum(m.sum() for m in masks) / (2 * 4 * L), rtol=1e-6)
    assert json.loads((tmp_path / "marjax_checkpoint.json").read_text())["latest_step"] == 6


def test_resume_equals_uninterrupted(tmp_path):
    loss = ce_loss(CFG)
    p_full, h_full = train(loss, _params(), None, grain_iter(4), tcfg(), tmp_path / "full", model_meta=META,
                           progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):     # dies during step 4, after saving step 3
        train(loss, _params(), None, Crashing(grain_iter(4), 3), tcfg(), tmp_path / "cut", model_meta=META,
              progress=False)
    assert _steps(tmp_path / "cut") == [3]
    # a fresh iterator: resume must restore its position from the checkpoint
    p_res, h_res = train(loss, _params(), None, grain_iter(4), tcfg(), tmp_path / "cut", model_meta=META,
                         resume=True, progress=False)
    _assert_trees_close(p_res, p_full, rtol=0, atol=0)
    keys = ("step", "loss", "ce", "mask_frac", "lr", "grad_norm", "tokens")
    assert [{k: r[k] for k in keys} for r in h_res] == [{k: r[k] for k in keys} for r in h_full]
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_equals_one_big_batch():
    """accum 2 x 2 sequences == 1 x 4 sequences, with unequal token counts per micro-batch."""
    mesh = make_mesh(MeshConfig())
    it = grain_iter(4)
    big = next(it)
    big["mask"][:2, :8] = 0.0                      # first micro-batch has far fewer tokens
    small = [jax.tree.map(lambda x: x[:2], big), jax.tree.map(lambda x: x[2:], big)]
    params = shard_params(_params(), mesh, copy=True)
    out = {}
    for name, micro in (("big", [big]), ("accum", small)):
        tx = optax.sgd(0.5)                        # updates proportional to the gradients
        state = init_state(shard_params(params, mesh, copy=True), tx, 0, mesh)
        batch = stack_micro_batches(micro)
        step = make_train_step(ce_loss(CFG), tx, mesh, make_step_shardings(state, None, batch, mesh),
                               accum_steps=len(micro))
        state, o = step(state, None, batch)
        out[name] = (state.params, jax.device_get(o))
    (pa, oa), (pb, ob) = out["accum"], out["big"]
    np.testing.assert_allclose(oa["loss"], ob["loss"], rtol=1e-6)
    np.testing.assert_allclose(oa["grad_norm"], ob["grad_norm"], rtol=1e-5)
    assert oa["count"] == ob["count"] == big["mask"].sum()
    np.testing.assert_allclose(oa["metrics"]["mask_frac"], ob["metrics"]["mask_frac"])
    _assert_trees_close(pa, pb, rtol=1e-5, atol=1e-6)
    # the mean of per-micro-batch means differs: the test can tell the two reductions apart
    m = [float(jnp.sum(x["mask"])) for x in small]
    assert abs(m[0] - m[1]) > 10


def test_accumulation_in_the_loop_matches_big_batch(tmp_path):
    cfg_big = tcfg()
    cfg_acc = tcfg(micro_batch=2)
    split = ({k: v[h * 2:(h + 1) * 2] for k, v in b.items()} for b in grain_iter(4) for h in (0, 1))
    p_big, h_big = train(ce_loss(CFG), _params(), None, grain_iter(4), cfg_big, tmp_path / "a", model_meta=META,
                         progress=False)
    p_acc, h_acc = train(ce_loss(CFG), _params(), None, split, cfg_acc, tmp_path / "b", model_meta=META,
                         progress=False)
    np.testing.assert_allclose([h["loss"] for h in h_acc], [h["loss"] for h in h_big], rtol=1e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in h_acc], [h["grad_norm"] for h in h_big], rtol=1e-4)
    # Adam's first steps are ~lr * sign(g): gradients within rounding of 0 may flip sign, so
    # compare all but a few elements tightly
    for x, y in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_big)):
        close = np.isclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
        assert close.mean() > 0.999, close.mean()


def _poisoned(n_good):
    it = grain_iter(4)
    for i, b in enumerate(it):
        b["poison"] = np.full((4,), float(i >= n_good), np.float32)
        yield b


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="diverged at step 5") as ei:
        train(ce_loss(CFG), _params(), None, _poisoned(4), tcfg(save_every=2), tmp_path, model_meta=META,
              progress=False)
    e = ei.value
    assert e.step == 5 and e.last_good_step == 4
    assert _steps(tmp_path) == [2, 4]
    recs = read_metrics(tmp_path)
    assert recs[-1]["status"] == "diverged" and recs[-1]["step"] == 5
    assert all(np.isfinite(r["loss"]) for r in recs[:-1])
    # the in-memory params are the last good ones, equal to the step-4 checkpoint
    _, saved, _ = load_model_dir(tmp_path)
    _assert_trees_close(e.params, saved, rtol=0, atol=0)
    assert json.loads((tmp_path / "marjax_checkpoint.json").read_text())["latest_step"] == 4


def _poison_at(bad: set):
    """grain_iter(4) batches; the ones of the updates in `bad` (1-based) make the loss NaN."""
    for i, b in enumerate(grain_iter(4)):
        b["poison"] = np.full((4,), float(i + 1 in bad), np.float32)
        yield b


@pytest.mark.parametrize("policy, bad, fails_at", [("stop", {4}, 4), ("skip", {4, 5}, 5)])
def test_the_update_queued_after_a_failure_applies_nothing(tmp_path, policy, bad, fails_at):
    """The loop reads update s's results after queuing update s + 1 (a clean batch here): the
    streak the step carries on the device keeps s + 1 from applying, so the params the error
    holds are still those of the step-3 checkpoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # "skip" warns about update 4
        with pytest.raises(TrainingDiverged, match=f"diverged at step {fails_at}") as ei:
            train(ce_loss(CFG), _params(), None, _poison_at(bad),
                  tcfg(nonfinite=policy, max_skips=1, dispatch_ahead="on"), tmp_path, model_meta=META, progress=False)
    assert ei.value.last_good_step == 3
    _, saved, _ = load_model_dir(tmp_path)
    _assert_trees_close(ei.value.params, saved, rtol=0, atol=0)
    assert [r.get("status") for r in read_metrics(tmp_path)][-1] == "diverged"


@pytest.mark.parametrize("ahead, order", [("on", "DDRDRR" * 2), ("off", "DR" * 6), ("auto", "DR" * 6)])
def test_results_are_read_after_the_next_update_is_queued(tmp_path, monkeypatch, ahead, order):
    """dispatch_ahead on: no host sync between updates: update s's results are fetched once
    update s + 1 is dispatched, except at a save (steps 3 and 6 here), whose results are read at
    once. off (and auto on CPU): each update's results are read right after its dispatch."""
    from marjax.train import loop
    events = []
    make = loop.make_train_step

    def spy_make(*a, **k):
        step = make(*a, **k)
        return lambda *args: (events.append("D"), step(*args))[1]

    class Jax:       # the loop's `jax`, with device_get of a step's results recorded
        def __getattr__(self, name):
            return getattr(jax, name)

        def device_get(self, x):
            if isinstance(x, dict) and "finite" in x:
                events.append("R")
            return jax.device_get(x)

    monkeypatch.setattr(loop, "make_train_step", spy_make)
    monkeypatch.setattr(loop, "jax", Jax())
    _, hist = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(dispatch_ahead=ahead), tmp_path,
                    model_meta=META, progress=False)
    assert "".join(events) == order
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5, 6]


def test_dispatch_ahead_refuses_other_values(tmp_path):
    with pytest.raises(ConfigError, match=r"dispatch_ahead must be one of \('auto', 'on', 'off'\), got 'yes'"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(dispatch_ahead="yes"), tmp_path, model_meta=META,
              progress=False)


@pytest.mark.parametrize("ahead", ["on", "off"])
def test_save_interval_skips_cadence_saves_that_come_too_soon(tmp_path, ahead):
    """save_every=2 saves 2, 4, 6; with a save interval no run this short reaches, only the last
    step saves, and the run ends where the other does (saving changes nothing)."""
    runs = {}
    for interval in (0.0, 1e6):
        out = tmp_path / str(interval)
        runs[interval], _ = train(ce_loss(CFG), _params(), None, grain_iter(4),
                                  tcfg(save_every=2, keep=5, save_interval_s=interval, dispatch_ahead=ahead), out,
                                  model_meta=META, progress=False)
        assert _steps(out) == ([2, 4, 6] if interval == 0 else [6])
    _assert_trees_close(runs[0.0], runs[1e6], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="save_interval_s must be a number >= 0"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(save_interval_s=-1.0), tmp_path / "bad",
              model_meta=META, progress=False)


@pytest.mark.parametrize("ahead", ["on", "off"])
def test_logged_throughput_matches_the_clock(tmp_path, ahead):
    """tokens_per_s of each log interval agrees with the tokens over the records' own clock: a
    device computation while logging (the lr schedule once was) waits behind the update queued
    after the logged one, and the interval timer then measured the host's work alone (4-5x too
    high here) while the device sat idle between updates."""
    _, hist = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(steps=10, save_every=10, dispatch_ahead=ahead),
                    tmp_path, model_meta=META, progress=False)
    per_step = 4 * L
    ratios = [h["tokens_per_s"] * (h["time"] - g["time"]) / per_step for g, h in zip(hist[1:-2], hist[2:-1])]
    assert 0.6 < float(np.median(ratios)) < 1.5, ratios


def test_wrong_stage_resume_refused(tmp_path):
    with pytest.warns(UserWarning, match="exhausted after step 2"):   # a 2-batch dataset ends the run early
        train(ce_loss(CFG), _params(), None, itertools.islice(grain_iter(4), 2), tcfg(save_every=2), tmp_path,
              model_meta=dict(META, stage="orient"), progress=False)
    assert _steps(tmp_path) == [2]
    with pytest.raises(CheckpointError, match="stage 'orient', expected stage 'kd'"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(steps=4, save_every=2), tmp_path,
              model_meta=dict(META, stage="kd"), resume=True, progress=False)
    other = dataclasses.asdict(dataclasses.replace(CFG, d_ff=64))
    with pytest.raises(CheckpointError, match="d_ff"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(steps=4, save_every=2), tmp_path,
              model_meta={"stage": "orient", "model_config": other}, resume=True, progress=False)


def test_trainable_mask_freezes_and_skips_state(tmp_path):
    p0 = _params()
    mask = jax.tree.map(lambda _: False, p0)
    mask = dataclasses.replace(mask, blocks=dataclasses.replace(mask.blocks, mlp=jax.tree.map(lambda _: True,
                                                                                             p0.blocks.mlp)))
    p, _ = train(ce_loss(CFG), p0, None, grain_iter(4), tcfg(steps=2, save_every=2), tmp_path, trainable=mask,
                 model_meta=META, progress=False)
    np.testing.assert_array_equal(np.asarray(p.embed), np.asarray(p0.embed))
    np.testing.assert_array_equal(np.asarray(p.blocks.mixer.wq), np.asarray(p0.blocks.mixer.wq))
    assert not np.allclose(np.asarray(p.blocks.mlp.up), np.asarray(p0.blocks.mlp.up))
    n_state = sum(x.size for x in jax.tree.leaves(make_optimizer(tcfg(), p0, mask).init(p0)))
    n_mlp = sum(x.size for x in jax.tree.leaves(p0.blocks.mlp))
    assert n_state <= 2 * n_mlp + 8          # Adam moments for the MLP only (plus counters)


def test_bf16_compute_keeps_f32_master(tmp_path):
    tc = tcfg(steps=6, save_every=6, log_every=1)
    p32, h32 = train(ce_loss(CFG), _params(), None, grain_iter(4), tc, tmp_path / "a", model_meta=META,
                     progress=False)
    p16, h16 = train(ce_loss(CFG), _params(), None, grain_iter(4), tc, tmp_path / "b", model_meta=META,
                     progress=False, compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    np.testing.assert_allclose(h16[0]["loss"], h32[0]["loss"], rtol=3e-2)
    assert h16[0]["loss"] != h32[0]["loss"]       # it really ran in bf16


# ---- TrainConfig.layer_layout "unrolled" (marjax.train.layout) ----------------------------------

def test_unrolled_layout_trains_like_stacked(tmp_path):
    """The same run in both layouts: the same losses and params up to float rounding (XLA fuses
    the two programs differently), stacked params back, and the checkpoint a stacked one that
    load_model_dir reads."""
    p_st, h_st = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(), tmp_path / "st", model_meta=META,
                       progress=False)
    p_un, h_un = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(layer_layout="unrolled"),
                       tmp_path / "un", model_meta=META, progress=False)
    assert jax.tree.structure(p_un) == jax.tree.structure(p_st)
    _assert_trees_close(p_un, p_st, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([h["loss"] for h in h_un], [h["loss"] for h in h_st], rtol=1e-5)
    assert h_un[-1]["loss"] < 0.5 * h_un[0]["loss"]
    cfg, params, _ = load_model_dir(tmp_path / "un")
    _assert_trees_close(params, p_un, rtol=0, atol=0)


@pytest.mark.slow   # fast siblings: test_unrolled_layout_trains_like_stacked, test_resume_equals_uninterrupted
def test_unrolled_layout_resume_and_switch(tmp_path):
    """Resume is exact in the unrolled layout, and a stacked run resumes from its checkpoints."""
    loss, tc = ce_loss(CFG), tcfg(layer_layout="unrolled")
    p_full, _ = train(loss, _params(), None, grain_iter(4), tc, tmp_path / "full", model_meta=META, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(loss, _params(), None, Crashing(grain_iter(4), 3), tc, tmp_path / "cut", model_meta=META,
              progress=False)
    p_res, _ = train(loss, _params(), None, grain_iter(4), tc, tmp_path / "cut", model_meta=META, resume=True,
                     progress=False)
    _assert_trees_close(p_res, p_full, rtol=0, atol=0)
    # the checkpoint at step 3 continued by a stacked run: the same result up to rounding
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(loss, _params(), None, Crashing(grain_iter(4), 3), tc, tmp_path / "switch", model_meta=META,
              progress=False)
    p_sw, _ = train(loss, _params(), None, grain_iter(4), tcfg(), tmp_path / "switch", model_meta=META,
                    resume=True, progress=False)
    _assert_trees_close(p_sw, p_full, rtol=1e-4, atol=1e-5)


def test_unrolled_layout_with_mask_and_teacher(tmp_path):
    """A frozen part stays frozen, and an LMParams teacher is unrolled with the student."""
    p0 = _params()
    mask = jax.tree.map(lambda _: False, p0)
    mask = dataclasses.replace(mask, blocks=dataclasses.replace(mask.blocks, mlp=jax.tree.map(lambda _: True,
                                                                                             p0.blocks.mlp)))
    seen = []
    teacher = init_params(jax.random.PRNGKey(1), CFG)
    p, _ = train(_kd_loss(seen), p0, teacher, grain_iter(4), tcfg(steps=2, save_every=2, layer_layout="unrolled"),
                 tmp_path, trainable=mask, model_meta=META, progress=False)
    assert seen and all(s is tuple and t is tuple for s, t in seen)
    np.testing.assert_array_equal(np.asarray(p.embed), np.asarray(p0.embed))
    np.testing.assert_array_equal(np.asarray(p.blocks.mixer.wq), np.asarray(p0.blocks.mixer.wq))
    assert not np.allclose(np.asarray(p.blocks.mlp.up), np.asarray(p0.blocks.mlp.up))


def _kd_loss(seen):
    def loss_fn(student, teacher, batch, rng):
        seen.append((type(student.blocks), type(teacher.blocks)))
        t = jax.nn.softmax(forward(teacher, batch["inputs"], CFG)[0], -1)
        logp = jax.nn.log_softmax(forward(student, batch["inputs"], CFG)[0], -1)
        s = -jnp.sum(t * logp, -1)
        return jnp.sum(s * batch["mask"]), jnp.sum(batch["mask"]), {}
    return loss_fn


@pytest.mark.parametrize("layer_layout", ["stacked", "unrolled"])
def test_teacher_layout(tmp_path, layer_layout):
    """TrainConfig.teacher_layout sets the teacher's layout in the step, whatever the student's;
    the run is the same up to float rounding."""
    teacher = init_params(jax.random.PRNGKey(1), CFG)
    student_type = tuple if layer_layout == "unrolled" else type(teacher.blocks)
    runs = {}
    for t_layout, t_type in (("auto", tuple), ("stacked", type(teacher.blocks))):   # auto: unrolled on CPU
        seen = []
        runs[t_layout] = train(_kd_loss(seen), _params(), teacher, grain_iter(4),
                               tcfg(steps=2, save_every=2, layer_layout=layer_layout, teacher_layout=t_layout),
                               tmp_path / t_layout, model_meta=META, progress=False)
        assert seen and all(s is student_type and t is t_type for s, t in seen), (t_layout, seen)
    _assert_trees_close(runs["auto"][0], runs["stacked"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([h["loss"] for h in runs["auto"][1]], [h["loss"] for h in runs["stacked"][1]],
                               rtol=1e-5)


def test_teacher_layout_auto_by_platform():
    """"auto" unrolls the teacher on CPU only; on TPU/GPU the scan's slice feeds the matmul and
    unrolling would cost compile time and a second teacher in device memory."""
    from types import SimpleNamespace
    from marjax.train.layout import layout_teacher, teacher_layout_on
    def mesh_on(platform):
        return SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)], dtype=object))
    assert TrainConfig().teacher_layout == "auto"
    assert teacher_layout_on("auto", mesh_on("cpu")) == "unrolled"
    assert teacher_layout_on("auto", mesh_on("tpu")) == "stacked"
    assert teacher_layout_on("auto", mesh_on("gpu")) == "stacked"
    assert teacher_layout_on("unrolled", mesh_on("tpu")) == "unrolled"
    teacher = init_params(jax.random.PRNGKey(1), CFG)
    assert layout_teacher(teacher, "auto", mesh_on("tpu")) is teacher
    back = layout_teacher(layout_teacher(teacher, "auto", mesh_on("cpu")), "stacked")
    _assert_trees_close(back, teacher, rtol=0, atol=0)
    assert layout_teacher(None, "unrolled") is None


def test_unrolled_layout_refusals(tmp_path):
    with pytest.raises(ConfigError, match="layer_layout"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(layer_layout="columns"), tmp_path,
              model_meta=META, progress=False)
    with pytest.raises(ConfigError, match="teacher_layout"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(teacher_layout="columns"), tmp_path,
              model_meta=META, progress=False)
    with pytest.raises(ConfigError, match="trains LMParams"):
        train(lambda s, t, b, r: (jnp.sum(s["w"]), 1.0, {}), {"w": jnp.ones(3)}, None, grain_iter(4),
              tcfg(layer_layout="unrolled"), tmp_path, model_meta=META, progress=False)


def test_the_last_save_is_written_in_the_background(tmp_path, monkeypatch):
    """With `saves`, train returns while its last save is still being written (held here on an
    event), its mid-run save done in line; a second train waits for that save before its own
    first one; once waited on, the checkpoint holds the returned params and resumes as finished."""
    log, release = [], threading.Event()
    real_save = Checkpointer.save

    def save(self, step, *a, **kw):
        log.append(("start", self.directory.name, step))
        if (self.directory.name, step) == ("a", 6):
            release.wait(timeout=20)       # in line, train would sit here 20 s and return after it
        real_save(self, step, *a, **kw)
        log.append(("end", self.directory.name, step))

    monkeypatch.setattr(Checkpointer, "save", save)
    with BackgroundSaves() as saves:
        params, _ = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(), tmp_path / "a",
                          model_meta=META, progress=False, saves=saves)
        assert saves.in_flight and ("end", "a", 6) not in log and ("end", "a", 3) in log
        threading.Timer(1.0, release.set).start()
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(), tmp_path / "b", model_meta=META,
              progress=False, saves=saves)
        assert log.index(("end", "a", 6)) < log.index(("start", "b", 3))
    assert _steps(tmp_path / "a") == [3, 6]
    _, saved, _ = load_model_dir(tmp_path / "a")
    _assert_trees_close(saved, params, rtol=0, atol=0)
    again, _ = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(), tmp_path / "a", model_meta=META,
                     progress=False, resume=True)
    _assert_trees_close(again, params, rtol=0, atol=0)


def test_a_failed_background_save_is_raised_by_wait(tmp_path, monkeypatch):
    real_save = Checkpointer.save

    def save(self, step, *a, **kw):
        if step == 6:
            raise OSError(28, "No space left on device")
        real_save(self, step, *a, **kw)

    monkeypatch.setattr(Checkpointer, "save", save)
    saves = BackgroundSaves()
    train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(), tmp_path, model_meta=META, progress=False,
          saves=saves)
    with pytest.raises(CheckpointError, match="background save of step 6 .*No space left"):
        saves.wait()
    saves.wait()                            # reported once
    assert _steps(tmp_path) == [3]


def test_background_saves_order_and_exit():
    """submit waits for the save before; leaving a block on an exception keeps that exception
    and warns about a failed save."""
    order, saves = [], BackgroundSaves()
    saves.submit(lambda: (time.sleep(0.3), order.append(1)), what="one")
    saves.submit(lambda: order.append(2), what="two")
    saves.wait()
    assert order == [1, 2] and not saves.in_flight

    def fail():
        raise OSError("disk gone")

    with pytest.warns(UserWarning, match="background save of two failed: OSError: disk gone"):
        with pytest.raises(KeyError, match="the body's own"):
            with BackgroundSaves() as s:
                s.submit(fail, what="two")
                raise KeyError("the body's own")
    with pytest.raises(CheckpointError, match="disk gone"):
        with BackgroundSaves() as s:
            s.submit(fail, what="two")


@pytest.mark.parametrize("background", [False, True])
def test_a_last_save_without_optimizer_state(tmp_path, background):
    """final_opt_state=False: the mid-run checkpoint keeps the Adam moments, the last one holds
    the params alone (and is the smaller); they load and resume as finished, bit for bit; resuming
    it to more steps, or restoring its full state, is refused with the reason."""
    saves = BackgroundSaves() if background else None
    params, _ = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(final_opt_state=False), tmp_path,
                      model_meta=META, progress=False, saves=saves)
    if saves is not None:
        saves.wait()
    with Checkpointer(tmp_path) as ck:
        assert ck.all_steps() == [3, 6] and ck.has_opt_state(3) and not ck.has_opt_state(6)
        with pytest.raises(CheckpointError, match="holds no optimizer state"):
            ck.restore(init_state(params, make_optimizer(tcfg(), params), 0, make_mesh(MeshConfig())), 6)
    size = lambda s: sum(f.stat().st_size for f in (tmp_path / str(s)).rglob("*") if f.is_file())  # noqa: E731
    assert size(6) < 0.6 * size(3)
    _, saved, _ = load_model_dir(tmp_path)
    _assert_trees_close(saved, params, rtol=0, atol=0)
    again, hist = train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(final_opt_state=False), tmp_path,
                        model_meta=META, progress=False, resume=True)
    _assert_trees_close(again, params, rtol=0, atol=0)
    assert hist and hist[-1]["step"] == 6
    with pytest.raises(CheckpointError, match="step 6 ends an earlier run .* cannot be continued to step 8"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(steps=8, final_opt_state=False), tmp_path,
              model_meta=META, progress=False, resume=True)
    with pytest.raises(ConfigError, match="final_opt_state must be true or false"):
        train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(final_opt_state="no"), tmp_path / "bad",
              model_meta=META, progress=False)
