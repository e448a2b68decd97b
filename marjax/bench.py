"""`marjax bench {ssd,atmn,step,decode,eval,all}` (floor 5, the application): the dispatcher and
the decode benchmark, which loads whole models. Each op's own bench lives in its room:
`marjax.ssm.bench` (ssd), `marjax.spiking.bench` (atmn; `spiking` is an alias); the train step
and eval benches in `marjax.app.bench_step` and `marjax.app.bench_eval`. Every figure is a ratio
against a baseline measured in the same process; compile time is kept apart from the steady
state; every bench names the backend and device and records the float32 matmul peak measured in
the same run (marjax.app.benchkit).

decode: cached greedy decoding against the full forward re-run per token over the growing
prefix (bucketed to multiples of FULL_BUCKET tokens so each bucket compiles once); the SSM-vs-KV
per-step curve; `--weights f32,bf16,int8,q4` (weight-only quantised decode, marjax.models.quant, through the native CPU
kernels where built and, rows `xla`, without);
`--llama-cpp`: llama.cpp on the same GGUF when llama-cpp-python happens to be installed."""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from marjax.api import Model, load
from marjax.app.bench_plot import plot_file
from marjax.app.benchkit import device_name, header_line, interleaved, machine_info, write_json
from marjax.distill.init import init_from_attention
from marjax.errors import ConfigError
from marjax.io.resolve import smollm2_gguf_path
from marjax.kernels import cpu_kernels
from marjax.models import lm, quant
from marjax.sampling import decode

__all__ = ["main", "decode_main", "all_main", "timeit", "device_name", "FULL_BUCKET"]


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


FULL_BUCKET = 64   # the full-forward baseline pads its growing prefix up to a multiple of this


