"""The jitted train step: gradient accumulation over micro-batches, exact (sum, count) metrics,
a finite check, and explicit in/out shardings with the student state donated.

Loss contract (what a stage's loss function returns):

    loss_sum, count, metrics = loss_fn(student_params, teacher_params, batch, rng)

`loss_sum` is the loss summed over `count` units (usually tokens), so the update minimises
sum(loss_sum) / sum(count) over all micro-batches: accumulation equals one big batch.
`metrics` is a dict name -> (sum, count), reduced the same way. The step differentiates only
the student; teacher params arrive wrapped in `lax.stop_gradient`, but a loss_fn should still
run its teacher forward on `stop_gradient(teacher_params)` itself (it is the loss owner's
contract, and keeps the teacher out of any gradient if the loss is reused elsewhere).

    step = make_train_step(loss_fn, tx, mesh, shardings, accum_steps=2)
    state, out = step(state, teacher_params, batch)   # batch leaves: (accum_steps, micro_batch, ...)
    out = {"loss", "count", "metrics", "grad_norm", "finite"}

When the loss, a trainable gradient, or an updated parameter / optimizer moment is not finite,
the returned params and optimizer state are the input ones (nothing applied; a lax.cond inside
the step, no host sync), so the last good state survives donation; only `step` and `rng`
advance. `finite` tells the loop to skip or stop (TrainConfig.nonfinite).

How that is checked without passes over the new state (a check reads params + moments, and a
select of new against old makes XLA copy the donated moments: together 0.87 s per update of the
158M-param SmolLM2 student, 4.6x the update itself; experiments/bench/step_gate_probe.py): the
decision is made *before* the update, from

  * the loss and the gradient norm: finite, and the norm below MAX_GRAD_NORM = 2**60. Then every
    |g| <= 2**60 (also after clipping), so Adam's moments, convex combinations of such g and g**2
    with finite old moments, stay below 2**61 and 2**121: finite, no check needed;
  * the updated trainable params, which the learning rate or the step itself can still
    overflow. With `param_bound` (the trainer passes `marjax.train.optim.param_bound(train_cfg)`)
    one reduction s = sum |p| over the trainable params (>= max |p|; NaN/inf when any param is)
    decides it: bound(s) < 2**126 proves every updated param finite. Only when it cannot (an
    inf/NaN param, or params near float32's limit) is the update recomputed inside one reduction
    (XLA fuses the update into it; nothing is written) and checked exactly, under a lax.cond.
    Without `param_bound` the step always recomputes. The 158M-param update: 0.43 s with the
    recomputation, 0.24 s with the bound, 0.19 s with no check (step_gate_probe.py).

and the update then runs inside `lax.cond(ok, update, keep)`, in place on the donated buffers.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from marjax.errors import ConfigError
from marjax.train.mesh import ShardingRules, batch_shardings, param_shardings, replicated
from marjax.train.optim import MAX_GRAD_NORM, trainable_leaves
from marjax.train.state import TrainState, state_shardings
import numpy as np

__all__ = ["StepShardings", "make_step_shardings", "make_train_step", "stack_micro_batches", "cast_floating",
           "all_finite", "updated_params_finite", "MAX_GRAD_NORM", "PARAM_LIMIT"]

PARAM_LIMIT = 2.0 ** 126    # a bound on the updated params below this proves them finite (float32)


class StepShardings(NamedTuple):
    state: Any       # TrainState of NamedShardings
    teacher: Any     # pytree of NamedShardings (or None)
    batch: Any       # pytree (or prefix) of NamedShardings for (accum, micro_batch, ...) leaves


def make_step_shardings(state: TrainState, teacher_params, batch, mesh: Mesh,
                        rules: Optional[ShardingRules] = None) -> StepShardings:
    """Shardings for the step's arguments from example (or abstract) values; `batch` leaves
    have the leading accumulation axis."""
    return StepShardings(state=state_shardings(state, mesh, rules),
                         teacher=None if teacher_params is None else param_shardings(teacher_params, mesh, rules),
                         batch=batch_shardings(batch, mesh, rules, leading=1))


def stack_micro_batches(batches: list) -> Any:
    """[micro_batch pytrees] -> one pytree with a leading accumulation axis (host numpy)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


