"""The task suite: `evaluate(["ppl", "piqa", ...])` reads each task's items
(`marjax.eval.tasks`), scores them with the primitives of `marjax.eval.scoring` (or
`marjax.eval.perplexity` for "ppl") and turns the scores into metrics with sample stderrs:
acc / acc_norm for multiple choice, acc / ppl for LAMBADA."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from marjax.errors import MarjaxError
from marjax.eval import perplexity as P
from marjax.eval import tasks as T
from marjax.eval.scoring import LogitsFn, loglikelihood

__all__ = ["sample_stderr", "score_multiple_choice", "score_lambada", "evaluate_task", "evaluate"]


def sample_stderr(values) -> Optional[float]:
    """Standard error of the mean with the sample std (ddof=1), as lm-eval reports it; for 0/1
    values that is sqrt(p (1 - p) / (n - 1)). None for fewer than 2 values."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return None
    return float(v.std(ddof=1) / math.sqrt(v.size))


def score_multiple_choice(items: Sequence, lls: Sequence[float], with_norm: bool = True) -> dict:
    """acc (argmax loglik == gold) and acc_norm (argmax loglik / len(choice string) == gold, lm-eval's
    character-length normalisation), with sample stderrs, from the flat per-choice logliks
    ordered as tasks.mc_requests."""
    acc, acc_norm, preds, k = [], [], [], 0
    for it in items:
        n = len(it.continuations)
        ll = np.asarray(lls[k:k + n], np.float64)
        k += n
        pred = int(np.argmax(ll))
        preds.append(pred)
        acc.append(float(pred == it.gold))
        lens = np.asarray([max(1, len(c)) for c in it.choices], np.float64)
        acc_norm.append(float(int(np.argmax(ll / lens)) == it.gold))
    if k != len(lls):
        raise MarjaxError(f"got {len(lls)} logliks for items with {k} choices in all")
    res = {"acc": float(np.mean(acc)), "acc_stderr": sample_stderr(acc), "n": len(items)}
    if with_norm:
        res.update(acc_norm=float(np.mean(acc_norm)), acc_norm_stderr=sample_stderr(acc_norm))
    res["predictions"] = preds
    return res


def score_lambada(results: Sequence[tuple]) -> dict:
    """LAMBADA: acc = fraction of targets that greedy decoding reproduces exactly; ppl =
    exp(-mean per-item loglik) (lm-eval's `perplexity`), stderr by the delta method."""
    ll = np.asarray([r[0] for r in results], np.float64)
    greedy = [float(r[1]) for r in results]
    ppl = float(np.exp(-ll.mean()))
    se_ll = sample_stderr(ll)
    return {"acc": float(np.mean(greedy)), "acc_stderr": sample_stderr(greedy),
            "ppl": ppl, "ppl_stderr": None if se_ll is None else ppl * se_ll, "n": len(results)}


def evaluate_task(name: str, logits_fn: LogitsFn, tok, max_len: int, data_dir: str,
                  limit: Optional[int] = None, batch_size: int = 8,
                  max_batch_tokens: Optional[int] = None, progress: bool = False) -> dict:
    """Metrics of one multiple-choice task or lambada read from data_dir (tasks.TASK_FILES)."""
    items = T.load_task(name, data_dir, limit)
    if name == "lambada":
        reqs = [(it.context, it.continuation) for it in items]
        return score_lambada(loglikelihood(logits_fn, tok, reqs, max_len, batch_size, max_batch_tokens,
                                           desc=name, progress=progress))
    res = loglikelihood(logits_fn, tok, T.mc_requests(items), max_len, batch_size, max_batch_tokens,
                        desc=name, progress=progress)
    return score_multiple_choice(items, [r[0] for r in res], with_norm=name in T.NORM_TASKS)


def evaluate(task_names: Sequence[str], logits_fn: LogitsFn, tok, max_len: int, data_dir: str = ".",
             limit: Optional[int] = None, batch_size: int = 8, max_batch_tokens: Optional[int] = None,
             ppl_file: Optional[str] = None, ppl_window: Optional[int] = None,
             ppl_stride: Optional[int] = None, ppl_max_tokens: Optional[int] = None,
             progress: bool = False) -> dict:
    """{task: metrics} for the listed tasks ("ppl" and the item tasks; "gen" needs a teacher and
    is run by generation.generation_eval). Unknown names raise before anything runs."""
    unknown = [t for t in task_names if t not in ("ppl",) + T.ITEM_TASKS]
    if unknown:
        raise MarjaxError(f"unknown task(s) {unknown}; known tasks: {', '.join(('ppl',) + T.ITEM_TASKS)}")
    out = {}
    for name in task_names:
        if name == "ppl":
            path = P.default_ppl_file(data_dir, ppl_file)
            out[name] = P.file_perplexity(logits_fn, tok, path, window=ppl_window or max_len,
                                          stride=ppl_stride, batch_size=batch_size,
                                          max_batch_tokens=max_batch_tokens, max_tokens=ppl_max_tokens,
                                          progress=progress)
            out[name]["file"] = os.path.basename(path)
        else:
            out[name] = evaluate_task(name, logits_fn, tok, max_len, data_dir, limit, batch_size,
                                      max_batch_tokens, progress)
    return out
