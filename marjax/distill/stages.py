"""The four distillation stages as loss functions for the generic trainer.

    loss_fn = make_loss(stage, teacher_cfg, student_cfg, distill_cfg)
    loss_sum, count, metrics = loss_fn(student_params, teacher_params, batch, rng)

MOHAWK (stage 1, attention teacher -> SSM student):
  orient  per layer, the student's materialised mixing matrix vs the teacher's attention matrix,
          both fed the teacher's normed layer input;
  align   per layer, the student block output vs the teacher block output on teacher inputs;
  kd      end-to-end forward KL on logits (chunked from final hidden states).
SBDS (stage 2, dense SSM teacher -> spiking student):
  sbds    alpha KL(p||q) + beta KL(q||p) (+ optional CE) + feature_weight * pre-norm feature L2.

Teacher outputs are computed from `stop_gradient(teacher_params)`: no gradient and no
optimizer state for the teacher. Batch: {"inputs", "targets", "mask"} (b, l).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from marjax.config import DistillConfig, ModelConfig
from marjax.distill import losses
from marjax.errors import ConfigError
from marjax.models.lm import LMParams, block, forward, head_matrix, is_unrolled, stack_layers
from marjax.nn import mamba2

__all__ = ["make_loss", "trainable_mask", "STAGES", "rate_loss", "site_fanout"]

STAGES = ("orient", "align", "kd", "sbds")


def _positions(ids):
    return jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)


def _orient_loss(teacher_cfg, student_cfg, distill_cfg):
    def loss_fn(student: LMParams, teacher: LMParams, batch, rng):
        teacher = jax.lax.stop_gradient(teacher)
        student = stack_layers(student)     # vmapped over layers (a traced stack in the unrolled layout)
        _, aux = forward(teacher, batch["inputs"], teacher_cfg, taps=("mixer_io", "attn"), head=False)
        u, attn = aux["mixer_io"]["input"], aux["attn"]                     # (L,b,l,d), (L,b,h,l,l)
        M = jax.vmap(lambda p, x: mamba2.materialize(p, x, student_cfg.ssm))(student.blocks.mixer, u)
        s, c = losses.matrix_orientation_loss(M, attn, batch["mask"])
        return s, c, {"orient": (s, c)}
    return loss_fn


def _last_block(params: LMParams):
    """The last layer's BlockParams, in either layout."""
    if is_unrolled(params):
        return params.blocks[-1]
    return jax.tree.map(lambda a: a[-1], params.blocks)


def _align_loss(teacher_cfg, student_cfg, distill_cfg):
    def loss_fn(student: LMParams, teacher: LMParams, batch, rng):
        teacher = jax.lax.stop_gradient(teacher)
        student = stack_layers(student)     # vmapped over layers (a traced stack in the unrolled layout)
        ids = batch["inputs"]
        pos = _positions(ids)
        _, aux = forward(teacher, ids, teacher_cfg, taps=("prenorm",), head=False)
        x_in = aux["prenorm"][:, 0]                                           # (L, b, l, d) block inputs
        # teacher block l's output is block l+1's input: the forward already holds every target but
        # the last layer's, so only that block runs again (not all L of them)
        y_last = block(_last_block(teacher), x_in[-1], teacher_cfg, pos)[0]
        y_t = jnp.concatenate([x_in[1:], y_last[None]], axis=0)
        y_s = jax.vmap(lambda p, x: block(p, x, student_cfg, pos)[0])(student.blocks, x_in)
        s, c = losses.hidden_alignment_loss(y_s, y_t, batch["mask"])
        return s, c, {"align": (s, c)}
    return loss_fn


def _with_rates(total, metrics: dict, aux: dict, student: LMParams, distill_cfg: DistillConfig):
    """Add the firing-rate metric and, when rate_weight > 0, the rate term to a per-token loss."""
    if "spikes" not in aux:
        return total, metrics
    rates = {site: jnp.mean(st["nonzero"], axis=-1) for site, st in aux["spikes"].items()}   # (L,) each
    metrics = dict(metrics, firing_rate=(jax.lax.stop_gradient(jnp.mean(jnp.stack(list(rates.values())))),
                                         jnp.float32(1.0)))
    if distill_cfg.rate_weight > 0:
        r = rate_loss(rates, site_fanout(student), distill_cfg.rate_target)
        metrics["rate_loss"] = (jax.lax.stop_gradient(r), jnp.float32(1.0))
        total = total + distill_cfg.rate_weight * r
    return total, metrics


