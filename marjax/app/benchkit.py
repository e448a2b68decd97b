"""What every `marjax bench` shares: the device's name, the measured float32 matmul peak, and
interleaved timing with compile time kept apart from the steady state.

    peak = matmul_peak_gflops()                    # GFLOP/s of a jitted (1024 x 1024) @ (1024 x 1024)
    t = interleaved({"a": fa, "b": fb}, repeats=3) # {"a": {"median_s", "min_s", "cpu_s", "rounds_s"}, ...}

Every bench reports ratios against a baseline measured in the same process; the peak puts the
absolute rates of a run in proportion to what this machine's matmul reaches right now (on a CPU
shared with other jobs it moves with their load, like everything else).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

__all__ = ["device_name", "matmul_gflops", "matmul_peak_gflops", "PeakProbe", "machine_info", "header_line", "interleaved", "compile_timed", "write_json",
           "format_ratio"]

PEAK_N = 1024


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def matmul_gflops(m: int, k: int, n: int, dtype=jnp.float32, result=None, repeats: int = 10,
                  min_s: float = 0.0) -> float:
    """GFLOP/s (2 m k n per product) of a jitted (m x k) @ (k x n) in `dtype` (result dtype
    `result`, None: dtype's), from the fastest of at least `repeats` calls (and `min_s` seconds)
    after a compile call."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (k, n), jnp.float32).astype(dtype)
    dot = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=result))
    jax.block_until_ready(dot(a, b))
    return 2 * m * k * n / _fastest_s(lambda: dot(a, b), repeats, min_s) / 1e9


def _fastest_s(call: Callable, repeats: int, min_s: float = 0.0) -> float:
    """Seconds of the fastest call of `call` (its result blocked on): at least `repeats` calls,
    and more until `min_s` seconds have passed."""
    best, start = float("inf"), time.perf_counter()
    n = 0
    while n < repeats or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


# How long a peak measurement keeps multiplying. On the 2-core dev VM the first products after a
# long program, or after idling, often run at half the rate (about one core's worth: 180-220
# against 420-460 GFLOP/s, measured product by product after a kd step) for 15-40 products
# (0.2-0.4 s) before the full rate returns; a best-of-10 could end inside that window and halve
# the peak (with it, bench step's per-round peaks read 221-407 GFLOP/s where the peak around the
# rounds read 435 and 462, 2026-12-02). A second of products gets past it.
PEAK_MIN_S = 1.0


class PeakProbe:
    """A no-argument callable for `interleaved`: each call times jitted float32 (PEAK_N x PEAK_N)
    products back to back (at least `repeats`, and for at least `min_s` seconds) and appends the
    fastest one's GFLOP/s to `.gflops`, so every round of an interleaved benchmark gets a peak
    measured seconds from its programs."""

    def __init__(self, n: int = PEAK_N, repeats: int = 10, min_s: float = PEAK_MIN_S):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        self._a, self._n, self._repeats, self._min_s = a, n, repeats, min_s
        self._dot = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready(self._dot(a, a))
        self.gflops: list = []

    def __call__(self):
        best = _fastest_s(lambda: self._dot(self._a, self._a), self._repeats, self._min_s)
        self.gflops.append(2 * self._n ** 3 / best / 1e9)
        return None


def matmul_peak_gflops(n: int = PEAK_N, repeats: int = 10, min_s: float = PEAK_MIN_S) -> float:
    """GFLOP/s of a jitted float32 (n x n) @ (n x n), the fastest of at least `repeats` calls over
    at least `min_s` seconds: the best this machine's matmul reaches now."""
    return matmul_gflops(n, n, n, repeats=repeats, min_s=min_s)


def machine_info(peak_repeats: int = 10) -> dict:
    """backend, device and the measured float32 matmul peak: the header of every bench's JSON."""
    return {"backend": jax.default_backend(), "device": device_name(),
            "matmul_peak_gflops": matmul_peak_gflops(repeats=peak_repeats), "matmul_peak_shape": [PEAK_N] * 2}


def header_line(info: dict) -> str:
    return (f"# backend {info['backend']}, device {info['device']}, float32 matmul peak "
            f"{info['matmul_peak_gflops']:.1f} GFLOP/s (jitted {PEAK_N}x{PEAK_N} jnp.dot, measured in this run)")


def compile_timed(fn: Callable, *args, **jit_kw):
    """(compiled executable, lower + compile seconds) of jax.jit(fn) on args, or of an already
    jitted fn (anything with .lower)."""
    t0 = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **jit_kw)
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: {"median_s", "min_s", "cpu_s"}} of no-argument callables (results blocked on), run
    in turn each round with the order rotating, so load bursts from other processes hit all of
    them alike; `cpu_s` is process CPU time (all threads), which waiting for a core leaves out."""
    names = list(fns)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for rnd in range(warmup + repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fns[k]())
            if rnd >= warmup:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: {"median_s": statistics.median(wall[k]), "min_s": min(wall[k]),
                "cpu_s": statistics.median(cpu[k]), "rounds_s": wall[k]} for k in names}


def write_json(path: Optional[str], record: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {path}")


def format_ratio(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
