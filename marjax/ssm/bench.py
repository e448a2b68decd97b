"""`marjax bench ssd`: each SSD impl against the two formulations a user would write instead.

Baselines, measured in the same process:
  scan     a plain sequential lax.scan over tokens (state (p, n) per head, y_t = h_t C_t);
  minimal  the chunked-einsum SSD in its usual public form (Mamba-2's "minimal discrete" SSD:
           exp(segsum) decay matrices, four einsums, and the chunk states combined by one einsum
           with the (chunks+1)^2 decay matrix), written here from the math, block length 64.
Every time is a speedup over the faster baseline (baseline time / impl time; > 1 is faster):
from wall-clock medians (and minima, less sensitive to load bursts) over --repeats rounds in
which every function runs once, in a rotating order, and from the process CPU time of each call
(all threads), which the load of other processes on a shared CPU moves least. Compile time
(lower + compile, seconds) is reported apart from the steady state. Memory is XLA's compiled estimate (temp + output bytes). fwd+bwd is the
gradient of sum(y) for x, log_a, B and C.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from marjax.errors import MarjaxError
from marjax.kernels import cpu_kernels
from marjax.ssm import associative as assoc_mod
from marjax.ssm.api import AUTO_TABLE, DEFAULT_CHUNK, IMPLS, auto_choice, effective_chunk, ssd

__all__ = ["main", "scan_baseline", "minimal_baseline", "bench_length"]

BASELINES = ("scan", "minimal")
MINIMAL_BLOCK = 64


def scan_baseline(x, log_a, B, C):
    """The sequential form: one lax.scan step per token."""
    b, _, h, p = x.shape

    def step(state, inp):
        x_t, a_t, B_t, C_t = inp
        state = jnp.exp(a_t)[..., None, None] * state + x_t[..., :, None] * B_t[..., None, :]
        return state, jnp.einsum("bhpn,bhn->bhp", state, C_t)

    time_major = lambda t: jnp.moveaxis(t, 1, 0)  # noqa: E731
    _, ys = lax.scan(step, jnp.zeros((b, h, p, B.shape[-1]), x.dtype),
                     (time_major(x), time_major(log_a), time_major(B), time_major(C)))
    return jnp.moveaxis(ys, 0, 1)


def _auto_native_from() -> Optional[int]:
    """The length above which impl="auto" runs "native" on the CPU (AUTO_TABLE), None if never."""
    below = 0
    for max_len, impl, _ in AUTO_TABLE["cpu"]:
        if impl == "native":
            return below
        if max_len is None:
            return None
        below = max_len
    return None


def _segsum(a):
    """out[..., i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal."""
    t = a.shape[-1]
    cs = jnp.cumsum(a, axis=-1)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), cs[..., :, None] - cs[..., None, :], -jnp.inf)


def minimal_baseline(x, log_a, B, C, block: int = MINIMAL_BLOCK):
    """The public chunked-einsum form; the length must be a multiple of `block`."""
    b, l, h, p = x.shape
    c = l // block
    X = x.reshape(b, c, block, h, p)
    Bc, Cc = B.reshape(b, c, block, h, -1), C.reshape(b, c, block, h, -1)
    A = jnp.moveaxis(log_a.reshape(b, c, block, h), 3, 1)              # (b, h, c, block)
    A_cs = jnp.cumsum(A, axis=-1)
    # 1. within chunks
    y_diag = jnp.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, jnp.exp(_segsum(A)), X)
    # 2. each chunk's end state
    states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", Bc, jnp.exp(A_cs[..., -1:] - A_cs), X)
    # 3. across chunks, all at once through the (c+1)^2 chunk decay matrix
    states = jnp.concatenate([jnp.zeros_like(states[:, :1]), states], axis=1)
    chunk_decay = jnp.exp(_segsum(jnp.pad(A_cs[..., -1], ((0, 0), (0, 0), (1, 0)))))
    states = jnp.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
    # 4. the state entering each chunk, read out
    y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, jnp.exp(A_cs))
    return (y_diag + y_off).reshape(b, l, h, p)


def _inputs(b, l, h, p, n, dtype):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (b, l, h, p), dtype)
    log_a = -jax.nn.softplus(jax.random.normal(k[1], (b, l, h))).astype(dtype)
    B = (jax.random.normal(k[2], (b, l, h, n)) / n ** 0.5).astype(dtype)
    C = jax.random.normal(k[3], (b, l, h, n), dtype)
    return x, log_a, B, C


def _forward_fn(name: str, l: int, chunk):
    if name == "scan":
        return scan_baseline
    if name == "minimal":
        return minimal_baseline
    kw = {"impl": name}
    if chunk is not None and name not in ("reference", "associative", "auto"):   # auto picks its own
        kw["chunk_size"] = effective_chunk(l, chunk)
    return functools.partial(ssd, **kw)


def _memory_mib(compiled):
    try:
        ma = compiled.memory_analysis()
    except Exception:       # backends without the analysis
        return None
    return None if ma is None else (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20


def _compile(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def bench_length(names, args, chunk, repeats: int) -> dict:
    """{name: {fwd_s, fwd_bwd_s, fwd_compile_s, fwd_bwd_compile_s, fwd_mib, fwd_bwd_mib}} with
    medians over `repeats` interleaved rounds after one warm-up round."""
    l = args[0].shape[1]
    fns = {}
    for name in names:
        fwd = _forward_fn(name, l, chunk)
        both = jax.grad(lambda *a, f=fwd: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
        fns[(name, "fwd")], fns[(name, "fwd_bwd")] = _compile(fwd, args), _compile(both, args)
    times = {key: [] for key in fns}
    cpu_times = {key: [] for key in fns}
    # forward calls first, then forward+backward ones (a 2 GB token-scan backward freed just
    # before a forward call slows that call); the order rotates each round, so no function
    # always follows the same one
    for tag in ("fwd", "fwd_bwd"):
        keys = [key for key in fns if key[1] == tag]
        for rnd in range(repeats + 1):             # round 0 is the warm-up
            for key in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
                c0, t0 = time.process_time(), time.perf_counter()
                jax.block_until_ready(fns[key][0](*args))
                if rnd:
                    times[key].append(time.perf_counter() - t0)
                    cpu_times[key].append(time.process_time() - c0)
    out = {}
    for name in names:
        rec = out.setdefault(name, {})
        for tag in ("fwd", "fwd_bwd"):
            compiled, compile_s = fns[(name, tag)]
            rec.update({f"{tag}_s": statistics.median(times[(name, tag)]), f"{tag}_min_s": min(times[(name, tag)]),
                        f"{tag}_cpu_s": statistics.median(cpu_times[(name, tag)]),
                        f"{tag}_compile_s": compile_s, f"{tag}_mib": _memory_mib(compiled)})
    return out


def main(argv=None) -> int:
    on_cpu = jax.default_backend() == "cpu"
    ap = argparse.ArgumentParser(prog="marjax bench ssd", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096", help="comma-separated sequence lengths")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--state", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=None,
                    help=f"chunk size for the chunked impls except auto, which picks its own per length "
                         f"(default {DEFAULT_CHUNK})")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    candidates = [i for i in IMPLS if i != "pallas"] + ["pallas"]
    ap.add_argument("--impls", default="auto,chunked,hybrid,reference",
                    help=f"comma-separated subset of {candidates}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pallas-interpret-max-len", type=int, default=1024,
                    help="on CPU the Pallas kernels run interpreted (slow): skip them above this length")
    ap.add_argument("--json", default=None, help="also write the records to this file")
    a = ap.parse_args(argv)

    impls = [s.strip() for s in a.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in candidates]
    if bad:
        raise MarjaxError(f"--impls: unknown {bad}; choose from {candidates}")
    lengths = [int(s) for s in a.lengths.split(",") if s.strip()]
    dtype = jnp.dtype(a.dtype)
    dev = jax.devices()[0]
    device = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    print(f"# ssd benchmark, backend {jax.default_backend()}, device {device}, b={a.batch} h={a.heads} "
          f"p={a.head_dim} n={a.state} {a.dtype}, median of {a.repeats} interleaved rounds")
    # built (or loaded) before any timing, so a first build is no impl's compile time
    kernels = cpu_kernels.status() if on_cpu else None
    if kernels is not None:
        print(f"# marjax CPU kernels (impl native; auto above {_auto_native_from()} tokens): "
              f"{kernels.reason if kernels.available else 'unavailable, ' + kernels.reason}")
    print("# speedup = faster baseline's time / impl time (> 1: faster), median (min in parentheses); "
          "compile s apart; MiB = XLA temp+output")
    print("| L | impl | fwd speedup | fwd+bwd speedup | fwd CPU-time speedup | fwd+bwd CPU-time speedup | "
          "fwd compile s | fwd+bwd compile s | fwd MiB | fwd+bwd MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    records = []
    for l in lengths:
        args = _inputs(a.batch, l, a.heads, a.head_dim, a.state, dtype)
        run, skipped = list(BASELINES), {}
        for name in impls:
            if name == "pallas" and on_cpu and l > a.pallas_interpret_max_len:
                skipped[name] = f"pallas runs interpreted on CPU; skipped above L={a.pallas_interpret_max_len}"
            elif name == "associative" and assoc_mod.state_bytes(a.batch, l, a.heads, a.head_dim,
                                                                 a.state) > assoc_mod.MAX_STATE_BYTES:
                skipped[name] = "per-token states exceed the associative memory guard"
            else:
                run.append(name)
        if l % MINIMAL_BLOCK:
            raise MarjaxError(f"--lengths: the minimal baseline needs multiples of {MINIMAL_BLOCK}, got {l}")
        res = bench_length(run, args, a.chunk, a.repeats)
        best = {tag: min(res[b][f"{tag}_s"] for b in BASELINES) for tag in ("fwd", "fwd_bwd")}
        best_min = {tag: min(res[b][f"{tag}_min_s"] for b in BASELINES) for tag in ("fwd", "fwd_bwd")}
        best_cpu = {tag: min(res[b][f"{tag}_cpu_s"] for b in BASELINES) for tag in ("fwd", "fwd_bwd")}
        fastest = {tag: min(BASELINES, key=lambda b: res[b][f"{tag}_s"]) for tag in ("fwd", "fwd_bwd")}
        for name in run + list(skipped):
            rec = {"impl": name, "length": l, "batch": a.batch, "heads": a.heads, "head_dim": a.head_dim,
                   "state": a.state, "dtype": a.dtype, "backend": jax.default_backend(), "device": device,
                   "repeats": a.repeats, "faster_baseline": fastest}
            if name == "auto":
                rec["auto_choice"] = dict(zip(("impl", "chunk_size"), auto_choice(jax.default_backend(), l)))
            if name in skipped:
                rec["skipped"] = skipped[name]
                print(f"| {l} | {name} | skipped: {skipped[name]} |")
            else:
                rec.update(res[name])
                rec["fwd_speedup"] = best["fwd"] / rec["fwd_s"]
                rec["fwd_bwd_speedup"] = best["fwd_bwd"] / rec["fwd_bwd_s"]
                # from the fastest call of each: less sensitive to other processes' load bursts
                rec["fwd_min_speedup"] = best_min["fwd"] / rec["fwd_min_s"]
                rec["fwd_bwd_min_speedup"] = best_min["fwd_bwd"] / rec["fwd_bwd_min_s"]
                # process CPU seconds (all threads): on a CPU shared with other jobs, waiting for a
                # core does not count, so this ratio moves least with their load
                rec["fwd_cpu_speedup"] = best_cpu["fwd"] / rec["fwd_cpu_s"]
                rec["fwd_bwd_cpu_speedup"] = best_cpu["fwd_bwd"] / rec["fwd_bwd_cpu_s"]
                mib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
                print(f"| {l} | {name} | {rec['fwd_speedup']:.2f} ({rec['fwd_min_speedup']:.2f}) | "
                      f"{rec['fwd_bwd_speedup']:.2f} ({rec['fwd_bwd_min_speedup']:.2f}) | "
                      f"{rec['fwd_cpu_speedup']:.2f} | {rec['fwd_bwd_cpu_speedup']:.2f} | "
                      f"{rec['fwd_compile_s']:.1f} | {rec['fwd_bwd_compile_s']:.1f} | {mib(rec['fwd_mib'])} | "
                      f"{mib(rec['fwd_bwd_mib'])} |")
            if not on_cpu and "fwd_s" in rec:
                print(f"|   | {name} (ms) | {rec['fwd_s'] * 1e3:.3f} | {rec['fwd_bwd_s'] * 1e3:.3f} | | | | |")
            records.append(rec)
        sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"backend": jax.default_backend(), "device": device, "records": records,
                       "cpu_kernels": None if kernels is None else {"available": kernels.available, "isa": kernels.isa,
                                                                   "reason": kernels.reason}}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
