"""Readers for the zero-shot tasks, each from its original file format, and the requests that
score them (lm-evaluation-harness prompt conventions; the README's Evaluation section and docs/data_formats.md list the files).

Every multiple-choice item becomes an `MCItem`: one (context, continuation) pair per choice.
The continuation carries the target delimiter (a leading space), as lm-eval builds it, and
`choices` keeps the bare choice strings whose character length normalises acc_norm.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from marjax.errors import DataError, MarjaxError
from marjax.io.jsonl import jsonl_records

__all__ = [
    "MCItem", "ClozeItem", "TASK_FILES", "MC_TASKS", "NORM_TASKS", "ITEM_TASKS", "KNOWN_TASKS",
    "task_paths", "load_task", "read_piqa", "read_hellaswag", "read_arc", "read_openbookqa",
    "read_winogrande", "read_boolq", "read_lambada", "mc_requests",
]


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question. contexts[i] + continuations[i] is choice i's full text."""
    contexts: tuple
    continuations: tuple
    gold: int
    choices: tuple  # bare choice strings (no delimiter): len() is acc_norm's normaliser


@dataclass(frozen=True)
class ClozeItem:
    """LAMBADA: predict `continuation` (leading space included) after `context`."""
    context: str
    continuation: str


# Files under --data-dir, per task (the layout of shared/data).
TASK_FILES = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "arc_easy": ("arc_easy/arc_easy.jsonl",),
    "arc_challenge": ("arc_challenge/arc_challenge.jsonl",),
    "winogrande": ("winogrande/winogrande.jsonl",),
    "boolq": ("boolq/boolq.jsonl",),
    "openbookqa": ("openbookqa/openbook_qa.jsonl",),
    "lambada": ("lambada/lambada_openai.jsonl",),
}
MC_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa")
# Tasks for which lm-eval reports acc_norm besides acc (boolq and winogrande: acc only).
NORM_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa")
ITEM_TASKS = MC_TASKS + ("lambada",)
KNOWN_TASKS = ("ppl",) + ITEM_TASKS + ("gen",)

DELIM = " "  # lm-eval's target_delimiter


def task_paths(name: str, data_dir: str) -> tuple:
    """Absolute paths of a task's files; DataError naming the first one that is missing."""
    if name not in TASK_FILES:
        raise MarjaxError(f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    paths = tuple(os.path.join(data_dir, rel) for rel in TASK_FILES[name])
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"task {name!r} needs the file {p} (expected layout: <data-dir>/"
                            f"{', <data-dir>/'.join(TASK_FILES[name])}); see the README's Evaluation section (Data files)")
    return paths


def _read_lines(path: str) -> list:
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _read_jsonl(path: str, limit: Optional[int]) -> list:
    """(line number, dict) for the first `limit` non-empty lines."""
    out = []
    if limit is not None and limit <= 0:
        return out
    for i, obj in jsonl_records("\n".join(_read_lines(path)), path):   # lazy: lines past `limit` are not parsed
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        out.append((i, obj))
        if limit is not None and len(out) >= limit:
            break
    return out


