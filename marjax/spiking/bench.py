"""`marjax bench spiking`: the cost of an ATMN site at the layer level, measured side by side in
one run. For x (tokens, D) and W (D, F), jitted:

  dense        x @ W
  decoded      atmn(x) @ W                 (what training and the model run: one matmul)
  spike passes sum_t c_t V s_t @ W         (the projection consumes the T spike maps, T matmuls;
                                            what a dense accelerator would pay for the AC form)

for T = 1, 2, 4, 8, forward and forward+backward (grad wrt x, W and a). Ratios are to dense;
absolute times are printed only on GPU/TPU, with the device named.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from marjax.config import ATMNConfig
from marjax.errors import ConfigError
from marjax.spiking import ATMNParams, atmn, atmn_spikes, readout_coeffs

__all__ = ["main", "layer_bench"]


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def _fns(cfg: ATMNConfig):
    def dense(x, w, a):
        return x @ w

    def decoded(x, w, a):
        return atmn(x, ATMNParams(a), cfg) @ w

    def passes(x, w, a):
        V = jnp.exp(a)
        s = (atmn_spikes(x, V, cfg.T, cfg.tau, cfg.ternary) * V).astype(x.dtype)   # V s_t, per channel
        c = jnp.asarray(readout_coeffs(cfg), jnp.float32)
        per_step = jnp.einsum("tnd,df->tnf", s, w, preferred_element_type=jnp.float32)
        return jnp.einsum("t,tnf->nf", c, per_step).astype(x.dtype)

    return {"dense": dense, "decoded": decoded, "spike_passes": passes}


def _interleaved_min(fns: dict, args, repeats: int) -> dict:
    """Min wall seconds of each fn over `repeats` rounds, the fns run in turn each round, so load
    from other processes hits all of them alike (min: the least disturbed run)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))               # compile + warm up
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def layer_bench(tokens: int, d: int, f: int, Ts, dtype=jnp.float32, repeats: int = 10, backward: bool = True) -> list:
    key = jax.random.key(0)
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (tokens, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, f), jnp.float32) * d ** -0.5).astype(dtype)
    rows = []
    for T in Ts:
        cfg = ATMNConfig(T=T, tau=1.0, readout="ones")
        a = jnp.full((d,), float(np.log(3.0 / T)), jnp.float32)    # V so that |x| < T*V mostly: firing ~ typical
        fns = {}
        for name, fn in _fns(cfg).items():
            fns[f"{name}_fwd_s"] = jax.jit(fn)
            if backward and name != "spike_passes":
                loss = lambda x, w, a, fn=fn: jnp.sum(fn(x, w, a).astype(jnp.float32) ** 2)  # noqa: E731
                fns[f"{name}_fwdbwd_s"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2) if name != "dense" else (0, 1)))
        row = {"T": T, **_interleaved_min(fns, (x, w, a), repeats)}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax bench spiking", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=576, help="projection input width (default: SmolLM2-135M d_model)")
    ap.add_argument("--f", type=int, default=1536, help="projection output width (default: SmolLM2-135M d_ff)")
    ap.add_argument("--T", default="1,2,4,8", help="comma-separated micro-step counts")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--json", default="", help="write the rows to this JSON file")
    a = ap.parse_args(argv)
    try:
        Ts = [int(t) for t in a.T.split(",") if t]
    except ValueError:
        raise ConfigError(f"--T must be comma-separated integers, got {a.T!r}") from None
    if not Ts or min(Ts) < 1 or min(a.tokens, a.d, a.f, a.repeats) < 1:
        raise ConfigError(f"--T values, --tokens, --d, --f and --repeats must be >= 1; got T={Ts}, tokens={a.tokens}, "
                          f"d={a.d}, f={a.f}, repeats={a.repeats}")
    dev = device_name()
    show_abs = jax.devices()[0].platform != "cpu"
    rows = layer_bench(a.tokens, a.d, a.f, Ts, jnp.dtype(a.dtype), a.repeats, not a.no_backward)
    print(f"# ATMN site overhead on {dev}: x ({a.tokens} x {a.d}) -> W ({a.d} x {a.f}), {a.dtype}, "
          f"ratios to the dense matmul measured in one run")
    head = "| T | decoded fwd / dense | spike passes fwd / dense |"
    sep = "|---|---|---|"
    if not a.no_backward:
        head += " decoded fwd+bwd / dense fwd+bwd |"
        sep += "---|"
    if show_abs:
        head += " dense fwd (ms) |"
        sep += "---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['T']} | {r['decoded_fwd_s'] / r['dense_fwd_s']:.2f} | "
                f"{r['spike_passes_fwd_s'] / r['dense_fwd_s']:.2f} |")
        if not a.no_backward:
            line += f" {r['decoded_fwdbwd_s'] / r['dense_fwdbwd_s']:.2f} |"
        if show_abs:
            line += f" {r['dense_fwd_s'] * 1e3:.3f} |"
        print(line)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": dev, "tokens": a.tokens, "d": a.d, "f": a.f, "dtype": a.dtype, "rows": rows}, fh,
                      indent=1)
    return 0
