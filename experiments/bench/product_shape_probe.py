"""How fast this machine's XLA:CPU multiplies at the train step's product shapes, against the
1024^3 product that `marjax bench step` takes as its peak.

    python experiments/bench/product_shape_probe.py [--rounds 8]

The SmolLM2 pipeline's step multiplies 256 activation rows (micro_batch 4 x seq_len 64) by each
layer's weights: forward products and data gradients are (256, K) @ (K, N), weight gradients
(K, 256) @ (256, N). Each call here takes the next of 30 distinct weight matrices (one per layer,
as the step reads them: not cache-resident), jitted alone, so the figure is the product's own rate
with nothing else running. Shapes are timed round-robin in one process; the table gives each
shape's GFLOP/s (the median call of a round, median over rounds) and its ratio to the 1024^3
product timed in the same rounds.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

# name: (M, K, N, form): "x@w" multiplies (M, K) @ (K, N); "x@w.T" holds w as (N, K) and
# "x.T@w" holds x as (K, M): the layouts the step's transposed products read (JAX's transpose
# of x @ W gives dy @ W.T for the data gradient and x.T @ dy for the weight gradient)
SHAPES = {
    "1024^3 (the peak's product)": (1024, 1024, 1024, "x@w"),
    "fwd MLP gate/up x @ W": (256, 576, 1536, "x@w"),
    "fwd MLP down x @ W": (256, 1536, 576, "x@w"),
    "fwd SSM in_proj x @ W": (256, 576, 2313, "x@w"),
    "data grad of gate/up dy @ W.T": (256, 1536, 576, "x@w.T"),
    "data grad of in_proj dy @ W.T": (256, 2313, 576, "x@w.T"),
    "weight grad of gate/up x.T @ dy": (576, 256, 1536, "x.T@w"),
    "weight grad of in_proj x.T @ dy": (576, 256, 2313, "x.T@w"),
}
LAYERS = 30


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    key = jax.random.PRNGKey(0)
    forms = {   # form: (product, x's shape, w's shape)
        "x@w": (lambda x, w: x @ w, lambda m, k, n: (m, k), lambda m, k, n: (k, n)),
        "x@w.T": (lambda x, w: x @ w.T, lambda m, k, n: (m, k), lambda m, k, n: (n, k)),
        "x.T@w": (lambda x, w: x.T @ w, lambda m, k, n: (k, m), lambda m, k, n: (k, n)),
    }
    data = {}
    for name, (m, k, n, form) in SHAPES.items():
        fn, x_shape, w_shape = forms[form]
        f = jax.jit(fn)
        kx, kw, key = jax.random.split(key, 3)
        x = jax.random.normal(kx, x_shape(m, k, n))
        ws = [jax.random.normal(jax.random.fold_in(kw, i), w_shape(m, k, n)) for i in range(LAYERS)]
        f(x, ws[0]).block_until_ready()
        data[name] = (f, x, ws, 2 * m * k * n)
    rates = {name: [] for name in SHAPES}
    for _ in range(a.rounds):
        for name, (f, x, ws, flops) in data.items():
            ts = []
            for w in ws:
                t = time.perf_counter()
                f(x, w).block_until_ready()
                ts.append(time.perf_counter() - t)
            rates[name].append(flops / statistics.median(ts) / 1e9)
    peak = statistics.median(rates["1024^3 (the peak's product)"])
    print(f"# backend {jax.default_backend()}; {a.rounds} rounds, each shape {LAYERS} distinct weights a round; "
          "GFLOP/s of the median call, median over rounds")
    print("| product | (M, K, N) | GFLOP/s | over 1024^3 |\n|---|---|---|---|")
    for name, (m, k, n, _) in SHAPES.items():
        r = statistics.median(rates[name])
        print(f"| {name} | ({m}, {k}, {n}) | {r:.0f} | {r / peak:.2f} |")


if __name__ == "__main__":
    main()
