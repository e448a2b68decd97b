"""The language model: Llama skeleton with attention (teacher) or the Discrete Mamba-2 mixer
(stage 1), optionally with ATMN spiking sites (stage 2). Layers are stacked along a leading
axis and run under `lax.scan`, so compile time does not grow with depth.

    logits, aux = forward(params, ids, cfg, taps=("prenorm", "spikes"))
    cache = init_cache(cfg, batch, max_len); logits, cache = forward_cached(params, ids, cache, cfg)

The decode layout, `unroll_layers(params)`, holds `blocks` as a tuple of per-layer BlockParams
(and `init_cache(..., unrolled=True)` a tuple of per-layer caches); every function here runs it
as a Python loop over layers. It is for decoding: under a scan, XLA:CPU copies each layer's
matrices out of the stacked array on every token (1.4x slower SmolLM2 decode, measured), and only
in the loop can a dequantising producer (marjax.models.quant) fuse into its matrix-vector product.
Training in it (TrainConfig.layer_layout "unrolled") spares the backward scan's stacked gradient
buffers (zero-fills, per-layer slices and updates). Its compile time grows with depth.

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

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from marjax.config import ModelConfig
from marjax.errors import MarjaxError
from marjax.nn import mamba2
from marjax.nn.layers import (AttnParams, MLPParams, attention, attention_dims, attention_matrix, clip_token_grad,
                              dense, mlp_hidden, rms_norm)
from marjax.spiking import atmn_with_stats, init_atmn
from marjax.typing import array, fan_in_normal, init_dataclass, normal, ones, param_dataclass, subtree

__all__ = ["SpikeSites", "BlockParams", "LMParams", "param_dims", "init_params", "init_block", "forward",
           "init_cache", "forward_cached", "lm_head", "block", "embed", "check_ids", "unroll_layers",
           "unroll_cache", "is_unrolled", "stack_layers"]


@param_dataclass
class SpikeSites:
    """One ATMN neuron per site (None where the site is not spiking); a neuron's threshold `a` is
    per channel (width,) or one scalar, its channel axis named "act"."""
    in_proj: Any = subtree(leaf_axes=("act",), default=None)
    out_proj: Any = subtree(leaf_axes=("act",), default=None)
    mlp_in: Any = subtree(leaf_axes=("act",), default=None)     # shared by the MLP gate and up projections
    mlp_down: Any = subtree(leaf_axes=("act",), default=None)


@param_dataclass
class BlockParams:
    mixer_norm: Float[Array, "d"] = array(("d",), ("embed",), ones)
    mixer: Any = subtree()                          # AttnParams or mamba2.MixerParams
    mlp_norm: Float[Array, "d"] = array(("d",), ("embed",), ones)
    mlp: MLPParams = subtree()
    spikes: Optional[SpikeSites] = subtree(default=None)


@param_dataclass
class LMParams:
    embed: Float[Array, "v d"] = array(("v", "d"), ("vocab", "embed"), normal(1.0))
    blocks: BlockParams = subtree(lead=("layers",))   # every leaf has a leading L axis (lax.scan)
    final_norm: Float[Array, "d"] = array(("d",), ("embed",), ones)
    lm_head: Optional[Float[Array, "d v"]] = array(("d", "v"), ("embed", "vocab"), fan_in_normal,
                                                   default=None)   # None: tied to embed


def param_dims(cfg: ModelConfig) -> dict:
    """The legend dims (marjax.typing) that the declared param shapes of `cfg`'s LM use."""
    dims = {"d": cfg.d_model, "f": cfg.d_ff, "v": cfg.vocab_size, "L": cfg.n_layers}
    dims.update(mamba2.mixer_dims(cfg.ssm) if cfg.is_ssm else attention_dims(cfg))
    return dims


def init_block(key, cfg: ModelConfig, dtype) -> BlockParams:
    """One block's params from the declarations (norms 1, projections scaled normal, identity conv
    tap, decay bias -4); ATMN sites when the config is spiking."""
    dims = param_dims(cfg)
    ks = jax.random.split(key, 8)
    if cfg.is_ssm:
        mixer = init_dataclass(mamba2.MixerParams, dims, dtype, {"in_proj": ks[0], "out_proj": ks[1]})
    else:
        mixer = init_dataclass(AttnParams, dims, dtype, dict(zip(("wq", "wk", "wv", "wo"), ks[:4])))
    mlp = init_dataclass(MLPParams, dims, dtype, dict(zip(("gate", "up", "down"), ks[4:7])))
    spikes = init_spike_sites(cfg, dtype) if cfg.is_spiking else None
    return init_dataclass(BlockParams, dims, dtype, mixer=mixer, mlp=mlp, spikes=spikes)


def site_widths(cfg: ModelConfig) -> dict:
    """Input width of each spiking site (the neuron's channel count)."""
    return {"in_proj": cfg.d_model, "out_proj": cfg.ssm.d_inner, "mlp_in": cfg.d_model, "mlp_down": cfg.d_ff}


