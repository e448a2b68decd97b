"""Non-finite numbers: NaN/inf injected into a batch's teacher logits (offline top-k kd), into a
gradient (finite loss), into a parameter (at the start, and through an overflowing update); the
step's finite gate by `param_bound` against its exact check.
TrainConfig.nonfinite="skip" drops the update inside the jitted step and logs the event with its
step; "stop" raises TrainingDiverged with the last good checkpoint kept; every checkpoint written
is read back and checked finite."""
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.config import DistillConfig, MeshConfig, preset
from marjax.distill.init import init_from_attention
from marjax.distill.stages import make_loss
from marjax.errors import MarjaxError
from marjax.models.lm import init_params
from marjax.train.checkpoint import Checkpointer
from marjax.train.loop import TrainingDiverged, nonfinite_leaves, read_metrics, train
from marjax.train.mesh import make_mesh, shard_params
from marjax.train.optim import lr_schedule, make_optimizer, param_bound
from marjax.train.state import init_state
from marjax.train.step import make_step_shardings, make_train_step, stack_micro_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_loop import CFG, META, _params, ce_loss, grain_iter, tcfg  # noqa: E402  (the tiny CE trainer)
from xla_test_flags import PRODUCT_CODEGEN  # noqa: E402

K, L, B = 8, 16, 4


def _all_checkpoints_finite(out, like) -> dict:
    """Every kept step's params read back from disk: {step: params}, each checked finite."""
    got = {}
    with Checkpointer(out, read_only=True) as ck:
        for s in ck.all_steps():
            p = ck.restore_params(like, s)
            assert nonfinite_leaves(p) == [], (s, nonfinite_leaves(p))
            got[s] = p
    return got


def _same(a, b, equal_nan: bool = False) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=equal_nan)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _topk_batches(poison: dict):
    """Offline kd batches (teacher top-k log-probs as if read from a cache); poison {i: value}
    writes the value into batch i's teacher log-probs."""
    r = np.random.default_rng(0)
    i = 0
    while True:
        ids = r.integers(0, 256, (B, L + 1)).astype(np.int32)
        lp = np.log(0.9 * jax.nn.softmax(r.normal(size=(B, L, K)), -1)).astype(np.float32)
        if i in poison:
            lp[1, 3, 0] = poison[i]
        yield {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": np.ones((B, L), np.float32),
               "topk_logprobs": lp, "topk_ids": np.argsort(r.random((B, L, 256)), -1)[..., :K].astype(np.int32)}
        i += 1


def test_nan_and_inf_teacher_logits_are_skipped(tmp_path):
    teacher = init_params(jax.random.PRNGKey(0), preset("tiny"))
    scfg, student = init_from_attention(teacher, preset("tiny"))
    loss = make_loss("kd", preset("tiny"), scfg, DistillConfig())
    tc = tcfg(steps=5, save_every=1, keep=10, nonfinite="skip")
    meta = {"stage": "kd", "model_config": __import__("dataclasses").asdict(scfg)}
    with pytest.warns(UserWarning, match="step 3: .* not finite; update skipped"):
        params, hist = train(loss, student, None, _topk_batches({2: np.nan, 4: np.inf}), tc, tmp_path,
                             model_meta=meta, progress=False)
    recs = read_metrics(tmp_path)
    events = [r for r in recs if r.get("status")]
    assert [(r["step"], r["status"], r["event"]) for r in events] == [(3, "skipped", "nonfinite"),
                                                                     (5, "skipped", "nonfinite")]
    assert [h["step"] for h in hist] == [1, 2, 4] and all(np.isfinite(h["loss"]) for h in hist)
    saved = _all_checkpoints_finite(tmp_path, student)
    assert sorted(saved) == [1, 2, 3, 4, 5]
    assert _same(saved[3], saved[2]) and _same(saved[5], saved[4])     # skipped: the update was dropped
    assert not _same(saved[2], saved[1]) and not _same(saved[4], saved[3])
    assert _same(params, saved[5])


@jax.custom_vjp
def _poison_grad(x, flag):
    return x


def _pg_fwd(x, flag):
    return x, flag


