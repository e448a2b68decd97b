"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, weight decay only
on matrices, and a trainable mask (frozen leaves get zero updates and no optimizer state).

    tx = make_optimizer(train_cfg, params, trainable=mask)     # mask: pytree of bools or None (all)
    n_micro = accum_steps(train_cfg)                            # micro-batches per update

Batch size is counted in tokens per update: `TrainConfig.batch_tokens` tokens are split into
`accum_steps` micro-batches of `micro_batch x seq_len` tokens.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from marjax.config import TrainConfig
from marjax.errors import ConfigError
from marjax.train.mesh import is_axes, logical_axes

__all__ = ["make_optimizer", "lr_schedule", "decay_mask", "accum_steps", "check_trainable",
           "trainable_leaves", "fused_adamw", "AdamWState", "OPTIMIZER_IMPLS", "FINAL_LR_FRACTION", "ADAM_B1", "ADAM_B2",
           "ADAM_EPS", "MAX_GRAD_NORM", "param_bound"]

FINAL_LR_FRACTION = 0.1    # cosine decays to 10% of the peak learning rate
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.95, 1e-8
MAX_GRAD_NORM = 2.0 ** 60   # the train step refuses larger gradient norms: Adam's g**2 could overflow


def accum_steps(train_cfg: TrainConfig) -> int:
    """Micro-batches per optimizer update: batch_tokens / (micro_batch * seq_len)."""
    per_micro = train_cfg.micro_batch * train_cfg.seq_len
    if train_cfg.micro_batch < 1 or train_cfg.seq_len < 1:
        raise ConfigError(f"TrainConfig.micro_batch and seq_len must be >= 1, got {train_cfg.micro_batch}, "
                          f"{train_cfg.seq_len}")
    if train_cfg.batch_tokens < per_micro or train_cfg.batch_tokens % per_micro:
        raise ConfigError(f"TrainConfig.batch_tokens ({train_cfg.batch_tokens}) must be a positive multiple of "
                          f"micro_batch x seq_len = {train_cfg.micro_batch} x {train_cfg.seq_len} = {per_micro}")
    return train_cfg.batch_tokens // per_micro


def lr_schedule(train_cfg: TrainConfig) -> optax.Schedule:
    """lr * (s+1)/(warmup+1) for s < warmup (no wasted zero-lr first step), then a cosine from lr
    down to FINAL_LR_FRACTION * lr at s = steps."""
    lr, warmup, total = float(train_cfg.lr), int(train_cfg.warmup), int(train_cfg.steps)
    if lr <= 0:
        raise ConfigError(f"TrainConfig.lr must be > 0, got {lr}")
    if warmup < 0:
        raise ConfigError(f"TrainConfig.warmup must be >= 0, got {warmup}")
    decay = max(total - warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = lr * (s + 1.0) / (warmup + 1.0)
        frac = jnp.clip((s - warmup) / decay, 0.0, 1.0)
        cos = lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
        return jnp.where(s < warmup, warm, cos)
    return schedule


def decay_mask(tree) -> Any:
    """True for weight matrices (>= 2 dims besides the stacked `layers` axis): embeddings,
    projections, conv taps. False for norms, biases, D, ATMN thresholds `a`."""
    axes = logical_axes(tree)
    return jax.tree.map(lambda a: sum(n != "layers" for n in a) >= 2, axes, is_leaf=is_axes)


def check_trainable(params, trainable) -> Any:
    """A pytree of Python bools matching `params` (None: all True)."""
    if trainable is None:
        return jax.tree.map(lambda _: True, params)
    try:
        mask = jax.tree.map(lambda _, m: bool(m), params, trainable)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"trainable mask must be a pytree of bools with the structure of the params: {e}") from e
    if not any(jax.tree.leaves(mask)):
        raise ConfigError("trainable mask selects no parameter: nothing to train")
    return mask


def trainable_leaves(tree, mask) -> list:
    """The leaves of `tree` whose mask is True (static selection: frozen leaves are dead code)."""
    return [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]


OPTIMIZER_IMPLS = ("fused", "optax")


