"""`marjax generate`: stream a model's continuation of a prompt to stdout."""
from __future__ import annotations

import argparse
import sys

from marjax.api import DEFAULT_MODEL, generate, load, quantize
from marjax.models.quant import MODES

__all__ = ["main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax generate", description="Generate text, streaming tokens.")
    ap.add_argument("prompt", help="the prompt text")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"name or path (default {DEFAULT_MODEL})")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="f32", choices=MODES,
                    help="matmul weights to decode with: f32 (default), bf16, int8 (per-32 groups) or q4 (4-bit "
                         "as llama.cpp's Q4_1; the fastest on a CPU with marjax's kernel); int8 and q4 give the "
                         "same greedy text as f32 on the golden prompts")
    a = ap.parse_args(argv)
    m = load(a.model)
    if a.weights != "f32":
        m = quantize(m, a.weights)
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
