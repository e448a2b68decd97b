"""`marjax bench ssd|decode|spiking` (floor 5, the application): the dispatcher and the decode
benchmark, which loads whole models. Each op's own bench lives in its room: `marjax.ssm.bench`
(ssd), `marjax.spiking.bench` (spiking). Ratios are measured side by side in one run (absolute
times only on GPU, with the device named)."""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from marjax.api import Model, load
from marjax.distill.init import init_from_attention
from marjax.models import lm

__all__ = ["main", "decode_main", "timeit", "device_name"]


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def timeit(fn, *args, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn(*args) with results blocked on; warmup calls (compile) excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _decode_kv_vs_full(m, prompt_len: int, n_new: int) -> dict:
    """Greedy decode of n_new tokens: with the model's cache vs re-running the full forward per
    token over a fixed-size buffer (so neither side recompiles per token)."""
    cfg, params = m.config, m.params
    total = prompt_len + n_new
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    fwd_cached = jax.jit(lm.forward_cached, static_argnames="cfg")
    fwd = jax.jit(lm.forward, static_argnames=("cfg",))

    def run_cached():
        cache = lm.init_cache(cfg, 1, total)
        lg, cache = fwd_cached(params, prompt, cache, cfg=cfg)
        toks = []
        for _ in range(n_new):
            t = jnp.argmax(lg[:, -1], -1)[:, None].astype(jnp.int32)
            toks.append(t)
            lg, cache = fwd_cached(params, t, cache, cfg=cfg)
        return jnp.concatenate(toks, 1)

    def run_full():
        buf = jnp.zeros((1, total), jnp.int32).at[:, :prompt_len].set(prompt)
        toks = []
        for i in range(n_new):
            lg, _ = fwd(params, buf, cfg=cfg)   # causal: the tail padding does not affect position i
            t = jnp.argmax(lg[:, prompt_len + i - 1], -1).astype(jnp.int32)
            buf = buf.at[:, prompt_len + i].set(t)
            toks.append(t[:, None])
        return jnp.concatenate(toks, 1)

    # compile both paths first (prefill, one decode step, one full forward), then time one run each
    cache = lm.init_cache(cfg, 1, total)
    lg, cache = fwd_cached(params, prompt, cache, cfg=cfg)
    jax.block_until_ready(fwd_cached(params, prompt[:, :1], cache, cfg=cfg))
    jax.block_until_ready(fwd(params, jnp.zeros((1, total), jnp.int32), cfg=cfg))

    def timed(fn):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        return time.perf_counter() - t0, out

    t_c, toks_c = timed(run_cached)
    t_f, toks_f = timed(run_full)
    same = bool(jnp.all(toks_c == toks_f))
    return {"new_tokens": n_new, "cached_tok_s": n_new / t_c, "full_tok_s": n_new / t_f,
            "speedup": t_f / t_c, "same_tokens": same}


def _ssm_decode_curve(m, contexts) -> list:
    """Per-step decode time and cache bytes after `ctx` tokens: flat for the SSM, linear for KV."""
    cfg, params = m.config, m.params
    step = jax.jit(lm.forward_cached, static_argnames="cfg")
    tok = jnp.zeros((1, 1), jnp.int32)
    rows = []
    for ctx in contexts:
        cache = lm.init_cache(cfg, 1, ctx + 1)
        cache = dict(cache, pos=jnp.asarray(ctx, jnp.int32))   # timing does not depend on contents
        t = timeit(lambda c: step(params, tok, c, cfg=cfg)[0], cache, repeats=5)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"]))
        rows.append({"context": ctx, "step_s": t, "cache_bytes": int(nbytes)})
    return rows


def decode_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax bench decode",
                                 description="KV-cache decode vs full forward per token; SSM vs KV decode curve")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", default="64,512")
    ap.add_argument("--curve", default="", help="contexts for the SSM-vs-KV step curve, e.g. 128,1024,8192")
    ap.add_argument("--ssm-model", default="", help="SSM model for the curve (default: the converted --model)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    m = load(a.model)
    out = {"device": device_name(), "model": a.model, "decode": []}
    print(f"# decode benchmark on {out['device']}, model {a.model} (ratios measured in one run)")
    print("| new tokens | KV-cache tok/s over full-forward tok/s | same tokens |")
    print("|---|---|---|")
    for n in [int(x) for x in a.new_tokens.split(",") if x]:
        r = _decode_kv_vs_full(m, a.prompt_len, n)
        out["decode"].append(r)
        print(f"| {n} | {r['speedup']:.1f}x | {r['same_tokens']} |")
    if a.curve:
        ctxs = [int(x) for x in a.curve.split(",")]
        if a.ssm_model:
            sm = load(a.ssm_model)
        else:
            student_cfg, sp = init_from_attention(m.params, m.config)
            sm = Model(student_cfg, sp, m.tokenizer, "converted")
        kv, ss = _ssm_decode_curve(m, ctxs), _ssm_decode_curve(sm, ctxs)
        base_kv, base_ss = kv[0]["step_s"], ss[0]["step_s"]
        print("\n| context | KV step / KV step@first | SSM step / SSM step@first | SSM step / KV step | KV cache MiB | SSM state MiB |")
        print("|---|---|---|---|---|---|")
        for k, s in zip(kv, ss):
            print(f"| {k['context']} | {k['step_s'] / base_kv:.2f} | {s['step_s'] / base_ss:.2f} | "
                  f"{s['step_s'] / k['step_s']:.2f} | {k['cache_bytes'] / 2**20:.1f} | {s['cache_bytes'] / 2**20:.2f} |")
        out["curve"] = {"kv": kv, "ssm": ss}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def main(argv=None) -> int:
    argv = list(argv or [])
    subs = {"ssd": ("marjax.ssm.bench", "main"), "decode": ("marjax.bench", "decode_main"),
            "spiking": ("marjax.spiking.bench", "main")}
    if not argv or argv[0] not in subs:
        print("usage: marjax bench {ssd|decode|spiking} [--help]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mod, fn = subs[argv[0]]
    return int(getattr(importlib.import_module(mod), fn)(argv[1:]) or 0)