def _bucket(n: int, bucket: int = FULL_BUCKET) -> int:
    return -(-n // bucket) * bucket


def _greedy_cached(step, params, prompt, cfg, n_new: int):
    """n_new greedy tokens (1, n_new) from `step` (forward_cached-like: (params, ids, cache) ->
    (logits, cache)) after prefilling `prompt`, with a cache sized for prompt + n_new (in the
    params' layout)."""
    cache = lm.init_cache(cfg, 1, prompt.shape[1] + n_new, unrolled=lm.is_unrolled(params))
    lg, cache = step(params, prompt, cache, cfg=cfg)
    toks = []
    for _ in range(n_new):
        t = jnp.argmax(lg[:, -1], -1)[:, None].astype(jnp.int32)
        toks.append(t)
        lg, cache = step(params, t, cache, cfg=cfg)
    return jnp.concatenate(toks, 1)


def _decode_kv_vs_full(m, prompt_len: int, n_new: int, bucket: int = FULL_BUCKET) -> dict:
    """Greedy decode of n_new tokens: with the model's cache vs re-running the full forward per
    token over the growing prefix (length prompt_len + i at step i), padded up to the next
    multiple of `bucket` so each bucket length compiles once (all compiled before timing; the
    causal mask keeps the tail padding out of position prompt_len + i - 1). The cached path runs
    marjax's decode layout (unrolled layers), the full forward the stacked one it is trained in."""
    cfg, params = m.config, m.params
    dparams = lm.unroll_layers(params)
    total = prompt_len + n_new
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    fwd_cached = jax.jit(lm.forward_cached, static_argnames="cfg")
    fwd = jax.jit(lm.forward, static_argnames=("cfg",))
    buckets = sorted({_bucket(prompt_len + i, bucket) for i in range(n_new)})
    buf_len = buckets[-1]

    def run_cached():
        return _greedy_cached(fwd_cached, dparams, prompt, cfg, n_new)

    def run_full():
        buf = jnp.zeros((1, buf_len), jnp.int32).at[:, :prompt_len].set(prompt)
        toks = []
        for i in range(n_new):
            n = prompt_len + i                       # the prefix so far
            lg, _ = fwd(params, buf[:, :_bucket(n, bucket)], cfg=cfg)
            t = jnp.argmax(lg[:, n - 1], -1).astype(jnp.int32)
            buf = buf.at[:, n].set(t)
            toks.append(t[:, None])
        return jnp.concatenate(toks, 1)

    # compile both paths first (prefill, one decode step, one full forward per bucket), then time one run each
    cache = lm.init_cache(cfg, 1, total, unrolled=True)
    lg, cache = fwd_cached(dparams, prompt, cache, cfg=cfg)
    jax.block_until_ready(fwd_cached(dparams, prompt[:, :1], cache, cfg=cfg))
    for blen in buckets:
        jax.block_until_ready(fwd(params, jnp.zeros((1, blen), jnp.int32), cfg=cfg))

    def timed(fn):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        return time.perf_counter() - t0, out

    t_c, toks_c = timed(run_cached)
    t_f, toks_f = timed(run_full)
    same = bool(jnp.all(toks_c == toks_f))
    return {"new_tokens": n_new, "prompt_len": prompt_len, "full_buckets": buckets, "cached_tok_s": n_new / t_c,
            "full_tok_s": n_new / t_f, "speedup": t_f / t_c, "same_tokens": same}


STACKED = "f32 stacked"   # the --weights row that decodes the stacked (lax.scan) layout


def _decode_weights(m, prompt_len: int, n_new: int, modes, repeats: int = 3) -> dict:
    """Cached greedy decode with the matmul weights in each of `modes` (marjax.models.quant:
    dequantised inside the jitted step) in the decode layout (unrolled layers), and float32 in
    the stacked layout under lax.scan (what decoding ran before the decode layout), interleaved;
    tokens/s of each over unrolled float32's, and whether its tokens equal float32's."""
    cfg = m.config
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    step = jax.jit(quant.forward_cached_q, static_argnames="cfg", donate_argnames="cache")
    dparams = lm.unroll_layers(m.params)
    qparams = {mode: quant.quantize_params(dparams, mode) for mode in ("f32",) + tuple(x for x in modes if x != "f32")}
    if cpu_kernels.available():   # the same weights through XLA's dequantising matmul: what the kernel replaces
        qparams.update({f"{mode} xla": quant.quantize_params(dparams, mode, impl="xla") for mode in modes
                        if mode != "f32"})
    qparams[STACKED] = m.params

    def run(q):
        return _greedy_cached(step, q, prompt, cfg, n_new)

    t = interleaved({mode: (lambda q=q: run(q)) for mode, q in qparams.items()}, repeats)
    toks = {mode: np.asarray(run(q)) for mode, q in qparams.items()}
    rows = []
    for mode in qparams:
        rows.append({"weights": mode, "weight_bytes": quant.weight_bytes(qparams[mode]),
                     "tok_s": n_new / t[mode]["median_s"],
                     "tok_s_over_f32": t["f32"]["median_s"] / t[mode]["median_s"],
                     "tok_s_over_f32_min": t["f32"]["min_s"] / t[mode]["min_s"],
                     "tok_s_over_f32_cpu": t["f32"]["cpu_s"] / t[mode]["cpu_s"],
                     "same_tokens_as_f32": bool(np.array_equal(toks[mode], toks["f32"]))})
    return {"new_tokens": n_new, "prompt_len": prompt_len, "repeats": repeats, "rows": rows}


def _llama_cpp_peer(m, gguf: str, prompt_len: int, n_new: int, threads: int = 2, repeats: int = 3) -> dict:
    """marjax's cached greedy decode (float32, int8 and q4 weights, decode layout; int8 also without
    the native CPU kernel when it is built) against llama.cpp's
    (llama-cpp-python, optional and never a dependency) on the same GGUF and prompt ids, after a
    warm-up run each, in `repeats` interleaved rounds."""
    try:
        import llama_cpp   # late import: optional peer (llama-cpp-python), absent from marjax's dependencies
    except ImportError:
        return {"skipped": "llama_cpp (llama-cpp-python) is not installed"}
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, m.config.vocab_size, prompt_len)]
    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_ctx=prompt_len + n_new + 8, verbose=False)

    def run_llama():
        llm.reset()
        out = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(tok))
            if len(out) == n_new:
                break
        return out

    dparams = lm.unroll_layers(m.params)     # decode layout and int8 weights made once, before timing
    weights = {"marjax": dparams, "marjax_int8": quant.quantize_params(dparams, "int8"),
               "marjax_q4": quant.quantize_params(dparams, "q4")}
    if cpu_kernels.available():              # int8 without the native kernel (XLA's dequantising matmul)
        weights["marjax_int8_xla"] = quant.quantize_params(dparams, "int8", impl="xla")

    def run_marjax(name):
        return decode(weights[name], m.config, prompt, n_new, stop_ids=())

    fns = {"llama_cpp": run_llama, **{name: (lambda name=name: run_marjax(name)) for name in weights}}
    toks = {name: fn() for name, fn in fns.items()}   # warm-up (marjax: compiles)
    t = interleaved(fns, repeats, warmup=0)
    llama = t["llama_cpp"]["median_s"]
    out = {"threads": threads, "new_tokens": n_new, "repeats": repeats, "llama_cpp_tok_s": n_new / llama}
    out["cpu_kernel"] = cpu_kernels.status().reason
    for name in weights:
        out[f"{name}_tok_s"] = n_new / t[name]["median_s"]
        out[f"{name}_over_llama_cpp"] = llama / t[name]["median_s"]
        out[f"{name}_over_llama_cpp_min"] = t["llama_cpp"]["min_s"] / t[name]["min_s"]
        out[f"{name}_same_tokens"] = toks[name] == toks["llama_cpp"]
    return out


