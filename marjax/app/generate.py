"""`marjax generate`: stream a model's continuation of a prompt to stdout."""
from __future__ import annotations

import argparse
import sys

from marjax.api import DEFAULT_MODEL, generate, load

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
