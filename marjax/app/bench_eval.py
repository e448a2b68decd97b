"""`marjax bench eval`: perplexity scoring throughput of marjax's eval path against a plain loop.

  marjax    marjax.eval.perplexity.token_nll (text_perplexity after encoding) with `marjax.logits`,
            as the pipeline scores held-out text: windows batched (--batch-size) and right-padded
            to length buckets, logits brought to the host, log-softmax in float64 numpy;
  plain     the loop one would write first: the same disjoint windows one at a time, a jitted
            forward per window, the log-likelihood of the targets summed on the device.

Both score the same tokens (the embedded corpus's held-out text, --max-tokens of it, with the
BOS/EOS prefix), and the bench checks that their total NLLs agree. The figure is the marjax
path's tokens/s over the plain loop's, from the median of --repeats interleaved rounds; the
first call of each (compiles included) is reported apart.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import marjax
from marjax.api import Model, load
from marjax.app.benchkit import header_line, interleaved, machine_info, write_json
from marjax.errors import ConfigError
from marjax.eval.perplexity import rolling_windows, token_nll
from marjax.eval.scoring import encode_text, prefix_token
from marjax.models.lm import forward
from marjax.train.data import heldout_text

__all__ = ["main", "plain_nll", "eval_bench"]


def _window_nll(params, ids, n_new, cfg):
    """Summed NLL of the last n_new tokens of ids (1, l + 1), each given all tokens before it in
    the window (the plain loop's body)."""
    lg, _ = forward(params, ids[:, :-1], cfg)
    lp = jnp.take_along_axis(jax.nn.log_softmax(lg, -1), ids[:, 1:, None], -1)[0, :, 0]
    scored = jnp.arange(lp.shape[0]) >= lp.shape[0] - n_new
    return -jnp.sum(jnp.where(scored, lp, 0.0))


_window_nll_jit = jax.jit(_window_nll, static_argnames="cfg")


def plain_nll(m: Model, seq: np.ndarray, window: int) -> tuple:
    """(total NLL, scored tokens) of seq[1:], one forward per window of rolling_windows(len(seq),
    window) (disjoint scored ranges; the last window keeps a full context and scores its tail)."""
    total, n = jnp.float32(0.0), 0
    for start, end, n_new in rolling_windows(len(seq), window):
        ids = jnp.asarray(seq[None, start:end + 1], jnp.int32)
        total = total + _window_nll_jit(m.params, ids, n_new, cfg=m.config)
        n += n_new
    return total, n


def eval_bench(m: Model, text: str, window: int, max_tokens: int, batch_size: int, repeats: int) -> dict:
    ids = encode_text(m.tokenizer, text)[:max_tokens]
    seq = np.asarray([prefix_token(m.tokenizer)] + ids, np.int64)

    def marjax_path():
        logits_fn = lambda x: np.asarray(marjax.logits(m, x))  # noqa: E731
        return token_nll(logits_fn, seq, window, batch_size=batch_size)[0]

    def plain_path():
        return plain_nll(m, seq, window)[0]

    first = {}
    for name, fn in (("marjax", marjax_path), ("plain", plain_path)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t0
    t = interleaved({"marjax": marjax_path, "plain": plain_path}, repeats, warmup=0)
    nll_m, nll_p = float(marjax_path()), float(plain_path())
    n = len(seq) - 1
    rec = {"tokens": n, "window": window, "batch_size": batch_size, "repeats": repeats, "times": t,
           "first_call_s": first, "nll_marjax": nll_m, "nll_plain": nll_p,
           "same_nll": bool(abs(nll_m - nll_p) <= 1e-4 * max(1.0, abs(nll_p))),
           "marjax_tok_s": n / t["marjax"]["median_s"], "plain_tok_s": n / t["plain"]["median_s"]}
    for how in ("median_s", "min_s", "cpu_s"):
        rec[f"speedup_{how[:-2]}"] = t["plain"][how] / t["marjax"][how]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax bench eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--window", type=int, default=128, help="tokens per window (the pipeline's eval_window)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="held-out tokens scored")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward on the marjax path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if min(a.window, a.max_tokens, a.batch_size, a.repeats) < 1:
        raise ConfigError("--window, --max-tokens, --batch-size and --repeats must be >= 1")
    info = machine_info()
    print(header_line(info))
    m = load(a.model)
    text = heldout_text(None, tokenizer=m.tokenizer)
    r = eval_bench(m, text, a.window, a.max_tokens, a.batch_size, a.repeats)
    print(f"# perplexity scoring, model {a.model}: {r['tokens']} held-out tokens, window {a.window}, "
          f"median (min) of {a.repeats} interleaved rounds; first calls (compiles included) apart")
    print("| marjax eval tok/s / plain loop tok/s | same, CPU time | same NLL | first call s (marjax, plain) |")
    print("|---|---|---|---|")
    print(f"| {r['speedup_median']:.2f} ({r['speedup_min']:.2f}) | {r['speedup_cpu']:.2f} | {r['same_nll']} | "
          f"{r['first_call_s']['marjax']:.1f}, {r['first_call_s']['plain']:.1f} |")
    write_json(a.json, dict(info, bench="eval", model=a.model, **r))
    return 0
