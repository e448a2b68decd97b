"""Generation quality of a student next to its teacher.

For each prompt the student writes a greedy continuation and `samples_per_prompt` sampled ones.
Each set is scored by
  * the teacher's mean log-probability per token of the student's tokens (pooled over the set;
    teacher_ppl = exp(-that)): how plausible the teacher finds what the student writes;
  * distinct-n (n = 1, 2, 3): distinct n-grams / all n-grams, pooled over the set (Li et al.
    2016), on token ids;
  * repetition_rate: the fraction of a continuation's n-grams (n = 4) that repeat an earlier
    n-gram of the same continuation, pooled (Welleck et al. 2019 "seq-rep-n").
The student's greedy continuation is also compared with the teacher's over the first k tokens:
prefix_match_len (tokens equal before the first divergence), prefix_match_frac (that over k)
and token_agreement (positions < k where the two are equal, divergence or not).

Models enter as callables, so everything here runs with fakes:
  generate_fn(prompt_ids, max_new_tokens, temperature, top_p, seed) -> new ids (list[int])
  logits_fn(ids int32 (b, l)) -> float32 (b, l, V)
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from marjax.errors import MarjaxError
from marjax.eval.scoring import LogitsFn, bos_prefix, encode_text, loglikelihood_tokens

__all__ = ["GenerateFn", "DEFAULT_PROMPTS", "distinct_n", "repetition_rate", "prefix_agreement",
           "teacher_logprobs", "continuation_metrics", "encode_prompts", "generation_eval"]

GenerateFn = Callable[[list, int, float, float, int], list]

DEFAULT_PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The capital of France is",
    "Photosynthesis is the process by which",
    "Here is a simple recipe for pancakes:",
    "The most important thing to remember when learning to code is",
    "In 1969, the first humans",
    "My favourite season of the year is",
    "A good night's sleep helps you",
)


def _ngrams(seq: Sequence[int], n: int) -> list:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> Optional[float]:
    """Distinct n-grams / total n-grams over all sequences (None when there are none)."""
    if n < 1:
        raise MarjaxError(f"n must be >= 1, got {n}")
    grams = [g for s in seqs for g in _ngrams(list(s), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(seqs: Sequence[Sequence[int]], n: int = 4) -> Optional[float]:
    """Fraction of n-grams that repeat an earlier n-gram of the same sequence, pooled over
    sequences (None when no sequence has n tokens)."""
    if n < 1:
        raise MarjaxError(f"n must be >= 1, got {n}")
    total = repeats = 0
    for s in seqs:
        grams = _ngrams(list(s), n)
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return repeats / total if total else None


def prefix_agreement(student: Sequence[int], teacher: Sequence[int], k: int) -> dict:
    """Agreement of two continuations over their first k tokens. Positions run to
    k_eff = min(k, longer length) (both stopping early is agreement, not a miss); a position
    only one of them reached counts as a mismatch."""
    if k < 1:
        raise MarjaxError(f"k must be >= 1, got {k}")
    a, b = list(student)[:k], list(teacher)[:k]
    k_eff = max(len(a), len(b))
    if k_eff == 0:
        return {"prefix_match_len": 0, "prefix_match_frac": 1.0, "token_agreement": 1.0}
    same = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(k_eff)]
    plen = same.index(False) if False in same else k_eff
    return {"prefix_match_len": plen, "prefix_match_frac": plen / k_eff,
            "token_agreement": sum(same) / k_eff}


def teacher_logprobs(teacher_logits_fn: LogitsFn, prompts: Sequence[Sequence[int]],
                     conts: Sequence[Sequence[int]], max_len: int, batch_size: int = 8,
                     progress: bool = False) -> list:
    """[(sum log P_teacher(cont | prompt), len(cont))]; empty continuations give (0.0, 0)."""
    idx = [i for i, c in enumerate(conts) if len(c)]
    res = loglikelihood_tokens(teacher_logits_fn, [(prompts[i], conts[i]) for i in idx], max_len,
                               batch_size, desc="teacher score", progress=progress)
    out = [(0.0, 0)] * len(conts)
    for i, (ll, _) in zip(idx, res):
        out[i] = (ll, len(conts[i]))
    return out


def continuation_metrics(scores: Sequence[tuple], conts: Sequence[Sequence[int]], rep_n: int = 4) -> dict:
    """Pooled teacher log-prob per token, teacher_ppl, distinct-1/2/3, repetition rate, mean length."""
    ll = sum(s for s, _ in scores)
    n = sum(c for _, c in scores)
    mean_lp = ll / n if n else None
    return {"teacher_logprob": mean_lp, "teacher_ppl": math.exp(-mean_lp) if n else None,
            "distinct_1": distinct_n(conts, 1), "distinct_2": distinct_n(conts, 2),
            "distinct_3": distinct_n(conts, 3), "repetition_rate": repetition_rate(conts, rep_n),
            "mean_len": float(np.mean([len(c) for c in conts])) if conts else 0.0, "n": len(conts)}


def encode_prompts(tok, texts: Sequence[str]) -> list:
    """Prompt ids: BOS (if the tokenizer wants one) + the text's tokens."""
    out = []
    for t in texts:
        ids = bos_prefix(tok) + encode_text(tok, t)
        if not ids:
            raise MarjaxError(f"prompt {t!r} encodes to no tokens")
        out.append(ids)
    return out


