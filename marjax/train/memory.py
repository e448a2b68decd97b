"""Upfront memory estimate for a training stage, so an out-of-memory configuration fails in a
second with a message that says what to change, not after minutes of compiling.

The estimate is deliberately simple and on the generous side of the truth: float32 student
params + grads + two Adam moments, teacher params, the activations lax.scan saves for the
backward pass per layer, and the logits working set (chunked KL or full-vocab CE).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from marjax.config import ModelConfig, TrainConfig
from marjax.errors import ConfigError
from marjax.models.lm import init_params

__all__ = ["param_count", "estimate_stage_bytes", "available_bytes", "check_fits"]

F32 = 4


def param_count(cfg: ModelConfig) -> int:
    shapes = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), cfg))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _activation_floats_per_token(cfg: ModelConfig) -> int:
    """Floats saved per token per layer for the backward (residuals, norms, projections)."""
    d, f = cfg.d_model, cfg.d_ff
    per = 8 * d + 3 * f                                   # residual/norm taps + MLP hidden
    if cfg.is_ssm:
        s = cfg.ssm
        per += 2 * (s.conv_dim + s.d_inner + s.n_heads) + 2 * s.d_inner
        per += s.n_heads * s.chunk_size                  # within-chunk (l x l) blocks
        if cfg.is_spiking:
            per += cfg.atmn.T * (2 * d + s.d_inner + f)  # membrane per micro-step (recomputed, bounded)
    else:
        per += 4 * cfg.n_heads * cfg.head_dim
    return per


def estimate_stage_bytes(student: ModelConfig, teacher: Optional[ModelConfig], train_cfg: TrainConfig,
                         stage: str, kl_chunk: int = 128) -> dict:
    tokens = train_cfg.micro_batch * train_cfg.seq_len
    p_s = param_count(student)
    parts = {"student params + grads + adam": 4 * p_s * F32}
    if teacher is not None:
        parts["teacher params"] = param_count(teacher) * F32
    parts["activations"] = tokens * student.n_layers * _activation_floats_per_token(student) * F32
    if stage in ("orient",) and teacher is not None:   # (L, b, h, l, l) attention + mixer matrices
        parts["mixing matrices"] = (3 * teacher.n_layers * train_cfg.micro_batch * teacher.n_heads
                                    * train_cfg.seq_len ** 2 * F32)
    if stage in ("pretrain",):
        parts["logits"] = 3 * tokens * student.vocab_size * F32
    elif stage in ("kd", "sbds"):
        parts["logits (chunked KL)"] = (6 * train_cfg.micro_batch * min(kl_chunk, train_cfg.seq_len)
                                        * student.vocab_size * F32)
    parts["total"] = int(sum(parts.values()))
    return parts


def available_bytes() -> Optional[int]:
    """Memory of the default device: the accelerator's limit, or physical RAM on CPU."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            return int(dev.memory_stats()["bytes_limit"])
        except Exception:  # noqa: BLE001 (some backends expose no stats)
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(student: ModelConfig, teacher: Optional[ModelConfig], train_cfg: TrainConfig, stage: str,
               kl_chunk: int = 128, available: Optional[int] = None, fraction: float = 0.9) -> dict:
    """Raise ConfigError when the estimate exceeds `fraction` of the available memory."""
    est = estimate_stage_bytes(student, teacher, train_cfg, stage, kl_chunk)
    avail = available_bytes() if available is None else available
    if avail is not None and est["total"] > fraction * avail:
        gib = 2 ** 30
        detail = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in est.items() if k != "total")
        raise ConfigError(
            f"stage {stage!r} needs about {est['total'] / gib:.1f} GiB but {avail / gib:.1f} GiB is available "
            f"({detail}); lower train.micro_batch (now {train_cfg.micro_batch}) or train.seq_len "
            f"(now {train_cfg.seq_len}) "
            f"and raise train.batch_tokens accumulation instead")
    return est
