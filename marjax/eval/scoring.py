"""Scoring primitives: encode (context, continuation) pairs, batch token rows into padded
buckets, and sum the log-likelihood of continuations, lm-evaluation-harness style. The task
dispatcher that turns these scores into metrics is `marjax.eval.suite`.

A model is a `logits_fn(ids int32 (b, l)) -> float32 (b, l, V)` and a tokenizer with
`encode(text) -> list[int]`, `decode`, `add_bos`, `bos_id`, `eos_id`.

Tokenisation (lm-eval's HF `_encode_pair`): trailing spaces of the context move to the front of
the continuation; the whole string context + continuation is encoded once and split at the
token count of the context encoded alone, so the continuation tokens are those a model sees in
running text. With `add_bos` the BOS id is prepended to the context; an empty context becomes
the single prefix token (BOS, else EOS). A sequence longer than max_len + 1 is left-truncated.

Batching: requests that share a context are kept in one batch (lm-eval groups them the same
way), batches are ordered longest first, and each batch is padded to (rows, length) buckets
that are powers of two so a jitted model compiles a handful of shapes, not one per item.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from marjax.errors import DataError, MarjaxError

__all__ = [
    "LogitsFn", "bos_prefix", "encode_text", "encode_pair", "bucket_length", "plan_batches",
    "run_batches", "token_logprobs", "loglikelihood_tokens", "loglikelihood", "prefix_token",
]

LogitsFn = Callable[[np.ndarray], np.ndarray]
MIN_BUCKET = 16


def bos_prefix(tok) -> list:
    """[bos_id] when the tokenizer wants a BOS (add_bos and bos_id set), else []."""
    bos = getattr(tok, "bos_id", None)
    return [int(bos)] if getattr(tok, "add_bos", False) and bos is not None else []


def prefix_token(tok) -> int:
    """The token that stands for an empty context (lm-eval: BOS, else EOS)."""
    for name in ("bos_id", "eos_id"):
        t = getattr(tok, name, None)
        if t is not None:
            return int(t)
    raise MarjaxError("the tokenizer has neither bos_id nor eos_id: an empty context cannot be scored")


def encode_text(tok, text: str) -> list:
    """Token ids of `text` without any BOS (a BOS the tokenizer adds itself is dropped; callers
    add `bos_prefix` once, where it belongs)."""
    ids = [int(t) for t in tok.encode(text)]
    pre = bos_prefix(tok)
    if pre and ids[:1] == pre:
        ids = ids[1:]
    return ids


def encode_pair(tok, context: str, continuation: str) -> tuple:
    """(context ids, continuation ids), lm-eval's way (module docstring)."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    whole = encode_text(tok, context + continuation)
    ctx = encode_text(tok, context)
    cont = whole[len(ctx):]
    if not cont:
        raise DataError(f"continuation {continuation!r} encodes to no tokens after context ...{context[-40:]!r}")
    ctx = bos_prefix(tok) + ctx
    if not ctx:
        ctx = [prefix_token(tok)]
    return ctx, cont


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_length(n: int, max_len: int, min_bucket: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least min_bucket), capped at max_len."""
    if n > max_len:
        raise MarjaxError(f"sequence of {n} tokens exceeds max_len {max_len}")
    return min(max(min_bucket, _next_pow2(n)), max_len)


def _row_bucket(n_rows: int, batch_size: int) -> int:
    return min(_next_pow2(n_rows), batch_size)


def _rows_per_batch(length: int, batch_size: int, max_batch_tokens: Optional[int]) -> int:
    if max_batch_tokens is None:
        return batch_size
    fit = max(1, max_batch_tokens // max(1, length))
    return min(batch_size, 1 << (fit.bit_length() - 1))  # a power of two, so row padding stays in budget


def plan_batches(lengths: Sequence[int], groups: Sequence[int], max_len: int, batch_size: int,
                 max_batch_tokens: Optional[int] = None) -> list:
    """Batches (lists of row indices): rows of one group stay together where they fit, groups
    go longest first, and a batch holds at most batch_size rows (fewer when
    rows x bucket length would exceed max_batch_tokens)."""
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    order = sorted(by_group.values(), key=lambda rows: (-max(lengths[r] for r in rows), rows[0]))
    batches, cur, cap = [], [], 0
    for rows in order:
        if cur and len(cur) + len(rows) > cap:
            batches.append(cur)
            cur = []
        if not cur:  # longest first: the batch's first group sets its length bucket
            cap = _rows_per_batch(bucket_length(max(lengths[r] for r in rows), max_len),
                                  batch_size, max_batch_tokens)
        for r in rows:
            if len(cur) == cap:  # a group bigger than a batch spills into the next one
                batches.append(cur)
                cur = []
            cur.append(r)
    if cur:
        batches.append(cur)
    return batches


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False,
                dynamic_ncols=True, mininterval=0.5)


def run_batches(logits_fn: LogitsFn, rows: Sequence[Sequence[int]], score_fn: Callable, max_len: int,
                batch_size: int, groups: Optional[Sequence[int]] = None,
                max_batch_tokens: Optional[int] = None, desc: str = "", progress: bool = False) -> list:
    """Runs logits_fn over right-padded buckets of `rows` and returns
    [score_fn(i, logits (len(rows[i]), V) float32) for each row i], in input order."""
    if batch_size < 1:
        raise MarjaxError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(r) for r in rows]
    if lengths and min(lengths) < 1:
        raise MarjaxError("cannot score an empty token row")
    groups = list(range(len(rows))) if groups is None else groups
    plan = plan_batches(lengths, groups, max_len, batch_size, max_batch_tokens)
    out: list = [None] * len(rows)
    with _progress(len(plan), desc, progress) as bar:
        for batch in plan:
            L = bucket_length(max(lengths[i] for i in batch), max_len)
            R = _row_bucket(len(batch), batch_size)
            ids = np.zeros((R, L), np.int32)  # right padding: causal models ignore what follows
            for k, i in enumerate(batch):
                ids[k, :lengths[i]] = rows[i]
            lg = np.asarray(logits_fn(ids))
            if lg.ndim != 3 or lg.shape[:2] != (R, L):
                raise MarjaxError(f"logits_fn returned shape {lg.shape}; expected ({R}, {L}, vocab) "
                                  f"for ids of shape {ids.shape}")
            for k, i in enumerate(batch):
                out[i] = score_fn(i, lg[k, :lengths[i]])
            bar.update(1)
    return out


def token_logprobs(lg: np.ndarray, targets: np.ndarray) -> tuple:
    """log softmax(lg)[t, targets[t]] (float64) and whether argmax == target at every position."""
    x = lg.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    lp = x[np.arange(len(targets)), targets] - lse
    return lp, bool(np.all(x.argmax(-1) == targets))


def loglikelihood_tokens(logits_fn: LogitsFn, requests: Sequence[tuple], max_len: int,
                         batch_size: int = 8, max_batch_tokens: Optional[int] = None,
                         groups: Optional[Sequence[int]] = None, desc: str = "",
                         progress: bool = False) -> list:
    """[(sum log P(cont | ctx), greedy: bool)] for (ctx_ids, cont_ids) requests. The input row is
    (ctx + cont)[-(max_len + 1):][:-1]; its last len(cont) logits predict cont."""
    rows, conts = [], []
    for ctx, cont in requests:
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not ctx or not cont:
            raise MarjaxError(f"requests need a non-empty context and continuation, got {len(ctx)} "
                              f"and {len(cont)} tokens")
        if len(cont) > max_len:
            raise MarjaxError(f"continuation of {len(cont)} tokens exceeds max_len {max_len}")
        rows.append((ctx + cont)[-(max_len + 1):][:-1])
        conts.append(np.asarray(cont))

    def score(i, lg):
        n = len(conts[i])
        lp, greedy = token_logprobs(lg[-n:], conts[i])
        return float(lp.sum()), greedy

    if groups is None:  # group by identical context (its last tokens, as sent to the model)
        keys: dict = {}
        groups = [keys.setdefault(tuple(r[:len(r) - len(c) + 1]), len(keys)) for r, c in zip(rows, conts)]
    return run_batches(logits_fn, rows, score, max_len, batch_size, groups, max_batch_tokens, desc, progress)


def loglikelihood(logits_fn: LogitsFn, tok, requests: Sequence[tuple], max_len: int,
                  batch_size: int = 8, max_batch_tokens: Optional[int] = None, desc: str = "",
                  progress: bool = False) -> list:
    """[(loglik, greedy)] for text (context, continuation) requests (encode_pair, then
    loglikelihood_tokens; requests with the same context text are batched together)."""
    enc = [encode_pair(tok, c, x) for c, x in requests]
    keys: dict = {}
    groups = [keys.setdefault(c, len(keys)) for c, _ in requests]
    return loglikelihood_tokens(logits_fn, enc, max_len, batch_size, max_batch_tokens, groups, desc, progress)
