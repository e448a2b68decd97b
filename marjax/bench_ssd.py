"""`marjax bench ssd`: forward and forward+backward time and compiled memory of each SSD impl.

Times are medians over --repeats calls of jitted functions (compile and a warm-up call excluded,
results blocked on). They are printed as ratios to the reference measured in the same run; absolute
milliseconds only on an accelerator (a shared CPU's absolute times say little). Memory is XLA's
compiled estimate (memory_analysis(): temp + output bytes), which is deterministic for a backend.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from marjax import ssm
from marjax.errors import MarjaxError
from marjax.ssm import associative as assoc_mod

__all__ = ["main", "bench_length", "compile_one"]

ALL_IMPLS = ("reference", "chunked", "chunked-assoc", "associative", "pallas", "auto")


def _impl_kwargs(name: str) -> dict:
    if name == "chunked-assoc":
        return {"impl": "chunked", "inter_chunk": "associative"}
    return {"impl": name}


def _inputs(b, l, h, p, n, dtype):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (b, l, h, p), dtype)
    log_a = -jax.nn.softplus(jax.random.normal(k[1], (b, l, h))).astype(dtype)
    B = (jax.random.normal(k[2], (b, l, h, n)) / n ** 0.5).astype(dtype)
    C = jax.random.normal(k[3], (b, l, h, n), dtype)
    return x, log_a, B, C


def _time_once(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _memory_mib(compiled) -> float | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:       # backends without the analysis
        return None
    if ma is None:
        return None
    return (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20


def compile_one(name: str, args, chunk: int) -> dict:
    """Compiled forward and forward+backward (grads of sum(y) for x, log_a, B, C) of one impl."""
    kw = _impl_kwargs(name)
    l = args[0].shape[1]
    if kw["impl"] != "reference":
        kw["chunk_size"] = ssm.effective_chunk(l, chunk)
    fwd = functools.partial(ssm.ssd, **kw)

    def loss(x, log_a, B, C):
        return jnp.sum(fwd(x, log_a, B, C).astype(jnp.float32))

    both = jax.grad(loss, argnums=(0, 1, 2, 3))
    return {tag: jax.jit(fn).lower(*args).compile() for tag, fn in (("fwd", fwd), ("fwd_bwd", both))}


def bench_length(names, args, chunk: int, repeats: int) -> dict:
    """Median seconds and compiled MiB per impl. Calls are interleaved round-robin (one call of
    each impl per round), so load from other processes hits all impls alike and the ratios
    measured in one run hold even when absolute times drift."""
    compiled = {name: compile_one(name, args, chunk) for name in names}
    times = {(name, tag): [] for name in names for tag in ("fwd", "fwd_bwd")}
    for rnd in range(repeats + 1):                 # round 0 is the warm-up
        for (name, tag), ts in times.items():
            t = _time_once(compiled[name][tag], args)
            if rnd:
                ts.append(t)
    return {name: {"fwd_s": statistics.median(times[(name, "fwd")]),
                   "fwd_bwd_s": statistics.median(times[(name, "fwd_bwd")]),
                   "fwd_min_s": min(times[(name, "fwd")]), "fwd_bwd_min_s": min(times[(name, "fwd_bwd")]),
                   "fwd_mib": _memory_mib(compiled[name]["fwd"]),
                   "fwd_bwd_mib": _memory_mib(compiled[name]["fwd_bwd"])} for name in names}


def _fmt_mib(v):
    return "-" if v is None else f"{v:.1f}"


def main(argv=None) -> int:
    on_cpu = jax.default_backend() == "cpu"
    ap = argparse.ArgumentParser(prog="marjax bench ssd", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096" if on_cpu else "1024,4096,16384",
                    help="comma-separated sequence lengths (default 1024,4096 on CPU, +16384 elsewhere)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--state", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=ssm.DEFAULT_CHUNK)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--impls", default=",".join(ALL_IMPLS), help=f"comma-separated subset of {ALL_IMPLS}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pallas-interpret-max-len", type=int, default=1024,
                    help="on CPU the Pallas kernels run interpreted (slow): skip them above this length")
    ap.add_argument("--json", default=None, help="also write the records to this file")
    a = ap.parse_args(argv)

    impls = [s.strip() for s in a.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in ALL_IMPLS]
    if bad:
        raise MarjaxError(f"--impls: unknown {bad}; choose from {ALL_IMPLS}")
    if "reference" in impls:          # ratios need the reference first
        impls.remove("reference")
    impls.insert(0, "reference")
    lengths = [int(s) for s in a.lengths.split(",") if s.strip()]
    dtype = jnp.dtype(a.dtype)
    dev = jax.devices()[0]
    precision = str(jax.config.jax_default_matmul_precision or "default")
    print(f"ssd benchmark on {dev.platform}:{getattr(dev, 'device_kind', '')}  b={a.batch} h={a.heads} "
          f"p={a.head_dim} n={a.state} chunk={a.chunk} dtype={a.dtype} matmul precision={precision} "
          f"repeats={a.repeats} (median); auto -> {ssm.resolve_impl('auto')}")
    if on_cpu:
        print("times are ratios to reference from this run (median, and min as a less load-sensitive "
              "check); absolute CPU times are not reported; memory = XLA compiled temp+output MiB")

    records, notes = [], []
    for l in lengths:
        args = _inputs(a.batch, l, a.heads, a.head_dim, a.state, dtype)
        recs = {}
        for name in impls:
            rec = {"impl": name, "length": l, "batch": a.batch, "heads": a.heads, "head_dim": a.head_dim,
                   "state": a.state, "dtype": a.dtype, "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
                   "precision": precision, "repeats": a.repeats}
            if name == "pallas" and on_cpu and l > a.pallas_interpret_max_len:
                rec["skipped"] = f"pallas runs interpreted on CPU; skipped above L={a.pallas_interpret_max_len}"
            elif name == "associative" and assoc_mod.state_bytes(a.batch, l, a.heads, a.head_dim,
                                                                 a.state) > assoc_mod.MAX_STATE_BYTES:
                rec["skipped"] = "per-token states exceed the associative memory guard"
            recs[name] = rec
        run_names = [name for name in impls if "skipped" not in recs[name]]
        for name, res in bench_length(run_names, args, a.chunk, a.repeats).items():
            recs[name].update(res)
        ref = recs["reference"]
        for name in impls:
            rec = recs[name]
            if "skipped" in rec:
                notes.append(f"{name} L={l}: {rec['skipped']}")
            else:
                rec["fwd_ratio"] = rec["fwd_s"] / ref["fwd_s"]
                rec["fwd_bwd_ratio"] = rec["fwd_bwd_s"] / ref["fwd_bwd_s"]
                rec["fwd_min_ratio"] = rec["fwd_min_s"] / ref["fwd_min_s"]
                rec["fwd_bwd_min_ratio"] = rec["fwd_bwd_min_s"] / ref["fwd_bwd_min_s"]
            records.append(rec)
            _print_row(rec, on_cpu)
        sys.stdout.flush()
    if notes:
        print("skipped: " + "; ".join(notes))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {a.json}")
    return 0


_HEADER_DONE = set()


def _print_row(rec: dict, on_cpu: bool) -> None:
    cols = ["L", "impl", "fwd x ref", "fwd+bwd x ref", "(min) fwd", "(min) fwd+bwd", "fwd MiB", "fwd+bwd MiB"]
    if not on_cpu:
        cols += ["fwd ms", "fwd+bwd ms"]
    if "hdr" not in _HEADER_DONE:
        print(" | ".join(f"{c:>13}" for c in cols))
        _HEADER_DONE.add("hdr")
    if "skipped" in rec:
        print(f"{rec['length']:>13} | {rec['impl']:>13} | skipped ({rec['skipped']})")
        return
    row = [rec["length"], rec["impl"], f"{rec['fwd_ratio']:.2f}", f"{rec['fwd_bwd_ratio']:.2f}",
           f"{rec['fwd_min_ratio']:.2f}", f"{rec['fwd_bwd_min_ratio']:.2f}",
           _fmt_mib(rec["fwd_mib"]), _fmt_mib(rec["fwd_bwd_mib"])]
    if not on_cpu:
        row += [f"{rec['fwd_s'] * 1e3:.3f}", f"{rec['fwd_bwd_s'] * 1e3:.3f}"]
    print(" | ".join(f"{c:>13}" for c in row))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