def _pg_bwd(flag, g):
    return g * jnp.where(flag > 0, jnp.nan, 1.0), jnp.zeros_like(flag)


_poison_grad.defvjp(_pg_fwd, _pg_bwd)


def _grad_poisoned_loss():
    """The CE loss whose gradient (not its value) is NaN on batches flagged "poison"."""
    base = ce_loss(CFG)

    def loss_fn(student, teacher, batch, rng):
        flag = jnp.max(batch["poison"])
        return base(jax.tree.map(lambda p: _poison_grad(p, flag), student), teacher,
                    {k: v for k, v in batch.items() if k != "poison"}, rng)
    return loss_fn


def _flagged(bad: set):
    for i, b in enumerate(grain_iter(4)):
        b["poison"] = np.full((4,), float(i in bad), np.float32)
        yield b


def test_nan_gradient_with_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="diverged at step 4") as ei:
        train(_grad_poisoned_loss(), _params(), None, _flagged({3}), tcfg(save_every=2), tmp_path,
              model_meta=META, progress=False)
    assert ei.value.last_good_step == 2
    last = read_metrics(tmp_path)[-1]
    assert last["step"] == 4 and last["status"] == "diverged"
    assert np.isfinite(last["loss"]) and last["grad_norm"] == "nan"     # the loss itself was fine
    assert sorted(_all_checkpoints_finite(tmp_path, _params())) == [2]
    assert nonfinite_leaves(ei.value.params) == []          # in memory: the params after step 3


def test_nan_gradient_skipped_then_training_goes_on(tmp_path):
    with pytest.warns(UserWarning, match="update skipped"):
        p, hist = train(_grad_poisoned_loss(), _params(), None, _flagged({1, 2}), tcfg(nonfinite="skip"),
                        tmp_path, model_meta=META, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("status") == "skipped"] == [2, 3]
    assert hist[-1]["step"] == 6 and hist[-1]["loss"] < hist[0]["loss"]
    _all_checkpoints_finite(tmp_path, _params())