def _weight_bytes_per_token(params) -> int:
    """Bytes of weights one decode step reads: every leaf, but of an untied embedding table only
    the looked-up row (a tied table is read whole, as the head)."""
    untied = getattr(params, "lm_head", None) is not None
    return quant.weight_bytes(params) - (quant.weight_bytes(params.embed) if untied else 0)


CURVE_STEPS = 16   # decode steps a timed round of the --curve runs back to back


def _curve_steps(m, attn_impl: str, weights: str):
    """(step(cache, ctx) -> cache, weight bytes, cfg) for `m` in the decode layout (unrolled
    layers) with the cache donated, as `marjax.sampling.decode` runs."""
    cfg, params = m.config, quant.quantize_params(lm.unroll_layers(m.params), weights)
    step = jax.jit(functools.partial(lm.forward_cached, attn_impl=attn_impl), static_argnames="cfg",
                   donate_argnums=2)   # in place: without it every step copies the whole KV cache
    tok = jnp.zeros((1, 1), jnp.int32)

    def run(cache, ctx: int):
        # pos reset to ctx every call (donated too); timing does not depend on the contents
        return step(params, tok, dict(cache, pos=jnp.asarray(ctx, jnp.int32)), cfg=cfg)
    return run, _weight_bytes_per_token(params), cfg


def _decode_curve(models: dict, contexts, weights: str = "f32", repeats: int = 7,
                  steps: int = CURVE_STEPS) -> dict:
    """{name: rows} of per-step decode time, cache bytes and bytes streamed (weights + cache)
    after `ctx` tokens, for `models` {name: (Model, attn_impl)} (marjax.nn.layers.ATTN_IMPLS):
    flat for an SSM, linear for KV. At each context the models take turns (benchkit.interleaved),
    a round being `steps` steps dispatched back to back and then waited on, as greedy `decode`
    keeps a step in flight: a step's time is its round's over `steps`, so the host's dispatch
    overlaps the device's work there as in decoding. `weights`: the matmul weights (quant.MODES)."""
    runs = {name: _curve_steps(m, impl, weights) for name, (m, impl) in models.items()}
    rows = {name: [] for name in models}
    for ctx in contexts:
        caches, nbytes = {}, {}
        for name, (_, _, cfg) in runs.items():
            caches[name] = lm.init_cache(cfg, 1, ctx + 1, unrolled=True)
            nbytes[name] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches[name]["layers"]))

        def rounds(name):
            def go():
                run, lg = runs[name][0], None
                for _ in range(steps):
                    lg, caches[name] = run(caches[name], ctx)
                return lg
            return go
        t = interleaved({name: rounds(name) for name in runs}, repeats)   # the warm-up round compiles
        for name, (_, wb, _) in runs.items():
            rows[name].append({"context": ctx, "step_s": t[name]["median_s"] / steps, "cache_bytes": int(nbytes[name]),
                               "weight_bytes": wb, "bytes_per_step": wb + int(nbytes[name]),
                               "rounds_step_s": [x / steps for x in t[name]["rounds_s"]]})
        del caches
    return rows


