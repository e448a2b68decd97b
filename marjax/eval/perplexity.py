"""Perplexity of long text with a sliding window: each token is scored exactly once, with as
much left context as the window allows.

The token sequence is [prefix] + encode(text), the prefix being BOS (else EOS, lm-eval's
rolling-loglikelihood prefix) so the first text token is scored too. Window k feeds
seq[start:end] (end - start <= window) and scores only the predictions of seq[prev_end + 1 :
end + 1], i.e. `stride` new tokens with at least window - stride tokens of context. With
stride == window this is lm-eval's disjoint rolling windows; smaller strides give each token
more context for more compute.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from marjax.errors import DataError, MarjaxError
from marjax.eval.scoring import LogitsFn, encode_text, prefix_token, run_batches, token_logprobs

__all__ = ["rolling_windows", "token_nll", "text_perplexity", "file_perplexity", "default_ppl_file",
           "DEFAULT_PPL_FILE"]

DEFAULT_PPL_FILE = "wikitext2_valid.txt"


def rolling_windows(n_tokens: int, window: int, stride: Optional[int] = None) -> list:
    """[(start, end, n_new)] for a sequence of n_tokens: input seq[start:end] predicts
    seq[start + 1 : end + 1], of which the last n_new are scored. The scored ranges tile
    positions 1..n_tokens-1 exactly once."""
    stride = window if stride is None else stride
    if window < 1:
        raise MarjaxError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise MarjaxError(f"stride must be in 1..window ({window}), got {stride}")
    n_pred = n_tokens - 1
    out, prev = [], 0
    while prev < n_pred:
        end = min(n_pred, window if prev == 0 else prev + stride)
        out.append((max(0, end - window), end, end - prev))
        prev = end
    return out


def token_nll(logits_fn: LogitsFn, seq: Sequence[int], window: int, stride: Optional[int] = None,
              batch_size: int = 8, max_batch_tokens: Optional[int] = None, desc: str = "ppl",
              progress: bool = False) -> tuple:
    """(total negative log-likelihood in nats, number of scored tokens) of seq[1:] given the
    preceding tokens, by sliding windows (module docstring)."""
    seq = np.asarray(seq, np.int64)
    wins = rolling_windows(len(seq), window, stride)
    rows = [seq[s:e] for s, e, _ in wins]

    def score(i, lg):
        s, e, n_new = wins[i]
        lp, _ = token_logprobs(lg[-n_new:], seq[e - n_new + 1:e + 1])
        return float(-lp.sum())

    nll = run_batches(logits_fn, rows, score, window, batch_size, None, max_batch_tokens, desc, progress)
    return float(sum(nll)), sum(w[2] for w in wins)


def text_perplexity(logits_fn: LogitsFn, tok, text: str, window: int, stride: Optional[int] = None,
                    batch_size: int = 8, max_batch_tokens: Optional[int] = None,
                    max_tokens: Optional[int] = None, progress: bool = False) -> dict:
    """token_ppl = exp(nll / tokens), bits_per_byte = nll / (ln 2 * UTF-8 bytes), byte_ppl and
    word_ppl (whitespace-split words) of `text`. max_tokens keeps the first tokens only (bytes
    and words are then counted on the decoded kept prefix)."""
    if not text:
        raise DataError("text for perplexity is empty")
    ids = encode_text(tok, text)
    if not ids:
        raise DataError(f"text for perplexity encodes to no tokens: {text[:40]!r}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise MarjaxError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        if len(ids) > max_tokens:
            ids = ids[:max_tokens]
            text = tok.decode(ids)
    nll, n = token_nll(logits_fn, [prefix_token(tok)] + ids, window, stride, batch_size,
                       max_batch_tokens, progress=progress)
    n_bytes, n_words = len(text.encode("utf-8")), len(text.split())
    return {"token_ppl": math.exp(nll / n), "bits_per_byte": nll / (math.log(2) * n_bytes),
            "byte_ppl": math.exp(nll / n_bytes), "word_ppl": math.exp(nll / max(1, n_words)),
            "nll": nll, "n": n, "n_bytes": n_bytes, "n_words": n_words,
            "window": window, "stride": window if stride is None else stride}


def default_ppl_file(data_dir: Optional[str], ppl_file: Optional[str]) -> str:
    """--ppl-file when given, else <data-dir>/wikitext2_valid.txt; DataError naming the path."""
    path = ppl_file if ppl_file else os.path.join(data_dir or ".", DEFAULT_PPL_FILE)
    if not os.path.isfile(path):
        how = "--ppl-file" if ppl_file else f"--data-dir (expects {DEFAULT_PPL_FILE} in it) or --ppl-file"
        raise DataError(f"perplexity text file not found: {path} (set {how})")
    return path


def file_perplexity(logits_fn: LogitsFn, tok, path: str, window: int, stride: Optional[int] = None,
                    batch_size: int = 8, max_batch_tokens: Optional[int] = None,
                    max_tokens: Optional[int] = None, progress: bool = False) -> dict:
    """text_perplexity of a UTF-8 file's whole content (lines concatenated as they are)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read perplexity file {path}: {e}") from e
    return text_perplexity(logits_fn, tok, text, window, stride, batch_size, max_batch_tokens,
                           max_tokens, progress)