def init_spike_sites(cfg: ModelConfig, dtype=jnp.float32) -> SpikeSites:
    widths = site_widths(cfg)
    return SpikeSites(**{s: init_atmn(None, widths[s], cfg.atmn) for s in cfg.atmn.sites})


def init_params(key, cfg: ModelConfig) -> LMParams:
    """Random params from the declarations; layers stacked along axis 0."""
    cfg.validate()
    dtype = jnp.dtype(cfg.dtype)
    k_emb, k_blocks, k_head = jax.random.split(key, 3)
    blocks = jax.vmap(lambda k: init_block(k, cfg, dtype))(jax.random.split(k_blocks, cfg.n_layers))
    given = {"lm_head": None} if cfg.tie_embeddings else {}
    return init_dataclass(LMParams, param_dims(cfg), dtype, {"embed": k_emb, "lm_head": k_head}, blocks=blocks,
                          **given)


def embed(params: LMParams, ids: Int[Array, "b l"]) -> Float[Array, "b l d"]:
    table = params.embed
    if hasattr(table, "take_rows"):   # a quantised table (marjax.models.quant.QWeight): only the rows taken
        return table.take_rows(ids)
    return jnp.take(table, ids, axis=0)


def head_matrix(params: LMParams) -> Any:
    """The (d, v) head: an array, or a quantised matrix (marjax.models.quant.QWeight)."""
    return params.embed.T if params.lm_head is None else params.lm_head


def lm_head(params: LMParams, h: Float[Array, "... d"]) -> Float[Array, "... v"]:
    return dense(h, head_matrix(params), jnp.float32)


def _spike_fn(sites: Optional[SpikeSites], cfg: ModelConfig, stats: dict, inputs: Optional[dict] = None,
              mask=None):
    """The block's spike(name, x) callback: ATMN at configured sites, identity elsewhere.
    Firing statistics (over the tokens `mask` (b, l) keeps, all when None) go into `stats`, site
    inputs into `inputs` when given (trace-time dicts, returned as scan outputs)."""
    def spike(name, x):
        if inputs is not None:
            inputs[name] = x
        p = None if sites is None else getattr(sites, name)
        if p is None:
            return x
        y, st = atmn_with_stats(x, p, cfg.atmn, mask=mask)
        stats[name] = st
        return y
    return spike


def block(p: BlockParams, x: Float[Array, "b l d"], cfg: ModelConfig, positions, cache=None, taps=(), mask=None,
          attn_impl: str = "auto"):
    """One pre-norm residual block. Returns (x_out, new_cache, aux). `attn_impl`: how attention
    runs (marjax.nn.layers.ATTN_IMPLS)."""
    aux, stats = {}, {}
    site_inputs = {} if "site_inputs" in taps else None
    spike = _spike_fn(p.spikes, cfg, stats, site_inputs, mask)
    h = rms_norm(p.mixer_norm, x, cfg.rms_eps)
    if cfg.is_ssm:
        m, cache = mamba2.mixer(p.mixer, h, cfg.ssm, cache, spike)
    else:
        m, cache = attention(p.mixer, h, cfg, positions, cache, impl=attn_impl)
        if "attn" in taps:
            aux["attn"] = attention_matrix(p.mixer, h, cfg, positions)
    x_mid = x + m
    h2 = rms_norm(p.mlp_norm, x_mid, cfg.rms_eps)
    hid = mlp_hidden(p.mlp, spike("mlp_in", h2))
    out = x_mid + dense(spike("mlp_down", hid), p.mlp.down)
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


def is_unrolled(params: LMParams) -> bool:
    """True for the decode layout (blocks a tuple of per-layer BlockParams, `unroll_layers`)."""
    return isinstance(params.blocks, tuple)


