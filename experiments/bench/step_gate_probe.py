"""How much the train step's finite gate costs, on the optimizer update alone.

    python experiments/bench/step_gate_probe.py [--repeats 6]

The SmolLM2 kd student's 158M params, gradients of 1e-3, the trainer's optimizer
(marjax.train.optim.make_optimizer, impl "fused"), params and state donated. Variants, timed
one after another in one process (ratios to "none" are what to read):

  none        update only, no gate (what an unchecked step would cost);
  select      the gate before this version: check the new params and moments, then
              jnp.where(ok, new, old) over params and moments;
  cond        loss and gradient norm only, update under lax.cond (no check of the new params);
  recompute   the gate before the bound (and marjax.train.step's without `param_bound`): loss,
              gradient norm < MAX_GRAD_NORM, the new params recomputed inside one reduction,
              update under lax.cond.
  bound       marjax.train.step's gate as the trainer builds it: loss, gradient norm, and
              optim.param_bound(sum |p|) < 2**126 (the recomputation only under a lax.cond when
              the bound cannot prove the new params finite), update under lax.cond.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from marjax.api import load
from marjax.app.pipeline import PIPELINES
from marjax.distill.init import init_from_attention
from marjax.train.optim import make_optimizer, param_bound
from marjax.train.step import MAX_GRAD_NORM, all_finite, updated_params_finite


def variant(name, tx, bound):
    def update(po, grads):
        p, o = po
        u, o = tx.update(grads, o, p)
        return optax.apply_updates(p, u), o

    def f(p, o, grads, loss):
        gn = optax.global_norm(grads)
        if name == "none":
            return update((p, o), grads)
        if name == "select":
            p2, o2 = update((p, o), grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(gn) & all_finite((p2, o2))
            keep = lambda n, old: jnp.where(ok, n, old)  # noqa: E731
            return jax.tree.map(keep, p2, p), jax.tree.map(keep, o2, o)
        ok = jnp.isfinite(loss) & (gn < MAX_GRAD_NORM)
        if name in ("recompute", "bound"):   # marjax.train.step's check, without and with the bound
            ok = ok & updated_params_finite(jax.tree.leaves(p), lambda: all_finite(update((p, o), grads)[0]),
                                            bound if name == "bound" else None)
        return jax.lax.cond(ok, lambda po: update(po, grads), lambda po: po, (p, o))
    return jax.jit(f, donate_argnums=(0, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()
    pc = PIPELINES["smollm2"]
    base = load(pc.teacher)
    _, params = init_from_attention(base.params, base.config)
    tx = make_optimizer(pc.train, params)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, x.dtype), params)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"# {n / 1e6:.0f}M params, backend {jax.default_backend()}; median (min) of {a.repeats} updates")
    print("| variant | seconds | over none |\n|---|---|---|")
    res = {}
    for name in ("none", "select", "cond", "recompute", "bound"):
        f = variant(name, tx, param_bound(pc.train))
        p, o = jax.tree.map(jnp.copy, params), tx.init(params)
        p, o = f(p, o, grads, 1.0)
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            p, o = jax.block_until_ready(f(p, o, grads, 1.0))
            ts.append(time.perf_counter() - t)
        res[name] = statistics.median(ts)
        print(f"| {name} | {res[name]:.3f} ({min(ts):.3f}) | {res[name] / res['none']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