def make_optimizer(train_cfg: TrainConfig, params, trainable=None,
                   impl: Optional[str] = None) -> optax.GradientTransformation:
    """AdamW(b1=0.9, b2=0.95) on the trainable leaves; clipping by the global norm of the
    trainable gradients (TrainConfig.clip_norm <= 0 disables it); frozen leaves: zero updates.
    impl (default TrainConfig.optimizer) "fused": `fused_adamw`; "optax": the optax chain it
    replaces (the reference of tests and `marjax bench step`; its state has another structure)."""
    impl = train_cfg.optimizer if impl is None else impl
    if train_cfg.weight_decay < 0:
        raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {train_cfg.weight_decay}")
    lr, wd, clip = lr_schedule(train_cfg), float(train_cfg.weight_decay), float(train_cfg.clip_norm or 0.0)
    if impl == "fused":
        tx = fused_adamw(lr, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, weight_decay=wd, decay_mask=decay_mask,
                         clip_norm=clip)
    elif impl == "optax":
        tx = optax.chain(*([optax.clip_by_global_norm(clip)] if clip > 0 else []),
                         optax.adamw(lr, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, weight_decay=wd, mask=decay_mask))
    else:
        raise ConfigError(f"TrainConfig.optimizer (make_optimizer impl) must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    mask = check_trainable(params, trainable)
    if all(jax.tree.leaves(mask)):
        return tx
    # multi_transform hides frozen leaves from `tx` (MaskedNode): no Adam moments for them, and
    # they do not enter the clipping norm.
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def param_bound(train_cfg: TrainConfig) -> Optional[Callable[[jax.Array], jax.Array]]:
    """bound(s) >= max |p'| over the trainable params p' after one update of
    `make_optimizer(train_cfg)` (either impl), for any s >= max |p| before it (float32 scalars);
    None when the learning rate is so large that no useful bound exists.

    Holds for the train step's states: every update it applied had a gradient norm below
    MAX_GRAD_NORM (marjax.train.step), so every clipped gradient element, and the bias-corrected
    first moment (a convex combination of them), is below 2**60 (2**61 leaves room for rounding);
    the second moment is >= 0, so |m_hat / (sqrt(v_hat) + eps)| < 2**61 / eps; the schedule never
    exceeds train_cfg.lr (2 lr for rounding). Then |p'| <= s + 2 lr (2**61 / eps + wd s). The
    train step compares this with 2**126 instead of recomputing the update to check it (module doc
    of marjax.train.step); an inf/NaN s gives an inf/NaN bound, and the step then checks exactly."""
    lr, wd = float(train_cfg.lr), float(train_cfg.weight_decay)
    shift, scale = 2 * lr * 2.0 ** 61 / ADAM_EPS, 1 + 2 * lr * wd
    if not (shift < 2.0 ** 125 and scale < 2.0 ** 10):
        return None

    def bound(s):
        return scale * jnp.asarray(s, jnp.float32) + shift
    return bound


class _LeafUpdate(NamedTuple):
    update: jax.Array
    mu: jax.Array
    nu: jax.Array


class AdamWState(NamedTuple):
    count: jax.Array   # int32 (): updates made so far
    mu: Any            # first moments, like the params
    nu: Any            # second moments


def fused_adamw(learning_rate: Callable, *, b1: float, b2: float, eps: float, weight_decay: float,
                decay_mask: Callable, clip_norm: float = 0.0) -> optax.GradientTransformation:
    """optax.chain(clip_by_global_norm(clip_norm), adamw(learning_rate, b1, b2, eps, weight_decay,
    mask=decay_mask)) as one transformation, leaf by leaf in one function: the same formulas in
    the same order (tests check it against that chain), except that clipping multiplies by the
    scalar clip / norm where optax computes g / norm * clip per element. Equal to float32
    rounding, not bit for bit (XLA may also contract the fused expressions differently).
    On the 158M-parameter SmolLM2 student an update takes about 0.6x the chain's time
    (`marjax bench step`, row "adamw update"). One count replaces the chain's three.

    `tx.update(grads, state, params, grad_norm=n)`: n is the global norm of `grads`, already
    computed by the caller (the train step has it), so clipping does not sum the gradients again;
    other extra args are ignored (optax.GradientTransformationExtraArgs)."""
    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return AdamWState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(grads, state, params=None, *, grad_norm=None, **extra_args):
        if params is None:
            raise ConfigError("fused_adamw needs the params (weight decay): tx.update(grads, state, params)")
        count = optax.safe_increment(state.count)
        bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
        step_size = -1 * learning_rate(state.count)   # the schedule sees the count before this update
        if clip_norm > 0:   # a scalar factor, not optax's per-element select of g / norm * clip
            g_norm = optax.global_norm(grads) if grad_norm is None else grad_norm
            scale = jnp.where(g_norm < clip_norm, 1.0, clip_norm / g_norm)
        decays = decay_mask(params)

        def leaf(g, m, v, p, decay):
            if clip_norm > 0:
                g = g * scale.astype(g.dtype)
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * g ** 2 + b2 * v
            u = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype) + 0.0) + eps)
            if decay:
                u = u + weight_decay * p
            return _LeafUpdate(jnp.array(step_size, dtype=u.dtype) * u, m, v)

        out = jax.tree.map(leaf, grads, state.mu, state.nu, params, decays)
        # (the params may hold tuples themselves: unrolled layers)
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda x: type(x) is _LeafUpdate)  # noqa: E731
        return pick(0), AdamWState(count=count, mu=pick(1), nu=pick(2))

    return optax.GradientTransformationExtraArgs(init, update)