def generation_eval(prompts: Sequence[Sequence[int]], student_generate: GenerateFn,
                    teacher_generate: GenerateFn, teacher_logits_fn: LogitsFn, max_len: int, *,
                    max_new_tokens: int = 32, k: Optional[int] = None, samples_per_prompt: int = 1,
                    temperature: float = 1.0, top_p: float = 0.95, seed: int = 0, batch_size: int = 8,
                    decode: Optional[Callable[[list], str]] = None, n_examples: int = 3,
                    progress: bool = False) -> dict:
    """Student-vs-teacher generation metrics (module docstring). Prompts longer than
    max_len - max_new_tokens keep their last tokens. `decode` (ids -> str) adds a few decoded
    examples to the result."""
    if not prompts:
        raise MarjaxError("generation_eval needs at least one prompt")
    if not 1 <= max_new_tokens < max_len:
        raise MarjaxError(f"max_new_tokens must be in 1..{max_len - 1} (max_len {max_len}), got {max_new_tokens}")
    if samples_per_prompt < 0:
        raise MarjaxError(f"samples_per_prompt must be >= 0, got {samples_per_prompt}")
    k = max_new_tokens if k is None else k
    if not 1 <= k <= max_new_tokens:
        raise MarjaxError(f"k must be in 1..max_new_tokens ({max_new_tokens}), got {k}")
    prompts = [list(p)[-(max_len - max_new_tokens):] for p in prompts]
    if any(not p for p in prompts):
        raise MarjaxError("every prompt needs at least one token")

    greedy, t_greedy, samples, sample_prompts = [], [], [], []
    for i, p in enumerate(tqdm(prompts, desc="generate", disable=not progress, leave=False)):
        greedy.append(list(student_generate(p, max_new_tokens, 0.0, 1.0, seed)))
        t_greedy.append(list(teacher_generate(p, max_new_tokens, 0.0, 1.0, seed)))
        for j in range(samples_per_prompt):
            samples.append(list(student_generate(p, max_new_tokens, temperature, top_p,
                                                 seed + 1 + i * samples_per_prompt + j)))
            sample_prompts.append(p)

    out = {"n_prompts": len(prompts), "max_new_tokens": max_new_tokens}
    out["greedy"] = continuation_metrics(
        teacher_logprobs(teacher_logits_fn, prompts, greedy, max_len, batch_size, progress), greedy)
    if samples_per_prompt:
        out["sampled"] = continuation_metrics(
            teacher_logprobs(teacher_logits_fn, sample_prompts, samples, max_len, batch_size, progress),
            samples)
        out["sampled"].update(temperature=temperature, top_p=top_p)
    agree = [prefix_agreement(s, t, k) for s, t in zip(greedy, t_greedy)]
    out["agreement"] = {key: float(np.mean([a[key] for a in agree])) for key in agree[0]}
    out["agreement"]["k"] = k
    if decode is not None:
        out["examples"] = [{"prompt": decode(prompts[i]), "student_greedy": decode(greedy[i]),
                            "teacher_greedy": decode(t_greedy[i]),
                            **({"student_sample": decode(samples[i * samples_per_prompt])}
                               if samples_per_prompt else {})}
                           for i in range(min(n_examples, len(prompts)))]
    return out