def all_finite(tree) -> jax.Array:
    """bool (): every floating leaf of `tree` is free of NaN/inf (traceable)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def updated_params_finite(params: list, recomputed_finite: Callable[[], jax.Array],
                          param_bound: Optional[Callable] = None) -> jax.Array:
    """bool (): whether an update keeps `params` (a list of trainable leaves) finite (module doc).
    `recomputed_finite()` recomputes the update and checks it exactly; with `param_bound` it runs
    (under a lax.cond) only when bound(sum |p|) < PARAM_LIMIT cannot prove it."""
    if param_bound is None:
        return recomputed_finite()
    s = sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in params)
    proven = jnp.isfinite(s) & (param_bound(s) < PARAM_LIMIT)
    return jax.lax.cond(proven, lambda: jnp.bool_(True), recomputed_finite)


def cast_floating(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _per_count(total, count):
    """A (sum, count) pair's mean; 0 / 0 reads 0 (a batch with no counted token)."""
    return total / jnp.maximum(count, 1e-9)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: Mesh,
                    shardings: StepShardings, accum_steps: int = 1, *, trainable=None,
                    compute_dtype: Optional[str] = None, donate: bool = True,
                    param_bound: Optional[Callable] = None, max_skips: Optional[int] = None) -> Callable:
    """Jitted `step(state, teacher_params, batch) -> (state, out)`.

    trainable: pytree of bools (None: all) -- the grad norm and finite check cover trainable
      leaves only, so frozen gradients are dead code XLA removes.
    compute_dtype: e.g. "bfloat16": the student forward/backward runs on params cast to it;
      gradients, the optimizer and the master params stay float32.
    param_bound: `bound(s) >= max |updated param|` for any s >= max |param| (e.g.
      `marjax.train.optim.param_bound(train_cfg)` for make_optimizer's AdamW): the finite check
      then needs one sum over the params instead of recomputing the update (module doc).
    max_skips: gate the step on the run's non-finite streak, for a loop that reads each step's
      results only after dispatching the next one (marjax.train.loop): the step becomes
      `step(state, teacher, batch, skips) -> (state, out)` with `skips` the int32 count of
      non-finite steps in a row before it (a replicated scalar, 0 at the start; pass the previous
      out["skips"]). When skips > max_skips the run has already failed: nothing is applied (the
      params and optimizer state stay those of the failure) and out["skips"] stays above
      max_skips; else out["skips"] is 0 after a finite step, skips + 1 after a non-finite one.
      max_skips=0: stop at the first non-finite step (TrainConfig.nonfinite="stop").
    """
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ConfigError(f"accum_steps must be an integer >= 1, got {accum_steps!r}")
    if max_skips is not None and (not isinstance(max_skips, int) or max_skips < 0):
        raise ConfigError(f"max_skips must be None or an integer >= 0, got {max_skips!r}")
    cdtype = None if compute_dtype in (None, "float32") else jnp.dtype(compute_dtype)

    def micro_loss(params, teacher, mb, key):
        p = params if cdtype is None else cast_floating(params, cdtype)
        out = loss_fn(p, teacher, mb, key)
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict)):
            raise ConfigError("loss_fn must return (loss_sum, count, {name: (sum, count)}), got "
                              f"{type(out).__name__} {out!r:.120}")
        loss_sum, count, metrics = out
        bad = [k for k, v in metrics.items() if not (isinstance(v, tuple) and len(v) == 2)]
        if bad:
            raise ConfigError(f"loss_fn metrics must be (sum, count) pairs; not pairs: {bad}")
        metrics = {k: (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32)) for k, (s, c) in metrics.items()}
        return jnp.asarray(loss_sum, jnp.float32), (jnp.asarray(count, jnp.float32), metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def mean_loss(params, teacher, mb, key):
        # one micro-batch: the mean's gradient directly (the 1/count scales the backward's first
        # cotangent) instead of a pass over every gradient to divide it afterwards
        loss_sum, (count, metrics) = micro_loss(params, teacher, mb, key)
        return _per_count(loss_sum, jax.lax.stop_gradient(count)), (loss_sum, count, metrics)

    mean_grad_fn = jax.value_and_grad(mean_loss, has_aux=True)
    # the step's grad norm goes to optimizers that take extra args (fused_adamw clips with it
    # instead of summing every gradient again inside the update's lax.cond)
    pass_norm = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def step(state: TrainState, teacher, batch, skips=None):
        teacher = jax.lax.stop_gradient(teacher)
        rng, step_key = jax.random.split(state.rng)
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        if n_micro != accum_steps:
            raise ConfigError(f"batch has {n_micro} micro-batches on its leading axis, the step expects "
                              f"accum_steps={accum_steps}")

        def body(carry, xs):
            g_acc, l_acc, c_acc, m_acc = carry
            mb, i = xs
            (ls, (cnt, mets)), g = grad_fn(state.params, teacher, mb, jax.random.fold_in(step_key, i))
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            m_acc = jax.tree.map(jnp.add, m_acc, mets)
            return (g_acc, l_acc + ls, c_acc + cnt, m_acc), None

        first = jax.tree.map(lambda x: x[0], batch)
        if accum_steps == 1:   # no scan: it would zero-fill and add a params-sized accumulator
            (_, (loss_sum, count, metrics)), grads = mean_grad_fn(state.params, teacher, first,
                                                                  jax.random.fold_in(step_key, 0))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        else:
            _, (_, m_shape) = jax.eval_shape(micro_loss, state.params, teacher, first, step_key)
            zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)  # noqa: E731
            g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            g0 = jax.lax.with_sharding_constraint(g0, shardings.state.params)   # accumulate sharded like params
            init = (g0, jnp.float32(0), jnp.float32(0), zeros(m_shape))
            (g_sum, loss_sum, count, metrics), _ = jax.lax.scan(body, init, (batch, jnp.arange(accum_steps)))
            # d(sum loss)/d(params) over all micro-batches, divided by the total count: one big batch.
            grads = jax.tree.map(lambda g, p: _per_count(g, count).astype(p.dtype), g_sum, state.params)

        loss = jnp.where(count > 0, _per_count(loss_sum, count), 0.0)
        grad_norm = optax.global_norm(trainable_leaves(grads, mask))

        def update(params_opt):
            params, opt_state = params_opt
            extra = {"grad_norm": grad_norm} if pass_norm else {}
            updates, opt_state = optimizer.update(grads, opt_state, params, **extra)
            return optax.apply_updates(params, updates), opt_state

        # decided before the update (module doc): the moments are finite given the norm bound,
        # the params by a bound, else on a recomputation that XLA fuses into the reduction
        params_ok = updated_params_finite(
            trainable_leaves(state.params, mask),
            lambda: all_finite(trainable_leaves(update((state.params, state.opt_state))[0], mask)), param_bound)
        finite = jnp.isfinite(loss) & (grad_norm < MAX_GRAD_NORM) & params_ok
        apply = finite if skips is None else finite & (skips <= max_skips)
        # a non-finite step keeps params and optimizer state (the loop skips or stops on `finite`)
        params, opt_state = jax.lax.cond(apply, update, lambda po: po, (state.params, state.opt_state))
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        out = {"loss": loss, "count": count, "metrics": metrics, "grad_norm": grad_norm, "finite": finite}
        if skips is not None:   # a failed run stays failed: the streak never drops back under the limit
            out["skips"] = jnp.where(skips > max_skips, skips, jnp.where(finite, 0, skips + 1)).astype(jnp.int32)
        return new, out

    # static Python bools: the grad norm selects trainable leaves at trace time
    mask = jax.tree.map(lambda _: True, shardings.state.params) if trainable is None else \
        jax.tree.map(lambda m: bool(m), trainable)
    in_shardings = (shardings.state, shardings.teacher, shardings.batch)
    if max_skips is not None:
        in_shardings += (replicated(mesh),)
    else:
        step = functools.partial(step, skips=None)   # the three-argument step
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings.state, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())
