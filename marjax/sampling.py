"""Decoding: pick the next token from logits (greedy, temperature, nucleus top-p) and the cached
decode loop over an LM's params (KV cache for attention, conv window + SSD state for the SSM).

    new_ids = decode(params, cfg, prompt_ids, max_new_tokens=32, temperature=0.7, top_p=0.9)

`params` may be stacked (as trained) or in the decode layout (`lm.unroll_layers`), float or
weight-only quantised (`marjax.models.quant.quantize_params`, dequantised inside the step).
The token steps run the unrolled layout: stacked params prefill under the scan (one cheap compile
per prompt length), then are unrolled (a copy of the block weights on every call; pass unrolled
ones to skip it, at the price of an unrolled prefill compile per prompt length).

Sampling runs on the host in float64 numpy (one row of v logits per step), so a seed gives the
same tokens on every backend. Greedy decoding (temperature 0) takes the argmax inside the step
instead and keeps one step in flight: the next step is dispatched on the device's token before
the host reads it, so reading, callbacks and dispatch overlap the device's work (one step past a
stop token is computed and dropped).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

from marjax.config import ModelConfig
from marjax.errors import MarjaxError
from marjax.models import lm, quant

__all__ = ["sample_token", "cache_length", "as_ids", "decode"]

CACHE_BUCKET = 256   # the KV cache length is rounded up to this, so decoding compiles once per bucket

_forward_cached = jax.jit(quant.forward_cached_q, static_argnames=("cfg",), donate_argnames=("cache",))


@jax.jit(static_argnames=("cfg",), donate_argnames=("cache",))
def _greedy_step(params, tok: Int[jax.Array, "b 1"], cache, cfg: ModelConfig):
    """(argmax of the next logits (b, 1) int32, new cache): the token never visits the host."""
    lg, cache = quant.forward_cached_q(params, tok, cache, cfg)
    return jnp.argmax(lg[:, -1], axis=-1).astype(jnp.int32)[:, None], cache


def sample_token(logits_v: Float[np.ndarray, "v"], temperature: float, top_p: float,
                 rng: np.random.Generator) -> int:
    """argmax when temperature <= 0; else a draw from softmax(logits / temperature) restricted to
    the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return int(np.argmax(logits_v))
    z = logits_v.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def cache_length(n: int, bucket: int = CACHE_BUCKET) -> int:
    """n rounded up to a multiple of `bucket`."""
    return -(-n // bucket) * bucket


def as_ids(token_ids) -> Int[jax.Array, "b l"]:
    """int32 (b, l) from ids of shape (l,) or (b, l); MarjaxError for non-integers."""
    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.dtype.kind not in "iu":
        raise MarjaxError(f"token_ids must be integers, got dtype {ids.dtype}")
    return jnp.asarray(ids, jnp.int32)


def decode(params: lm.LMParams, cfg: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int = 32, *,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_ids: Iterable[int] = (),
           on_token: Optional[Callable[[int], None]] = None) -> list:
    """The new ids after `prompt_ids` (one sequence): prefill once, then one cached step per token,
    until max_new_tokens or a token in stop_ids (which is returned, then decoding stops)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise MarjaxError("prompt is empty: give at least one token (an empty string encodes to none)")
    if max_new_tokens < 0:
        raise MarjaxError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = len(prompt) + max_new_tokens
    if total > cfg.max_seq_len:
        raise MarjaxError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                          f"max_seq_len {cfg.max_seq_len}")
    ids = as_ids(prompt)
    lm.check_ids(ids, cfg)
    out: list = []
    if max_new_tokens == 0:
        return out
    stop, rng = set(stop_ids), np.random.default_rng(seed)
    # prefill in the params' own layout: stacked params compile one scan per prompt length (cheap)
    # rather than one unrolled program; the token steps then run the decode layout
    unrolled = lm.is_unrolled(params)
    cache = lm.init_cache(cfg, 1, min(cache_length(total), cfg.max_seq_len), unrolled=unrolled)
    lg, cache = _forward_cached(params, ids, cache, cfg=cfg)
    if not unrolled:
        params, cache = lm.unroll_layers(params), lm.unroll_cache(cache)
    tok = sample_token(np.asarray(lg[0, -1]), temperature, top_p, rng)
    if temperature <= 0:
        return _greedy_tokens(params, cfg, tok, cache, max_new_tokens, stop, on_token)
    while True:
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop or len(out) == max_new_tokens:
            return out
        lg, cache = _forward_cached(params, jnp.asarray([[tok]], jnp.int32), cache, cfg=cfg)
        tok = sample_token(np.asarray(lg[0, -1]), temperature, top_p, rng)


def _greedy_tokens(params, cfg: ModelConfig, first: int, cache, max_new_tokens: int, stop: set,
                   on_token: Optional[Callable[[int], None]]) -> list:
    """decode's greedy loop after the prefill's token `first`, one step in flight (module doc)."""
    out: list = []
    pending = jnp.asarray([[first]], jnp.int32)
    while True:
        nxt = None
        if len(out) + 1 < max_new_tokens:    # the token after `pending` will be wanted: start it now
            nxt, cache = _greedy_step(params, pending, cache, cfg=cfg)
        tok = int(np.asarray(pending)[0, 0])  # waits for the step before, not the one just started
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop or len(out) == max_new_tokens:
            return out
        pending = nxt
