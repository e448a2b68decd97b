"""What a repeated eager call of a public op costs (a notebook, an NNX module called outside jit),
against the same op wrapped in the caller's own `jax.jit`, timed round-robin in one process.

    python experiments/bench/eager_call_probe.py [--repeats 10] [--json F]

Each op is called with the same shapes every round; the table gives the median call of each form,
their ratio (eager / jitted) and the XLA compiles per repeated eager call (counted with
jax.monitoring). Before the ops validated in Python and ran a jitted core (the twentieth session),
every eager call compiled its lax.scan again: `atmn` about 0.16 s a call and `ssd` about 1 s at
these shapes on the 2-core dev VM, against milliseconds jitted.
"""
import argparse
import statistics

import jax
import jax.monitoring
import jax.numpy as jnp
from flax import nnx

from marjax.app.benchkit import header_line, interleaved, machine_info, write_json
from marjax.config import ATMNConfig, preset
from marjax.nnx import ATMN, DiscreteMamba2
from marjax.spiking import ATMNParams, atmn, atmn_spikes, atmn_with_stats
from marjax.ssm import ssd

_COMPILES = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _COMPILES.__setitem__(0, _COMPILES[0] + (name == "/jax/core/compile/backend_compile_duration")))


def cases():
    """{name: (eager callable, jitted callable)} at the SmolLM2 student's site and mixer shapes."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    cfg = ATMNConfig(T=2, tau=1.0, quantizer="round")
    x = jax.random.normal(k[0], (4, 64, 576))
    p = ATMNParams(jnp.full((576,), -0.5))
    b, l, h, hd, n = 4, 64, 9, 64, 64
    xs = jax.random.normal(k[1], (b, l, h, hd))
    la = -jax.nn.softplus(jax.random.normal(k[2], (b, l, h)))
    B, C = jax.random.normal(k[3], (b, l, h, n)), jax.random.normal(k[4], (b, l, h, n))
    module = ATMN(576, cfg)
    ssm_cfg = preset("smollm2-135m-ssm").ssm
    mixer = DiscreteMamba2(576, ssm_cfg, rngs=nnx.Rngs(0))
    mixer_jit = nnx.jit(lambda m, x: m(x))
    return {
        "atmn": (lambda: atmn(x, p, cfg), lambda f=jax.jit(lambda x, p: atmn(x, p, cfg)): f(x, p)),
        "atmn_with_stats": (lambda: atmn_with_stats(x, p, cfg),
                            lambda f=jax.jit(lambda x, p: atmn_with_stats(x, p, cfg)): f(x, p)),
        "atmn_spikes": (lambda: atmn_spikes(x, 0.6, 2, 1.0, True, "round"),
                        lambda f=jax.jit(lambda x: atmn_spikes(x, 0.6, 2, 1.0, True, "round")): f(x)),
        "ssd (auto)": (lambda: ssd(xs, la, B, C), lambda f=jax.jit(ssd): f(xs, la, B, C)),
        "nnx.ATMN module": (lambda: module(x), lambda f=jax.jit(lambda x: atmn(x, module.to_params(), cfg)): f(x)),
        "nnx.DiscreteMamba2 module (SmolLM2-SSM mixer)": (lambda: mixer(x), lambda: mixer_jit(mixer, x)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    info = machine_info()
    print(header_line(info))
    rows = {}
    for name, (eager, jitted) in cases().items():
        jax.block_until_ready((eager(), jitted()))          # first calls: compile both
        before = _COMPILES[0]
        t = interleaved({"eager": eager, "jitted": jitted}, a.repeats)
        per_call = (_COMPILES[0] - before) / (a.repeats + 1)   # interleaved runs one warmup round
        rows[name] = {"eager_s": t["eager"]["median_s"], "jitted_s": t["jitted"]["median_s"],
                      "ratio": t["eager"]["median_s"] / t["jitted"]["median_s"], "compiles_per_eager_call": per_call}
    print("| op | eager call, median | its own jit, median | eager / jitted | compiles per repeated eager call |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {1e3 * r['eager_s']:.2f} ms | {1e3 * r['jitted_s']:.2f} ms | {r['ratio']:.2f} "
              f"| {r['compiles_per_eager_call']:g} |")
    print(f"median eager / jitted over the ops: {statistics.median(r['ratio'] for r in rows.values()):.2f}")
    write_json(a.json, {"machine": info, "repeats": a.repeats, "ops": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
