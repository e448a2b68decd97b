"""Public API: load a model bundle, get logits, generate text.

    m = load("smollm2-135m-instruct")       # Model(config, params, tokenizer, source)
    logits(m, ids)                          # int (b, l) -> float32 (b, l, v)
    generate(m, "Once upon a time", max_new_tokens=32)
    mq = quantize(m, "int8")                # int8 weights in the decode layout: 4x smaller, faster decoding

Floor 4 of the layout: it joins the loaders (`marjax.io`) with the model (`marjax.models.lm`) and
the decoder (`marjax.sampling`); the `marjax generate` command around it is `marjax.app.generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from marjax.config import ModelConfig
from marjax.errors import MarjaxError
from marjax.io.resolve import is_marjax_checkpoint, resolve_model
from marjax.models import lm, quant
from marjax.sampling import as_ids, decode
from marjax.train.checkpoint import load_model_dir

__all__ = ["Model", "load", "logits", "generate", "generate_ids", "quantize", "DEFAULT_MODEL"]

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
    path = str(name_or_path)
    cfg, params, tok = load_model_dir(path) if is_marjax_checkpoint(path) else resolve_model(path)
    return Model(config=cfg, params=params, tokenizer=tok, source=path)


def quantize(m: Model, weights: str = "int8") -> Model:
    """The model with weight-only quantised matmul weights ("bf16", "int8": per-32 groups, "q4":
    4-bit blocks as llama.cpp's Q4_1; "f32": float32) in the decode layout (unrolled layers,
    marjax.models.quant): what `generate` runs fastest on a CPU (native kernels,
    marjax.kernels.cpu_kernels). `logits` dequantises them inside its jitted forward; training wants the
    float, stacked params of `load`."""
    params = quant.quantize_params(lm.unroll_layers(m.params), weights)
    return Model(config=m.config, params=params, tokenizer=m.tokenizer, source=m.source)


def _forward_any(params, ids, cfg, taps=(), head=True):
    return lm.forward(quant.dequantize_params(params, jnp.dtype(cfg.dtype)), ids, cfg, taps=taps, head=head)


_forward = jax.jit(_forward_any, static_argnames=("cfg", "taps", "head"))


def logits(m: Model, token_ids) -> Float[Array, "b l v"]:
    """int (batch, len) [or (len,)] -> float32 (batch, len, vocab)."""
    ids = as_ids(token_ids)
    lm.check_ids(ids, m.config)
    if ids.shape[1] > m.config.max_seq_len:
        raise MarjaxError(f"sequence length {ids.shape[1]} exceeds the model's max_seq_len {m.config.max_seq_len}")
    out, _ = _forward(m.params, ids, cfg=m.config)
    return out


def _stop_ids(m: Model) -> set:
    return set(getattr(m.tokenizer, "stop_ids", ()) or ())


def generate_ids(m: Model, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids=None,
                 on_token: Optional[Callable[[int], None]] = None) -> list:
    """Decode with the model's cache (KV cache or SSM state). Returns the new ids only; stops
    after a stop id (default: the tokenizer's)."""
    stop = _stop_ids(m) if stop_ids is None else set(stop_ids)
    return decode(m.params, m.config, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p,
                  seed=seed, stop_ids=stop, on_token=on_token)


def prompt_ids(m: Model, prompt: str, chat: bool) -> list:
    """The prompt's ids; `chat` wraps it in the model's chat template as one user turn."""
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
    stop = _stop_ids(m)
    dec = m.tokenizer.decode_stream() if stream is not None else None

    def on_token(t: int) -> None:
        piece = "" if t in stop else dec.step(t)   # stop tokens end the text, never shown
        if piece:
            stream(piece)
    ids = generate_ids(m, prompt_ids(m, prompt, chat), max_new_tokens, temperature, top_p, seed,
                       on_token=on_token if dec is not None else None)
    return m.tokenizer.decode([t for t in ids if t not in stop])