def test_nan_parameter_at_start_is_refused(tmp_path):
    p = _params()
    p = jax.tree_util.tree_map_with_path(
        lambda k, x: x.at[(0,) * x.ndim].set(jnp.inf) if "wq" in jax.tree_util.keystr(k) else x, p)
    with pytest.raises(MarjaxError, match=r"NaN/inf in 1 leaves: \[.*wq.*\]"):
        train(ce_loss(CFG), p, None, grain_iter(4), tcfg(), tmp_path, model_meta=META, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists() or read_metrics(tmp_path) == []


def test_overflowing_update_never_reaches_a_checkpoint(tmp_path):
    """lr = 1e39 is inf in float32: loss and gradients are finite, the updated params are not.
    Skipped twice (max_skips=2), then stopped; the checkpoints hold the initial params."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(TrainingDiverged, match="step 3 after 2 skipped updates in a row"):
            train(ce_loss(CFG), _params(), None, grain_iter(4), tcfg(lr=1e39, warmup=0, save_every=1, keep=10,
                                                                     nonfinite="skip", max_skips=2),
                  tmp_path, model_meta=META, progress=False)
    recs = read_metrics(tmp_path)
    assert [(r["step"], r["status"]) for r in recs] == [(1, "skipped"), (2, "skipped"), (3, "diverged")]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in recs)
    saved = _all_checkpoints_finite(tmp_path, _params())
    assert sorted(saved) == [1, 2] and all(_same(v, _params()) for v in saved.values())


def _masked_ce():
    """The CE loss with wq's first element zeroed: that element never reaches the forward (its
    gradient is 0), so a huge or non-finite value there leaves the loss and gradients finite."""
    base = ce_loss(CFG)
    return lambda p, t, b, r: base(_set_first(p, "wq", 0.0), t, b, r)


_COMPILED_STEPS = {}   # (bound, config) -> (tx, compiled step): the cases differ in param values only


def _one_step(params, tc, bound):
    """One real train step (make_optimizer's AdamW, the trainer's gate) with or without the
    param bound: (finite, params after)."""
    mesh = make_mesh(MeshConfig())
    batch = stack_micro_batches([next(grain_iter(4))])
    key = (bound, repr(tc))
    if key not in _COMPILED_STEPS:
        tx = make_optimizer(tc, params)
        state = init_state(shard_params(params, mesh, copy=True), tx, 0, mesh)
        step = make_train_step(_masked_ce(), tx, mesh, make_step_shardings(state, None, batch, mesh),
                               param_bound=param_bound(tc) if bound else None)
        # compiled as the product compiles it: the suite's XLA_FLAGS (tests/conftest.py) switch the
        # CPU fusion emitters off, and under that emitter the gated and the recomputing programs
        # round an update differently (measured: a last-bit difference); bit equality is a claim
        # about the emitter users run
        _COMPILED_STEPS[key] = tx, step.lower(state, None, batch).compile(compiler_options=PRODUCT_CODEGEN)
    tx, step = _COMPILED_STEPS[key]
    state = init_state(shard_params(params, mesh, copy=True), tx, 0, mesh)
    state, out = step(state, None, batch)
    assert np.isfinite(out["loss"]) and np.isfinite(out["grad_norm"])   # only the params decide
    return bool(out["finite"]), jax.device_get(state.params)


def _set_first(p, name: str, value: float):
    return jax.tree_util.tree_map_with_path(
        lambda k, x: x.at[(0,) * x.ndim].set(value) if name in jax.tree_util.keystr(k) else x, p)


@pytest.mark.parametrize("case, want_finite", [("plain", True), ("3e38", True), ("nan", False), ("-inf", False)])
def test_param_bound_gate_decides_like_the_exact_check(case, want_finite):
    """The step's finite decision by param_bound (one sum over the params) against the exact
    recomputation: the same flag and the same params, bit for bit. A param of 3e38 is finite and
    stays finite (decay shrinks it), but the bound cannot prove it (> 2**126), so the step must
    fall back to the exact check; NaN and -inf params make the sum non-finite, so the step falls
    back and refuses."""
    tc = tcfg(lr=1e-2, weight_decay=0.1)
    p = _params() if case == "plain" else _set_first(_params(), "wq", float(case))
    got = {bound: _one_step(p, tc, bound) for bound in (True, False)}
    assert got[True][0] == got[False][0] == want_finite
    assert _same(got[True][1], got[False][1], equal_nan=True)
    assert _same(got[True][1], p, equal_nan=True) != want_finite           # an applied update moved the params


def test_param_bound_is_above_every_update():
    """bound(max |p|) >= max |p'| through updates of the fused and the optax AdamW with extreme
    gradients (a 2**59 element, elements whose squares underflow to 0); None for an overflowing lr."""
    assert param_bound(tcfg(lr=1e39)) is None
    for tc in (tcfg(lr=3e-3, warmup=5, steps=40), tcfg(lr=1.0, warmup=0, steps=7)):   # the bound's lr <= peak
        lrs = np.asarray(jax.vmap(lr_schedule(tc))(jnp.arange(tc.steps + 10)))
        assert lrs.max() <= tc.lr * (1 + 1e-6) and lrs.min() > 0     # float32 rounding of lr
    tc = tcfg(lr=0.5, warmup=0, weight_decay=0.1, clip_norm=0.0)
    bound = param_bound(tc)
    p0 = _params()
    leaves, tdef = jax.tree.flatten(p0)
    for impl in ("fused", "optax"):
        tx, p = make_optimizer(tc, p0, impl=impl), p0
        state = tx.init(p)
        for i, scale in enumerate((2.0 ** 59, 1e-30, 1.0, 1e-25)):
            g = jax.tree.unflatten(tdef, [jnp.full(x.shape, scale, x.dtype).at[(0,) * x.ndim].set(2.0 ** 59 * (i % 2))
                                          for x in leaves])
            u, state = tx.update(g, state, p)
            new = jax.tree.map(jnp.add, p, u)
            before = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(p))
            after = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(new))
            assert np.isfinite(after) and after <= float(bound(before)), (impl, i, after, float(bound(before)))
            p = new