def _unstack(tree) -> tuple:
    """A pytree whose leaves share a leading L axis -> a tuple of L pytrees (copies)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n))


def _per_layer(cache_layers) -> bool:
    """True for a cache's `layers` in the decode layout: a tuple of per-layer states. A stacked
    attention cache is a tuple too, of two arrays (k, v); a stacked SSM cache is a MixerCache."""
    return isinstance(cache_layers, tuple) and not any(isinstance(c, jax.Array) for c in cache_layers)


def unroll_layers(params: LMParams) -> LMParams:
    """The same params with `blocks` as a tuple of per-layer BlockParams (module doc: the decode
    layout; a copy of the block weights). Already unrolled params come back as they are."""
    return params if is_unrolled(params) else dataclasses.replace(params, blocks=_unstack(params.blocks))


def stack_layers(params: LMParams) -> LMParams:
    """The inverse of `unroll_layers`: `blocks` stacked along a leading L axis (a copy). Already
    stacked params come back as they are."""
    if not is_unrolled(params):
        return params
    return dataclasses.replace(params, blocks=jax.tree.map(lambda *a: jnp.stack(a), *params.blocks))


def unroll_cache(cache: dict) -> dict:
    """A stacked decoding cache (init_cache's default) as the per-layer tuple the decode layout
    takes, same contents. Already per-layer caches come back as they are."""
    return cache if _per_layer(cache["layers"]) else dict(cache, layers=_unstack(cache["layers"]))


def _run_blocks(params: LMParams, x, cfg: ModelConfig, positions, cache, taps, mask=None, token_grad_clip=0.0,
                attn_impl: str = "auto"):
    def body(carry, layer):
        p, c = layer
        if token_grad_clip > 0:
            carry = clip_token_grad(carry, float(token_grad_clip))
        y, c, aux = block(p, carry, cfg, positions, c, taps, mask, attn_impl)
        return y, (c, aux)

    if cache is not None and _per_layer(cache) != is_unrolled(params):
        raise MarjaxError("the cache's layout does not match the params': unrolled params (lm.unroll_layers) "
                          "take init_cache(cfg, ..., unrolled=True), stacked params the default init_cache")
    if not is_unrolled(params):
        x, (cache, aux) = jax.lax.scan(body, x, (params.blocks, cache))
        return x, cache, aux
    if cache is not None and len(cache) != len(params.blocks):
        raise MarjaxError(f"unrolled params have {len(params.blocks)} layers but the cache has {len(cache)}")
    caches, auxs = [], []
    for i, p in enumerate(params.blocks):
        x, (c, aux) = body(x, (p, None if cache is None else cache[i]))
        caches.append(c)
        auxs.append(aux)
    aux = jax.tree.map(lambda *a: jnp.stack(a), *auxs)     # the scan's (L, ...) layout
    return x, (None if cache is None else tuple(caches)), aux


def check_ids(ids, cfg: ModelConfig) -> None:
    """MarjaxError unless ids are integers of shape (b, l), l >= 1, within the vocab (the range is
    checked when the ids are concrete)."""
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


def forward(params: LMParams, ids, cfg: ModelConfig, *, taps=(), head: bool = True,
            mask=None, token_grad_clip: float = 0.0):
    """Full-sequence forward of int ids (b, l), checked by `check_ids` (a MarjaxError, not a type
    error, for a bad shape, dtype or range). Returns (logits float32 (b,l,v) or final hidden (b,l,d), aux).
    `mask` (b, l) only selects the tokens counted in the firing-rate taps (padding left out).
    `token_grad_clip` > 0 caps each token's gradient at every block input at that many times the
    median token's (`clip_token_grad`; the forward is unchanged)."""
    check_ids(ids, cfg)
    ids = jnp.asarray(ids)           # host (numpy) batches are accepted: the layers take jax arrays
    mask = None if mask is None else jnp.asarray(mask)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
    x, _, aux = _run_blocks(params, embed(params, ids), cfg, positions, None, taps, mask, token_grad_clip)
    h = rms_norm(params.final_norm, x, cfg.rms_eps)
    if "hidden" in taps:
        aux["hidden"] = h
    return (lm_head(params, h) if head else h), aux


def init_cache(cfg: ModelConfig, batch: int, max_len: int, unrolled: bool = False):
    """Decoding state stacked over layers: KV cache (attention) or conv window + SSD state (SSM,
    O(1) in context length); `unrolled`: a tuple of per-layer states instead, for params in the
    decode layout (`unroll_layers`). `pos` is the number of tokens consumed so far."""
    dtype = jnp.dtype(cfg.dtype)
    L = cfg.n_layers
    if cfg.is_ssm:
        one = mamba2.init_mixer_cache(batch, cfg.ssm, dtype)
    else:
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        one = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    if unrolled:   # separate buffers per layer: a donated cache is then updated in place
        layers = tuple(jax.tree.map(jnp.copy, one) for _ in range(L))
    else:
        layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (L,) + a.shape), one)
    return {"layers": layers, "pos": jnp.zeros((), jnp.int32)}


def forward_cached(params: LMParams, ids: Int[Array, "b n"], cache, cfg: ModelConfig, attn_impl: str = "auto"):
    """Consume `ids` after the cached context (prefill when n > 1, a decode step when n == 1).
    Returns (logits (b, n, v) float32, new cache). `attn_impl` (marjax.nn.layers.ATTN_IMPLS, static
    under jit): "auto" runs a float32 decode step's attention with the native CPU kernel where it
    is built, "xla" with XLA's einsums."""
    b, n = ids.shape
    positions = cache["pos"] + jnp.broadcast_to(jnp.arange(n)[None], (b, n))
    x, layers, _ = _run_blocks(params, embed(params, ids), cfg, positions, cache["layers"], (),
                               attn_impl=attn_impl)
    h = rms_norm(params.final_norm, x, cfg.rms_eps)
    return lm_head(params, h), {"layers": layers, "pos": cache["pos"] + n}