def _field(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise DataError(f"{where}: missing key {key!r} (keys present: {sorted(obj)})")
    v = obj[key]
    if kind is str and not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise DataError(f"{where}: {key!r} must be an integer, got {v!r}")
    if kind is list and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
        raise DataError(f"{where}: {key!r} must be a list of strings, got {v!r}")
    return v


def _gold(g: int, n: int, where: str) -> int:
    if not 0 <= g < n:
        raise DataError(f"{where}: gold label must be in 0..{n - 1}, got {g}")
    return g


def _mc(context: str, choices, gold: int) -> MCItem:
    return MCItem(contexts=(context,) * len(choices), continuations=tuple(DELIM + c for c in choices),
                  gold=gold, choices=tuple(choices))


def read_piqa(jsonl_path: str, labels_path: str, limit: Optional[int] = None) -> list:
    """PIQA: {"goal","sol1","sol2"} per line; the same line of the .lst file is 0 or 1.
    Context "Question: {goal}\\nAnswer:", choices " {sol1}" / " {sol2}"."""
    rows = _read_jsonl(jsonl_path, limit)
    labels = [s.strip() for s in _read_lines(labels_path)]
    if len(labels) < len(rows):
        raise DataError(f"{labels_path}: has {len(labels)} labels but {jsonl_path} has at least "
                        f"{len(rows)} items; the two files must have one line per item")
    items = []
    for k, (i, obj) in enumerate(rows):
        where = f"{jsonl_path}:{i}"
        goal, s1, s2 = (_field(obj, key, str, where) for key in ("goal", "sol1", "sol2"))
        if labels[k] not in ("0", "1"):
            raise DataError(f"{labels_path}:{k + 1}: label must be 0 or 1, got {labels[k]!r}")
        items.append(_mc(f"Question: {goal}\nAnswer:", (s1, s2), int(labels[k])))
    return items


def read_hellaswag(path: str, limit: Optional[int] = None) -> list:
    """HellaSwag 6-line format: "{activity_label}: {ctx}", gold 0-3, then 4 endings.
    The text is already preprocessed (bracket tags removed), so it is used as is."""
    lines = _read_lines(path)
    if len(lines) % 6:
        raise DataError(f"{path}: expected 6 lines per item (context, gold, 4 endings), but the file "
                        f"has {len(lines)} lines, not a multiple of 6")
    items = []
    for start in range(0, len(lines), 6):
        if limit is not None and len(items) >= limit:
            break
        ctx, g, *endings = lines[start:start + 6]
        if g.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{start + 2}: gold line must be 0-3, got {g!r}")
        items.append(_mc(ctx, tuple(endings), int(g)))
    return items


def _read_query_choices(path: str, limit: Optional[int], suffix: str, n_choices: Optional[int]) -> list:
    items = []
    for i, obj in _read_jsonl(path, limit):
        where = f"{path}:{i}"
        query = _field(obj, "query", str, where)
        choices = _field(obj, "choices", list, where)
        if n_choices is not None and len(choices) != n_choices:
            raise DataError(f"{where}: expected {n_choices} choices, got {len(choices)}")
        if len(choices) < 2:
            raise DataError(f"{where}: expected at least 2 choices, got {len(choices)}")
        gold = _gold(_field(obj, "gold", int, where), len(choices), where)
        items.append(_mc(query + suffix, tuple(choices), gold))
    return items


def read_arc(path: str, limit: Optional[int] = None) -> list:
    """ARC (llm-foundry jsonl): {"query": "Question: ...", "choices", "gold"}; context
    query + "\\nAnswer:"."""
    return _read_query_choices(path, limit, "\nAnswer:", None)


def read_openbookqa(path: str, limit: Optional[int] = None) -> list:
    """OpenBookQA (llm-foundry jsonl): the question stem is the context."""
    return _read_query_choices(path, limit, "", None)


def read_boolq(path: str, limit: Optional[int] = None) -> list:
    """BoolQ (llm-foundry jsonl): query "Passage: ...\\nQuestion: ...?" + "\\nAnswer:", choices
    " no" / " yes" (gold 1 = yes)."""
    return _read_query_choices(path, limit, "\nAnswer:", 2)


def read_winogrande(path: str, limit: Optional[int] = None) -> list:
    """WinoGrande (llm-foundry jsonl), partial scoring: choice i scores " " + continuation after
    context_options[i] (the sentence up to the blank, filled with option i)."""
    items = []
    for i, obj in _read_jsonl(path, limit):
        where = f"{path}:{i}"
        opts = _field(obj, "context_options", list, where)
        if len(opts) != 2:
            raise DataError(f"{where}: expected 2 context_options, got {len(opts)}")
        cont = _field(obj, "continuation", str, where)
        gold = _gold(_field(obj, "gold", int, where), 2, where)
        items.append(MCItem(contexts=tuple(opts), continuations=(DELIM + cont,) * 2, gold=gold,
                            choices=tuple(opts)))
    return items


def read_lambada(path: str, limit: Optional[int] = None) -> list:
    """LAMBADA (OpenAI detokenised, llm-foundry jsonl): {"context", "continuation"}; the target
    is " " + continuation (the last word)."""
    items = []
    for i, obj in _read_jsonl(path, limit):
        where = f"{path}:{i}"
        ctx = _field(obj, "context", str, where)
        cont = _field(obj, "continuation", str, where)
        if not cont.strip():
            raise DataError(f"{where}: empty continuation")
        items.append(ClozeItem(context=ctx, continuation=DELIM + cont.strip()))
    return items


_READERS: dict = {
    "piqa": read_piqa, "hellaswag": read_hellaswag, "arc_easy": read_arc, "arc_challenge": read_arc,
    "winogrande": read_winogrande, "boolq": read_boolq, "openbookqa": read_openbookqa,
    "lambada": read_lambada,
}


def load_task(name: str, data_dir: str, limit: Optional[int] = None) -> list:
    """The first `limit` items (all when None) of task `name` read from `data_dir`."""
    if limit is not None and limit < 1:
        raise MarjaxError(f"limit must be >= 1 or None, got {limit}")
    paths = task_paths(name, data_dir)
    reader: Callable = _READERS[name]
    items = reader(*paths, limit=limit)
    if not items:
        raise DataError(f"task {name!r}: no items in {paths[0]}")
    return items


def mc_requests(items) -> list:
    """Flat (context, continuation) list: choice j of item i sits at offset sum(n_choices[:i]) + j."""
    return [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
