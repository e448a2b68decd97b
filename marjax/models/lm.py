"""The language model: Llama skeleton with attention (teacher) or the Discrete Mamba-2 mixer
(stage 1), optionally with ATMN spiking sites (stage 2). Layers are stacked along a leading
axis and run under `lax.scan`, so compile time does not grow with depth.

    logits, aux = forward(params, ids, cfg, taps=("prenorm", "spikes"))
    cache = init_cache(cfg, batch, max_len); logits, cache = forward_cached(params, ids, cache, cfg)

Taps (static) come back in `aux`:
  prenorm   (L, 2, b, l, d) residual stream entering each block's two RMSNorms
  postnorm  (L, 2, b, l, d) the normed values leaving them
  mixer_io  dict(input=(L,b,l,d), output=(L,b,l,d)) normed mixer input and mixer output
  attn      (L, b, h, l, l) attention matrices (attention models)
  spikes    {site: {"nonzero"|"pos"|"neg": (L, T)}} firing rates per micro-step (spiking models)
  site_inputs {site: (L, b, l, width)} what each spiking site's projection consumes (calibration)
  hidden    (b, l, d) final normed hidden states (the LM head input)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from marjax.config import ModelConfig
from marjax.nn import mamba2
from marjax.nn.layers import AttnParams, MLPParams, attention, attention_matrix, mlp_hidden, rms_norm

__all__ = ["SpikeSites", "BlockParams", "LMParams", "init_params", "forward", "init_cache",
           "forward_cached", "lm_head", "block", "embed"]


@jax.tree_util.register_dataclass
@dataclass
class SpikeSites:
    """One ATMN neuron per site (None where the site is not spiking)."""
    in_proj: Any = None
    out_proj: Any = None
    mlp_in: Any = None     # shared by the MLP gate and up projections
    mlp_down: Any = None


@jax.tree_util.register_dataclass
@dataclass
class BlockParams:
    mixer_norm: Float[Array, "d"]
    mixer: Any                      # AttnParams or MixerParams
    mlp_norm: Float[Array, "d"]
    mlp: MLPParams
    spikes: Optional[SpikeSites] = None


@jax.tree_util.register_dataclass
@dataclass
class LMParams:
    embed: Float[Array, "v d"]
    blocks: BlockParams             # every leaf has a leading n_layers axis
    final_norm: Float[Array, "d"]
    lm_head: Optional[Float[Array, "d v"]] = None   # None: tied to embed


def _normal(key, shape, scale, dtype):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _init_block(key, cfg: ModelConfig, dtype) -> BlockParams:
    d, f = cfg.d_model, cfg.d_ff
    ks = jax.random.split(key, 8)
    s = d ** -0.5
    if cfg.is_ssm:
        sc = cfg.ssm
        w = mamba2.in_proj_width(sc)
        k_conv = jnp.zeros((sc.conv_kernel, sc.conv_dim), dtype).at[-1].set(1.0)  # identity tap
        mixer = mamba2.MixerParams(
            in_proj=_normal(ks[0], (d, w), s, dtype), conv_w=k_conv,
            conv_b=jnp.zeros((sc.conv_dim,), dtype), D=jnp.ones((sc.n_heads,), dtype),
            a_log_bias=jnp.full((sc.n_heads,), -4.0, dtype),
            z_bias=jnp.zeros((sc.d_inner,), dtype),
            out_proj=_normal(ks[1], (sc.d_inner, d), sc.d_inner ** -0.5 / (2 * cfg.n_layers) ** 0.5, dtype))
    else:
        hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        mixer = AttnParams(wq=_normal(ks[0], (d, hq), s, dtype), wk=_normal(ks[1], (d, hkv), s, dtype),
                           wv=_normal(ks[2], (d, hkv), s, dtype),
                           wo=_normal(ks[3], (hq, d), hq ** -0.5 / (2 * cfg.n_layers) ** 0.5, dtype))
    mlp = MLPParams(gate=_normal(ks[4], (d, f), s, dtype), up=_normal(ks[5], (d, f), s, dtype),
                    down=_normal(ks[6], (f, d), f ** -0.5 / (2 * cfg.n_layers) ** 0.5, dtype))
    spikes = init_spike_sites(cfg, dtype) if cfg.is_spiking else None
    return BlockParams(mixer_norm=jnp.ones((d,), dtype), mixer=mixer, mlp_norm=jnp.ones((d,), dtype),
                       mlp=mlp, spikes=spikes)


def site_widths(cfg: ModelConfig) -> dict:
    """Input width of each spiking site (the neuron's channel count)."""
    return {"in_proj": cfg.d_model, "out_proj": cfg.ssm.d_inner, "mlp_in": cfg.d_model, "mlp_down": cfg.d_ff}


def init_spike_sites(cfg: ModelConfig, dtype=jnp.float32) -> SpikeSites:
    from marjax.spiking import init_atmn
    widths = site_widths(cfg)
    return SpikeSites(**{s: init_atmn(None, widths[s], cfg.atmn) for s in cfg.atmn.sites})


def init_params(key, cfg: ModelConfig) -> LMParams:
    """Random params (scaled normal); layers stacked along axis 0."""
    cfg.validate()
    dtype = jnp.dtype(cfg.dtype)
    k_emb, k_blocks, k_head = jax.random.split(key, 3)
    blocks = jax.vmap(lambda k: _init_block(k, cfg, dtype))(jax.random.split(k_blocks, cfg.n_layers))
    head = None if cfg.tie_embeddings else _normal(k_head, (cfg.d_model, cfg.vocab_size), cfg.d_model ** -0.5, dtype)
    return LMParams(embed=_normal(k_emb, (cfg.vocab_size, cfg.d_model), 1.0, dtype), blocks=blocks,
                    final_norm=jnp.ones((cfg.d_model,), dtype), lm_head=head)


def embed(params: LMParams, ids: Int[Array, "b l"]) -> Float[Array, "b l d"]:
    return jnp.take(params.embed, ids, axis=0)


def head_matrix(params: LMParams) -> Float[Array, "d v"]:
    return params.embed.T if params.lm_head is None else params.lm_head


def lm_head(params: LMParams, h: Float[Array, "... d"]) -> Float[Array, "... v"]:
    return jnp.einsum("...d,dv->...v", h, head_matrix(params), preferred_element_type=jnp.float32)


def _spike_fn(sites: Optional[SpikeSites], cfg: ModelConfig, stats: dict, inputs: Optional[dict] = None):
    """The block's spike(name, x) callback: ATMN at configured sites, identity elsewhere.
    Firing statistics go into `stats`, site inputs into `inputs` when given (trace-time dicts,
    returned as scan outputs)."""
    from marjax.spiking import atmn_with_stats

    def spike(name, x):
        if inputs is not None:
            inputs[name] = x
        p = None if sites is None else getattr(sites, name)
        if p is None:
            return x
        y, st = atmn_with_stats(x, p, cfg.atmn)
        stats[name] = st
        return y
    return spike


def block(p: BlockParams, x: Float[Array, "b l d"], cfg: ModelConfig, positions, cache=None, taps=()):
    """One pre-norm residual block. Returns (x_out, new_cache, aux)."""
    aux, stats = {}, {}
    site_inputs = {} if "site_inputs" in taps else None
    spike = _spike_fn(p.spikes, cfg, stats, site_inputs)
    h = rms_norm(p.mixer_norm, x, cfg.rms_eps)
    if cfg.is_ssm:
        m, cache = mamba2.mixer(p.mixer, h, cfg.ssm, cache, spike)
    else:
        m, cache = attention(p.mixer, h, cfg, positions, cache)
        if "attn" in taps:
            aux["attn"] = attention_matrix(p.mixer, h, cfg, positions)
    x_mid = x + m
    h2 = rms_norm(p.mlp_norm, x_mid, cfg.rms_eps)
    hid = mlp_hidden(p.mlp, spike("mlp_in", h2))
    out = x_mid + spike("mlp_down", hid) @ p.mlp.down
    if "prenorm" in taps:
        aux["prenorm"] = jnp.stack([x, x_mid])
    if "postnorm" in taps:
        aux["postnorm"] = jnp.stack([h, h2])
    if "mixer_io" in taps:
        aux["mixer_io"] = {"input": h, "output": m}
    if "spikes" in taps and stats:
        aux["spikes"] = stats
    if site_inputs is not None:
        aux["site_inputs"] = site_inputs
    return out, cache, aux


def _run_blocks(params: LMParams, x, cfg: ModelConfig, positions, cache, taps):
    def body(carry, layer):
        p, c = layer
        y, c, aux = block(p, carry, cfg, positions, c, taps)
        return y, (c, aux)

    x, (cache, aux) = jax.lax.scan(body, x, (params.blocks, cache))
    return x, cache, aux


def _check_ids(ids, cfg: ModelConfig):
    from marjax.errors import MarjaxError
    if ids.ndim != 2:
        raise MarjaxError(f"token ids must have shape (batch, length), got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise MarjaxError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise MarjaxError("token ids are empty (length 0): nothing to run")
    if not isinstance(ids, jax.core.Tracer):
        host = np.asarray(ids)  # concrete here; numpy so an enclosing jit trace does not capture it
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise MarjaxError(f"token ids out of range: min {lo}, max {hi}, vocab_size {cfg.vocab_size}")


def forward(params: LMParams, ids: Int[Array, "b l"], cfg: ModelConfig, *, taps=(), head: bool = True):
    """Full-sequence forward. Returns (logits float32 (b,l,v) or final hidden (b,l,d), aux)."""
    _check_ids(ids, cfg)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
    x, _, aux = _run_blocks(params, embed(params, ids), cfg, positions, None, taps)
    h = rms_norm(params.final_norm, x, cfg.rms_eps)
    if "hidden" in taps:
        aux["hidden"] = h
    return (lm_head(params, h) if head else h), aux


def init_cache(cfg: ModelConfig, batch: int, max_len: int):
    """Decoding state stacked over layers: KV cache (attention) or conv window + SSD state (SSM,
    O(1) in context length). `pos` is the number of tokens consumed so far."""
    dtype = jnp.dtype(cfg.dtype)
    L = cfg.n_layers
    if cfg.is_ssm:
        c = mamba2.init_mixer_cache(batch, cfg.ssm, dtype)
        layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (L,) + a.shape), c)
    else:
        shape = (L, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        layers = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return {"layers": layers, "pos": jnp.zeros((), jnp.int32)}


def forward_cached(params: LMParams, ids: Int[Array, "b n"], cache, cfg: ModelConfig):
    """Consume `ids` after the cached context (prefill when n > 1, a decode step when n == 1).
    Returns (logits (b, n, v) float32, new cache)."""
    b, n = ids.shape
    positions = cache["pos"] + jnp.broadcast_to(jnp.arange(n)[None], (b, n))
    x, layers, _ = _run_blocks(params, embed(params, ids), cfg, positions, cache["layers"], ())
    h = rms_norm(params.final_norm, x, cfg.rms_eps)
    return lm_head(params, h), {"layers": layers, "pos": cache["pos"] + n}
