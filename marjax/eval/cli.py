"""`marjax eval`: perplexity, zero-shot multiple-choice tasks and (with --teacher) generation
metrics of a model; prints a markdown table and writes JSON."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from marjax.api import DEFAULT_MODEL, generate_ids, load, logits
from marjax.errors import DataError, MarjaxError
from marjax.eval import generation as G
from marjax.eval import tasks as T
from marjax.eval.perplexity import default_ppl_file
from marjax.eval.suite import evaluate

__all__ = ["main", "format_table", "DEFAULT_TASKS"]

DEFAULT_TASKS = ("ppl",) + T.ITEM_TASKS
_SKIP_KEYS = ("n", "predictions", "file", "window", "stride", "nll", "n_bytes", "n_words")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _rows(task: str, res: dict):
    """(task, metric, value, stderr, n) rows of one task's result dict."""
    if task == "gen":
        for part in ("greedy", "sampled", "agreement"):
            for key, v in res.get(part, {}).items():
                if key not in ("n", "k", "temperature", "top_p") and isinstance(v, (int, float)):
                    yield task, f"{part}/{key}", v, None, res.get(part, {}).get("n", res["n_prompts"])
        return
    for key, v in res.items():
        if key in _SKIP_KEYS or key.endswith("_stderr") or key == "seconds":
            continue
        yield task, key, v, res.get(f"{key}_stderr"), res.get("n")


def format_table(results: dict) -> str:
    """Markdown table | task | metric | value | stderr | n | of {task: metrics}."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for task, res in results.items():
        for t, metric, v, se, n in _rows(task, res):
            lines.append(f"| {t} | {metric} | {_fmt(v)} | {_fmt(se)} | {_fmt(n)} |")
    return "\n".join(lines)


def _parse_tasks(spec: str) -> list:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return list(DEFAULT_TASKS)
    unknown = [t for t in names if t not in T.KNOWN_TASKS]
    if unknown or not names:
        raise MarjaxError(f"--tasks: unknown task(s) {unknown or [spec]}; known tasks: "
                          f"{', '.join(T.KNOWN_TASKS)} (or 'all')")
    return list(dict.fromkeys(names))


def _read_prompts(path: Optional[str]) -> list:
    if path is None:
        return list(G.DEFAULT_PROMPTS)
    if not os.path.isfile(path):
        raise DataError(f"--prompts-file: {path} not found (one prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = [ln.rstrip("\n") for ln in f if ln.strip()]
    if not prompts:
        raise DataError(f"--prompts-file: {path} has no non-empty lines")
    return prompts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="marjax eval",
        description="Evaluate a model: sliding-window perplexity (ppl), zero-shot multiple choice "
                    "(lm-eval-harness conventions) and, with --teacher, generation metrics (gen). "
                    "Data files: see the README section 'Evaluation (marjax eval)' > 'Data files' and docs/data_formats.md.")
    ap.add_argument("--model", default=None, help="model name or path (default: the package default model)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                    help=f"comma-separated, from {', '.join(T.KNOWN_TASKS)}; 'all' (the default) is every task but gen")
    ap.add_argument("--data-dir", default=".", help="folder with the task subfolders and wikitext2_valid.txt")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each item task")
    ap.add_argument("--batch-size", type=int, default=8, help="max sequences per forward pass")
    ap.add_argument("--max-batch-tokens", type=int, default=16384,
                    help="cap on rows x padded length per forward pass (bounds the logits' memory)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--ppl-file", default=None, help="text file for ppl (default <data-dir>/wikitext2_valid.txt)")
    ap.add_argument("--ppl-window", type=int, default=None, help="ppl window in tokens (default max_seq_len)")
    ap.add_argument("--ppl-stride", type=int, default=None, help="new tokens scored per window (default = window)")
    ap.add_argument("--ppl-max-tokens", type=int, default=None, help="score only the first N tokens of the ppl file")
    ap.add_argument("--teacher", default=None, help="teacher model for the gen task")
    ap.add_argument("--prompts-file", default=None, help="gen prompts, one a line (default: a built-in set)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="gen: new tokens per continuation")
    ap.add_argument("--gen-k", type=int, default=None, help="gen: tokens compared with the teacher (default all)")
    ap.add_argument("--gen-samples", type=int, default=1, help="gen: sampled continuations per prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="gen: sampling temperature")
    ap.add_argument("--top-p", type=float, default=0.95, help="gen: nucleus sampling mass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _check_inputs(a, names: list) -> None:
    """Fail on bad arguments and missing files before a model is loaded."""
    for flag in ("limit", "batch_size", "max_batch_tokens", "ppl_window", "ppl_stride", "ppl_max_tokens",
                 "gen_tokens", "gen_k"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise MarjaxError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if a.gen_samples < 0:
        raise MarjaxError(f"--gen-samples must be >= 0, got {a.gen_samples}")
    for name in names:
        if name == "ppl":
            default_ppl_file(a.data_dir, a.ppl_file)
        elif name == "gen":
            if not a.teacher:
                raise MarjaxError("task 'gen' needs --teacher (the model whose likelihood scores the student)")
            _read_prompts(a.prompts_file)
        else:
            T.task_paths(name, a.data_dir)


def _model_fns(m):
    return (lambda ids: np.asarray(logits(m, ids)),
            lambda p, n, t, tp, s: generate_ids(m, p, n, temperature=t, top_p=tp, seed=s))


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    names = _parse_tasks(a.tasks)
    _check_inputs(a, names)
    model_name = a.model or DEFAULT_MODEL
    m = load(model_name)
    logits_fn, gen_fn = _model_fns(m)
    max_len = int(m.config.max_seq_len)
    progress = not a.no_progress
    results, settings = {}, {k: v for k, v in vars(a).items()}
    for name in names:
        t0 = time.perf_counter()
        if name == "gen":
            teacher = load(a.teacher)
            t_logits, t_gen = _model_fns(teacher)
            prompts = G.encode_prompts(m.tokenizer, _read_prompts(a.prompts_file))
            res = G.generation_eval(prompts, gen_fn, t_gen, t_logits, min(max_len, int(teacher.config.max_seq_len)),
                                    max_new_tokens=a.gen_tokens, k=a.gen_k, samples_per_prompt=a.gen_samples,
                                    temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                                    batch_size=a.batch_size, decode=m.tokenizer.decode, progress=progress)
        else:
            res = evaluate([name], logits_fn, m.tokenizer, max_len, a.data_dir, a.limit, a.batch_size,
                           a.max_batch_tokens, a.ppl_file, a.ppl_window, a.ppl_stride, a.ppl_max_tokens,
                           progress)[name]
            res.pop("predictions", None)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        if progress:
            print(f"[{name}] done in {res['seconds']:.1f}s", file=sys.stderr)
    print(f"model: {model_name}\n")
    print(format_table(results))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"model": model_name, "tasks": names, "results": results, "settings": settings},
                      f, indent=2)
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