def _kl_loss(teacher_cfg, student_cfg, distill_cfg, alpha, beta):
    feats = {"prenorm": ("prenorm",), "postnorm": ("postnorm",), "both": ("prenorm", "postnorm"),
             "none": ()}[distill_cfg.feature if distill_cfg.stage == "sbds" else "none"]

    clip = distill_cfg.token_grad_clip if distill_cfg.stage == "sbds" else 0.0

    def loss_fn(student: LMParams, teacher: LMParams, batch, rng):
        if "topk_ids" in batch:   # offline: teacher top-k from disk (KL terms only; features refused)
            if feats:
                raise ConfigError(f"distill.feature={distill_cfg.feature!r} needs the teacher's feature taps, which a "
                                  "teacher top-k cache does not hold; set distill.feature=none to train from the "
                                  "cache, or train against the teacher model")
            _, as_ = forward(student, batch["inputs"], student_cfg, taps=("hidden", "spikes"), head=False,
                             mask=batch["mask"], token_grad_clip=clip)
            s, n, m = losses.kd_from_topk(batch["topk_logprobs"], batch["topk_ids"], as_["hidden"],
                                          head_matrix(student), batch["mask"], alpha=alpha, beta=beta,
                                          temperature=distill_cfg.temperature, chunk=distill_cfg.kl_chunk,
                                          ce_targets=batch["targets"] if distill_cfg.ce_weight > 0 else None,
                                          ce_weight=distill_cfg.ce_weight)
            total, metrics = _with_rates(s / jnp.maximum(n, 1), dict(m, kl=(s, n)), as_, student, distill_cfg)
            return total * n, n, metrics
        teacher = jax.lax.stop_gradient(teacher)
        taps = ("hidden",) + feats
        mask = batch["mask"]
        _, at = forward(teacher, batch["inputs"], teacher_cfg, taps=taps, head=False)
        _, as_ = forward(student, batch["inputs"], student_cfg, taps=taps + ("spikes",), head=False, mask=mask,
                         token_grad_clip=clip)
        kl_s, n, m = losses.chunked_kd_loss(
            at["hidden"], as_["hidden"], head_matrix(teacher), head_matrix(student), mask,
            alpha=alpha, beta=beta, temperature=distill_cfg.temperature, chunk=distill_cfg.kl_chunk,
            ce_targets=batch["targets"] if distill_cfg.ce_weight > 0 else None, ce_weight=distill_cfg.ce_weight)
        metrics = dict(m)
        metrics["kl"] = (kl_s, n)
        total = kl_s / jnp.maximum(n, 1)
        for f in feats:
            ft, fs = at[f], as_[f]
            fs_, fc = losses.feature_loss(ft.reshape((-1,) + ft.shape[2:]), fs.reshape((-1,) + fs.shape[2:]), mask,
                                          relative=distill_cfg.feature_norm == "relative")
            metrics[f"feat_{f}"] = (fs_, fc)
            total = total + distill_cfg.feature_weight * fs_ / jnp.maximum(fc, 1)
        total, metrics = _with_rates(total, metrics, as_, student, distill_cfg)
        # (sum, count) form for the trainer: the combined per-token mean times the token count
        return total * n, n, metrics
    return loss_fn


def site_fanout(params: LMParams) -> dict:
    """Output units each spiking site's spikes drive (one AC per spike per unit): the share of
    the spiking energy a site's firing rate costs. mlp_in feeds gate and up."""
    b = params.blocks[0] if is_unrolled(params) else params.blocks
    return {"in_proj": b.mixer.in_proj.shape[-1], "out_proj": b.mixer.out_proj.shape[-1],
            "mlp_in": b.mlp.gate.shape[-1] + b.mlp.up.shape[-1], "mlp_down": b.mlp.down.shape[-1]}


def rate_loss(rates: dict, fanout: dict, target: float):
    """sum_site w_site * mean_layers relu(rate - target), w = fan-out shares over the present
    sites (so the term is proportional to the spiking ACs above the target). rates: {site: (L,)}
    differentiable firing fractions per micro-step."""
    total = float(sum(fanout[s] for s in rates))
    return sum((fanout[s] / total) * jnp.mean(jax.nn.relu(r - target)) for s, r in rates.items())


def make_loss(stage: str, teacher_cfg: ModelConfig, student_cfg: ModelConfig, distill_cfg: DistillConfig):
    distill_cfg = dataclasses.replace(distill_cfg, stage=stage).validate()
    if stage in ("orient", "align"):
        if teacher_cfg.is_ssm or not student_cfg.is_ssm:
            raise ConfigError(f"stage {stage!r} needs an attention teacher and an SSM student, got "
                              f"teacher mixer {teacher_cfg.mixer!r}, student mixer {student_cfg.mixer!r}")
        return (_orient_loss if stage == "orient" else _align_loss)(teacher_cfg, student_cfg, distill_cfg)
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ConfigError(f"teacher vocab_size {teacher_cfg.vocab_size} != student vocab_size {student_cfg.vocab_size}")
    if stage == "kd":
        return _kl_loss(teacher_cfg, student_cfg, distill_cfg, alpha=1.0, beta=0.0)
    if stage == "sbds":
        if not student_cfg.is_spiking:
            raise ConfigError("stage 'sbds' needs a spiking student (ModelConfig.atmn set)")
        return _kl_loss(teacher_cfg, student_cfg, distill_cfg, alpha=distill_cfg.alpha, beta=distill_cfg.beta)
    raise ConfigError(f"unknown stage {stage!r}; known: {STAGES}")


def trainable_mask(params: LMParams, which: str):
    """Pytree of bools: 'all', 'mixer' (MOHAWK steps 1-2 train only the mixers) or 'atmn'
    (only the neurons' thresholds)."""
    def fill(tree, value):
        return jax.tree.map(lambda _: value, tree)
    if which == "all":
        return fill(params, True)
    mask = fill(params, False)
    b = mask.blocks
    if which == "mixer":
        b = dataclasses.replace(b, mixer=fill(params.blocks.mixer, True))
    elif which == "atmn":
        b = dataclasses.replace(b, spikes=fill(params.blocks.spikes, True))
    else:
        raise ConfigError(f"unknown trainable set {which!r}; known: all, mixer, atmn")
    return dataclasses.replace(mask, blocks=b)
