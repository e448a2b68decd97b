"""Stage 1 init: each attention layer becomes a Discrete Mamba-2 mixer (MambaInLlama / MOHAWK).

x <- W_V, B <- W_K, C <- W_Q (KV heads repeated for GQA), out_proj <- W_O; conv = identity tap,
D = 0, z weights 0 with a constant gate folded into out_proj, and the decay bias set so the
initial decay is near 1. With no decay this mixer *is* unnormalised causal linear attention with
the copied (un-rotated) weights: y_t = sum_{s<=t} (q_t . k_s) v_s (tested). MLPs, norms,
embeddings and the head are copied.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from marjax.config import ModelConfig, ssm_from_attention
from marjax.errors import ConfigError
from marjax.models.lm import BlockParams, LMParams
from marjax.nn.layers import AttnParams
from marjax.nn.mamba2 import MixerParams
from marjax.models.lm import forward
from marjax.nn import mamba2

__all__ = ["student_config", "init_from_attention", "mixer_from_attention", "fit_mixer_scale", "GATE_BIAS"]

GATE_BIAS = 1.0   # z_bias at init; out_proj is divided by silu(GATE_BIAS) so the gate is neutral


def student_config(teacher: ModelConfig, **ssm_overrides) -> ModelConfig:
    """The stage-1 SSM config for an attention teacher (one SSM head per query head, P = N = hd)."""
    if teacher.is_ssm:
        raise ConfigError(f"teacher {teacher.name!r} is already an SSM model; stage 1 converts attention")
    return ssm_from_attention(teacher, **ssm_overrides)


def _per_q_head(w, n_kv, n_q, hd):
    """(d, n_kv*hd) -> (d, n_q*hd): repeat each KV head for its query group (GQA)."""
    d = w.shape[0]
    return jnp.repeat(w.reshape(d, n_kv, hd), n_q // n_kv, axis=1).reshape(d, n_q * hd)


def mixer_from_attention(a: AttnParams, teacher_cfg: ModelConfig, student_cfg: ModelConfig,
                         decay_bias: float = -4.0) -> MixerParams:
    """One layer's mixer from its attention weights (unstacked, or vmapped over layers)."""
    sc = student_cfg.ssm
    if (sc.n_heads, sc.head_dim, sc.state_dim) != (teacher_cfg.n_heads, teacher_cfg.head_dim, teacher_cfg.head_dim):
        raise ConfigError(f"SSM shape (heads {sc.n_heads}, head_dim {sc.head_dim}, state {sc.state_dim}) must equal "
                          f"the attention shape (heads {teacher_cfg.n_heads}, head_dim {teacher_cfg.head_dim}) to "
                          "copy weights")
    d, dtype = a.wq.shape[0], a.wq.dtype
    x = _per_q_head(a.wv, teacher_cfg.n_kv_heads, teacher_cfg.n_heads, teacher_cfg.head_dim)
    B = _per_q_head(a.wk, teacher_cfg.n_kv_heads, teacher_cfg.n_heads, teacher_cfg.head_dim)
    C = a.wq
    z = jnp.zeros((d, sc.d_inner), dtype)
    a_log = jnp.zeros((d, sc.n_heads), dtype)
    in_proj = jnp.concatenate([x, B, C, z, a_log], axis=1)
    conv_w = jnp.zeros((sc.conv_kernel, sc.conv_dim), dtype).at[-1].set(1.0)
    return MixerParams(in_proj=in_proj, conv_w=conv_w, conv_b=jnp.zeros((sc.conv_dim,), dtype),
                       D=jnp.zeros((sc.n_heads,), dtype), a_log_bias=jnp.full((sc.n_heads,), decay_bias, dtype),
                       z_bias=jnp.full((sc.d_inner,), GATE_BIAS, dtype),
                       out_proj=(a.wo / jax.nn.silu(jnp.float32(GATE_BIAS))).astype(dtype))


def init_from_attention(teacher: LMParams, teacher_cfg: ModelConfig, student_cfg: ModelConfig | None = None,
                        decay_bias: float = -4.0) -> tuple[ModelConfig, LMParams]:
    """Student (config, params) for a stage-1 run; everything but the mixers is copied."""
    student_cfg = student_config(teacher_cfg) if student_cfg is None else student_cfg
    mixers = jax.vmap(lambda a: mixer_from_attention(a, teacher_cfg, student_cfg, decay_bias))(teacher.blocks.mixer)
    blocks = dataclasses.replace(teacher.blocks, mixer=mixers, spikes=None)
    assert isinstance(blocks, BlockParams)
    return student_cfg, dataclasses.replace(teacher, blocks=blocks)


# jitted: one compile of the whole fit instead of op-by-op dispatch (SmolLM2: 4.8 s against 8.5 s
# for the first call on the CPU VM, the same bits)
@functools.partial(jax.jit, static_argnames=("student_cfg", "teacher_cfg", "min_scale"))
def fit_mixer_scale(student: LMParams, student_cfg: ModelConfig, teacher: LMParams, teacher_cfg: ModelConfig, ids,
                    min_scale: float = 1e-4) -> LMParams:
    """One-shot matrix orientation: per layer and head, scale C by the least-squares factor
    s = <M, A> / <M, M> between the student's materialised mixing matrix M and the teacher's
    attention matrix A (both on the teacher's layer inputs for `ids`). Unnormalised linear
    attention is orders of magnitude larger than softmax attention, so this removes most of the
    initial gap that MOHAWK's orient step would otherwise spend its first steps on."""
    _, aux = forward(teacher, jnp.asarray(ids), teacher_cfg, taps=("mixer_io", "attn"), head=False)
    M = jax.vmap(lambda p, u: mamba2.materialize(p, u, student_cfg.ssm))(student.blocks.mixer, aux["mixer_io"]["input"])
    A = aux["attn"]                                                         # (L, b, h, l, l)
    s = jnp.sum(M * A, axis=(1, 3, 4)) / jnp.maximum(jnp.sum(M * M, axis=(1, 3, 4)), 1e-30)   # (L, h)
    s = jnp.maximum(s, min_scale)
    sc = student_cfg.ssm
    c0 = sc.d_inner + sc.n_heads * sc.state_dim                              # C columns of in_proj
    col_scale = jnp.ones((student_cfg.n_layers, mamba2.in_proj_width(sc)), jnp.float32)
    col_scale = col_scale.at[:, c0:c0 + sc.n_heads * sc.state_dim].set(jnp.repeat(s, sc.state_dim, axis=1))
    mixer = student.blocks.mixer
    in_proj = (mixer.in_proj * col_scale[:, None, :]).astype(mixer.in_proj.dtype)
    mixer = dataclasses.replace(mixer, in_proj=in_proj)
    return dataclasses.replace(student, blocks=dataclasses.replace(student.blocks, mixer=mixer))