def decode_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax bench decode",
                                 description="KV-cache decode vs full forward per token; SSM vs KV decode curve; "
                                             "bf16/int8 weights; optional llama.cpp peer")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", default="64,512")
    ap.add_argument("--curve", default="", help="contexts for the SSM-vs-KV step curve, e.g. 128,1024,8192")
    ap.add_argument("--curve-weights", default="f32", choices=quant.MODES,
                    help="matmul weights of both models in the --curve (the caches stay float32)")
    ap.add_argument("--ssm-model", default="", help="SSM model for the curve (default: the converted --model)")
    ap.add_argument("--weights", default="f32",
                    help=f"comma-separated subset of {quant.MODES}: cached decode tokens/s of each over f32, "
                         "measured in the same run (f32 is always timed as the baseline)")
    ap.add_argument("--weights-tokens", type=int, default=64, help="new tokens per --weights run")
    ap.add_argument("--weights-ssm", action="store_true",
                    help="also run --weights on the SSM student (the converted --model)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the --weights comparison")
    ap.add_argument("--no-llama-cpp", action="store_true",
                    help="skip the llama.cpp peer (run by default when --model is a GGUF and llama-cpp-python "
                         "is installed; n_threads=2)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    modes = [x for x in a.weights.split(",") if x]
    bad = [x for x in modes if x not in quant.MODES]
    if bad:
        raise ConfigError(f"--weights: unknown {bad}; choose from {quant.MODES}")
    info = machine_info()
    print(header_line(info))
    m = load(a.model)
    out = dict(info, bench="decode", model=a.model, decode=[])
    print(f"# decode benchmark, model {a.model} (ratios measured in one run); the full-forward baseline runs "
          f"over the growing prefix padded to a multiple of {FULL_BUCKET} tokens (one compile per bucket, "
          "before timing)")
    print("| new tokens | KV-cache tok/s over full-forward tok/s | same tokens |")
    print("|---|---|---|")
    for n in [int(x) for x in a.new_tokens.split(",") if x]:
        r = _decode_kv_vs_full(m, a.prompt_len, n)
        out["decode"].append(r)
        print(f"| {n} | {r['speedup']:.1f}x | {r['same_tokens']} |")
    sm = None
    if a.curve or a.weights_ssm:
        if a.ssm_model:
            sm = load(a.ssm_model)
        else:
            student_cfg, sp = init_from_attention(m.params, m.config)
            sm = Model(student_cfg, sp, m.tokenizer, "converted")
    if a.curve:
        ctxs = [int(x) for x in a.curve.split(",")]
        wq = a.curve_weights
        # the KV teacher once more with XLA's einsum attention (the step before the native kernel)
        models = {"kv": (m, "auto"), "ssm": (sm, "auto")}
        if cpu_kernels.available():
            models["kx"] = (m, "xla")
        curve = _decode_curve(models, ctxs, weights=wq)
        kv, ss = curve["kv"], curve["ssm"]
        kx = curve.get("kx", kv)
        base_kv, base_ss = kv[0]["step_s"], ss[0]["step_s"]
        print(f"\n# one decode step after `context` tokens, {wq} weights: median of 7 interleaved rounds of "
              f"{CURVE_STEPS} steps dispatched back to back (as greedy decode runs); KV attention: "
              f"{'native CPU kernel' if cpu_kernels.available() else 'XLA einsums (no CPU kernel)'}")
        # a decode step streams its weights and its cache/state once: were both steps bound by
        # memory bandwidth alone, SSM step / KV step would be their bytes' ratio
        print(f"# weights read per step: KV {kv[0]['weight_bytes'] / 2**20:.0f} MiB, SSM "
              f"{ss[0]['weight_bytes'] / 2**20:.0f} MiB")
        print("| context | KV step / KV step@first | SSM step / SSM step@first | SSM step / KV step | "
              "SSM bytes / KV bytes per step | SSM step / KV step with XLA attention | KV cache MiB | "
              "SSM state MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for k, s, x in zip(kv, ss, kx):
            print(f"| {k['context']} | {k['step_s'] / base_kv:.2f} | {s['step_s'] / base_ss:.2f} | "
                  f"{s['step_s'] / k['step_s']:.2f} | {s['bytes_per_step'] / k['bytes_per_step']:.2f} | "
                  f"{s['step_s'] / x['step_s']:.2f} | "
                  f"{k['cache_bytes'] / 2**20:.1f} | {s['cache_bytes'] / 2**20:.2f} |")
        out["curve"] = {"weights": wq, "kv": kv, "ssm": ss, "kv_xla_attention": kx}
    if modes != ["f32"]:
        out["weights"] = {}
        print(f"\n# cpu kernel: {cpu_kernels.status().reason}")
        print(f"# cached greedy decode, {a.weights_tokens} new tokens; bf16/int8/q4 products run the native CPU kernel "
              "where it is built, rows marked xla XLA's dequantising matmul; "
              f"median (min) of {a.repeats} interleaved rounds")
        print("| model | weights | tok/s over f32 | same, CPU time | weight MiB | same tokens as f32 |")
        print("|---|---|---|---|---|---|")
        for label, model in (("attention", m),) + ((("ssm", sm),) if a.weights_ssm else ()):
            w = _decode_weights(model, a.prompt_len, a.weights_tokens, modes, a.repeats)
            out["weights"][label] = w
            for r in w["rows"]:
                print(f"| {label} | {r['weights']} | {r['tok_s_over_f32']:.2f} ({r['tok_s_over_f32_min']:.2f}) | "
                      f"{r['tok_s_over_f32_cpu']:.2f} | {r['weight_bytes'] / 2**20:.1f} | {r['same_tokens_as_f32']} |")
    if not a.no_llama_cpp:
        own_gguf = str(m.source).endswith(".gguf")
        if not own_gguf and a.model not in ("smollm2-135m-instruct", "smollm2"):
            print(f"\n# llama.cpp peer skipped: --model {a.model} is not a GGUF (llama.cpp reads GGUF files)")
        else:
            peer = _llama_cpp_peer(m, m.source if own_gguf else smollm2_gguf_path(), a.prompt_len, a.weights_tokens,
                                   repeats=a.repeats)
            out["llama_cpp"] = peer
            if "skipped" in peer:
                print(f"\n# llama.cpp peer skipped: {peer['skipped']}")
            else:
                print(f"\n# {a.weights_tokens} new tokens, median (min) of {a.repeats} interleaved rounds")
                print("| marjax weights | marjax tok/s / llama.cpp tok/s (n_threads=2, same GGUF, greedy) | "
                      "same tokens |")
                print("|---|---|---|")
                kernel = " (cpu kernel)" if cpu_kernels.available() else ""
                labels = {"marjax": "f32", "marjax_int8": "int8" + kernel, "marjax_int8_xla": "int8 (xla)",
                          "marjax_q4": "q4" + kernel}
                for name, w in labels.items():
                    if f"{name}_over_llama_cpp" not in peer:
                        continue
                    print(f"| {w} | {peer[f'{name}_over_llama_cpp']:.2f} ({peer[f'{name}_over_llama_cpp_min']:.2f}) | "
                          f"{peer[f'{name}_same_tokens']} |")
    write_json(a.json, out)
    return 0


# the small defaults of `marjax bench all`: each bench in about a minute on a 2-core CPU
ALL_DEFAULTS = {
    "ssd": ["--lengths", "512", "--impls", "auto,reference", "--repeats", "3"],
    "atmn": ["--tokens", "512", "--T", "1,2,4", "--repeats", "5"],
    "step": ["--model", "tiny", "--repeats", "3"],
    "decode": ["--model", "tiny", "--new-tokens", "64", "--weights", "f32,bf16,int8,q4", "--weights-ssm"],
    "eval": ["--model", "tiny", "--max-tokens", "1024"],
}
SUBS = {"ssd": ("marjax.ssm.bench", "main"), "atmn": ("marjax.spiking.bench", "main"),
        "spiking": ("marjax.spiking.bench", "main"), "step": ("marjax.app.bench_step", "main"),
        "decode": ("marjax.bench", "decode_main"), "eval": ("marjax.app.bench_eval", "main"),
        "plot": ("marjax.app.bench_plot", "main")}
OWN_HEADER = ("step", "decode", "eval", "plot")   # these print and record the machine header themselves (plot: none)


def _json_arg(argv) -> str:
    for i, x in enumerate(argv):
        if x == "--json" and i + 1 < len(argv):
            return argv[i + 1]
        if x.startswith("--json="):
            return x.split("=", 1)[1]
    return ""


def _run_sub(name: str, argv) -> int:
    """One bench; the op rooms' benches (ssd, atmn: floor 1, below marjax.app) get the machine
    header printed here and added to their JSON."""
    info = None
    if name not in OWN_HEADER and not any(x in ("-h", "--help") for x in argv):
        info = machine_info()
        print(header_line(info))
    mod, fn = SUBS[name]
    rc = int(getattr(importlib.import_module(mod), fn)(list(argv)) or 0)
    path = _json_arg(argv)
    if info is not None and path and rc == 0:
        with open(path) as f:
            rec = json.load(f)
        with open(path, "w") as f:
            json.dump(dict(rec, **info, bench=name), f, indent=1)
    return rc


def all_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax bench all",
                                 description="every bench with small defaults: " + "; ".join(
                                     f"{k} {' '.join(v)}" for k, v in ALL_DEFAULTS.items()))
    ap.add_argument("--json-dir", default="", help="write <bench>.json for each bench into this folder")
    ap.add_argument("--only", default=",".join(ALL_DEFAULTS), help="comma-separated subset")
    ap.add_argument("--plot", action="store_true", help="also draw <bench>.png beside each JSON (marjax bench plot)")
    a = ap.parse_args(argv)
    if a.plot and not a.json_dir:
        raise ConfigError("bench all --plot draws the JSONs: give --json-dir too")
    rc = 0
    for name in [x for x in a.only.split(",") if x]:
        if name not in ALL_DEFAULTS:
            raise ConfigError(f"--only: unknown bench {name!r}; choose from {sorted(ALL_DEFAULTS)}")
        args = list(ALL_DEFAULTS[name])
        if a.json_dir:
            os.makedirs(a.json_dir, exist_ok=True)
            args += ["--json", os.path.join(a.json_dir, f"{name}.json")]
        print(f"\n## marjax bench {name} {' '.join(args)}")
        sys.stdout.flush()
        sub_rc = _run_sub(name, args)
        if a.plot and sub_rc == 0:
            print(f"plot: {plot_file(os.path.join(a.json_dir, f'{name}.json'))}")
        rc = rc or sub_rc
    return rc


def main(argv=None) -> int:
    argv = list(argv or [])
    names = sorted(set(SUBS) | {"all"})
    if not argv or argv[0] not in names:
        print("usage: marjax bench {ssd|atmn|step|decode|eval|all|plot} [--help]   (spiking = atmn; plot: PNGs from the JSONs)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "all":
        return all_main(argv[1:])
    return _run_sub(argv[0], argv[1:])
