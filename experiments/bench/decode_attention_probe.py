"""Probe: SmolLM2's decode step with the native attention kernel (attn_impl="auto") against XLA's
einsums ("xla"), alternating in one process, the cache donated and prefilled with real text.

    python experiments/bench/decode_attention_probe.py q4 80,256
    python experiments/bench/decode_attention_probe.py f32 80,1024,8192

Prints per context the median step time of each, their ratio, and the largest logit difference.
"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from marjax import load
from marjax.models import lm, quant
m = load("smollm2-135m-instruct"); cfg = m.config
p = lm.unroll_layers(m.params)
mode = sys.argv[1] if len(sys.argv) > 1 else "f32"
if mode != "f32": p = quant.quantize_params(p, mode)
steps = {impl: jax.jit(lambda p, t, c, impl=impl: lm.forward_cached(p, t, c, cfg, attn_impl=impl), donate_argnums=2) for impl in ("xla", "auto")}
prefill = jax.jit(lambda p, t, c: lm.forward_cached(p, t, c, cfg))
import pydoc_data.topics
text = np.array(m.tokenizer.encode(open(pydoc_data.topics.__file__).read()[:200000]), np.int32)
for ctx in [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "80,1024,8192").split(",")]:
    cache = lm.init_cache(cfg, 1, ctx + 64, unrolled=True)
    ids = jnp.asarray(text[None, :ctx])
    _, cache = prefill(lm.unroll_layers(m.params), ids, cache)
    tok = jnp.asarray(text[None, ctx:ctx + 1])
    copy = lambda c: jax.tree.map(jnp.copy, c)
    outs = {k: f(p, tok, copy(cache))[0] for k, f in steps.items()}
    d = float(jnp.abs(outs["xla"] - outs["auto"]).max()); same = bool((outs["xla"].argmax(-1) == outs["auto"].argmax(-1)).all())
    ts = {k: [] for k in steps}
    cs = {k: copy(cache) for k in steps}
    for _ in range(7):
        for k, f in steps.items():
            t = time.perf_counter(); lg, cs[k] = f(p, tok, cs[k]); lg.block_until_ready(); ts[k].append(time.perf_counter() - t)
            cs[k] = dict(cs[k], pos=cs[k]["pos"] - 1)
    mx = {k: np.median(v) * 1e3 for k, v in ts.items()}
    print(f"{mode} ctx {ctx}: xla {mx['xla']:.2f} ms, kernel {mx['auto']:.2f} ms, ratio {mx['xla']/mx['auto']:.2f}x, max|dlogit| {d:.2e} same argmax {same}, |logit| max {float(jnp.abs(outs['xla']).max()):.1f}", flush=True)
