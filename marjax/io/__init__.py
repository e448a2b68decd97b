"""Model and tokenizer loaders: GGUF (llama.cpp), HF safetensors (Llama, marjax SSM, cartesia
Llamba), tokenizers, and name/path resolution.

    cfg, params, tok = resolve_model("smollm2-135m-instruct")   # or a .gguf / a model directory
    cfg, params, tok = load_gguf(path);  save_gguf(path, cfg, params, tok, qtype="Q8_0")
    cfg, params, tok = load_hf(dir);     save_hf(dir, cfg, params, tok)
"""
from marjax.io.gguf import load_gguf, save_gguf
from marjax.io.hf import load_hf, save_hf, save_llamba
from marjax.io.resolve import resolve_model
from marjax.io.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["load_gguf", "save_gguf", "load_hf", "save_hf", "save_llamba", "resolve_model", "Tokenizer",
           "ByteTokenizer"]
