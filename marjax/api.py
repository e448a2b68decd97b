"""Public API: load a model bundle, get logits, generate text (and the `marjax generate` CLI)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from marjax.config import ModelConfig
from marjax.errors import MarjaxError
from marjax.models import lm

__all__ = ["Model", "load", "logits", "generate", "generate_ids", "generate_main", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Model:
    """A loaded model: config (static), params (pytree), tokenizer, and where it came from."""
    config: ModelConfig
    params: Any
    tokenizer: Any
    source: str = ""


def load(name_or_path: str = DEFAULT_MODEL) -> Model:
    """A model by name ("smollm2-135m-instruct", a preset such as "tiny"), a .gguf file, an HF
    Llama directory, a Llamba/marjax SSM directory or a marjax checkpoint directory."""
    from marjax.io.resolve import resolve_model
    cfg, params, tok = resolve_model(str(name_or_path))
    return Model(config=cfg, params=params, tokenizer=tok, source=str(name_or_path))


_forward = jax.jit(lm.forward, static_argnames=("cfg", "taps", "head"))
_forward_cached = jax.jit(lm.forward_cached, static_argnames=("cfg",), donate_argnames=("cache",))


def _as_ids(token_ids) -> jnp.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.dtype.kind not in "iu":
        raise MarjaxError(f"token_ids must be integers, got dtype {ids.dtype}")
    return jnp.asarray(ids, jnp.int32)


def logits(m: Model, token_ids) -> jnp.ndarray:
    """int (batch, len) [or (len,)] -> float32 (batch, len, vocab)."""
    ids = _as_ids(token_ids)
    lm._check_ids(ids, m.config)
    if ids.shape[1] > m.config.max_seq_len:
        raise MarjaxError(f"sequence length {ids.shape[1]} exceeds the model's max_seq_len {m.config.max_seq_len}")
    out, _ = _forward(m.params, ids, cfg=m.config)
    return out


def _sample(logits_v: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
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


def _cache_len(n: int, bucket: int = 256) -> int:
    return -(-n // bucket) * bucket  # round up so the decode step compiles once per bucket


def generate_ids(m: Model, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids=None,
                 on_token: Optional[Callable[[int], None]] = None) -> list:
    """Decode with the model's cache (KV cache or SSM state). Returns the new ids only."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise MarjaxError("prompt is empty: give at least one token (an empty string encodes to none)")
    if max_new_tokens < 0:
        raise MarjaxError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cfg = m.config
    total = len(prompt) + max_new_tokens
    if total > cfg.max_seq_len:
        raise MarjaxError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                          f"max_seq_len {cfg.max_seq_len}")
    ids = _as_ids(prompt)
    lm._check_ids(ids, cfg)
    stop = set(stop_ids if stop_ids is not None else getattr(m.tokenizer, "stop_ids", ()) or ())
    rng = np.random.default_rng(seed)
    cache = lm.init_cache(cfg, 1, min(_cache_len(total), cfg.max_seq_len))
    out: list = []
    if max_new_tokens == 0:
        return out
    lg, cache = _forward_cached(m.params, ids, cache, cfg=cfg)
    for _ in range(max_new_tokens):
        tok = _sample(np.asarray(lg[0, -1]), temperature, top_p, rng)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop or len(out) == max_new_tokens:
            break
        lg, cache = _forward_cached(m.params, jnp.asarray([[tok]], jnp.int32), cache, cfg=cfg)
    return out


def _prompt_ids(m: Model, prompt: str, chat: bool) -> list:
    if not prompt:
        raise MarjaxError("prompt is empty")
    if chat:   # templates that render BOS themselves (Llama 3) must not get a second one
        return m.tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       add_special=True)[0]
    return m.tokenizer.encode(prompt)


def generate(m: Model, prompt: str, max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False,
             stream: Optional[Callable[[str], None]] = None) -> str:
    """Greedy by default. `chat=True` wraps the prompt in the model's chat template. `stream`
    receives text pieces as they are decoded."""
    stop = set(getattr(m.tokenizer, "stop_ids", ()) or ())
    dec = m.tokenizer.decode_stream() if stream is not None else None

    def on_token(t: int) -> None:
        piece = "" if t in stop else dec.step(t)   # stop tokens end the text, never shown
        if piece:
            stream(piece)
    ids = generate_ids(m, _prompt_ids(m, prompt, chat), max_new_tokens, temperature, top_p, seed,
                       on_token=on_token if dec is not None else None)
    return m.tokenizer.decode([t for t in ids if t not in stop])


def generate_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax generate", description="Generate text, streaming tokens.")
    ap.add_argument("prompt", help="the prompt text")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"name or path (default {DEFAULT_MODEL})")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    m = load(a.model)
    if not a.chat:
        sys.stdout.write(a.prompt)
    sys.stdout.flush()

    def emit(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    generate(m, a.prompt, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
             chat=a.chat, stream=emit)
    sys.stdout.write("\n")
    return 0
