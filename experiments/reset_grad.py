"""Issue 10: what each ATMN reset-gradient mode does to the spiking student's gradients, on a
real dense SSM (the SmolLM2 pipeline's stage-1 output, 30 layers x 4 sites):

- per site, the fraction of input elements whose ATMN derivative dy/dx is exactly zero (they
  get no gradient at all), on one calibration batch;
- the max |grad| of the SBDS loss over every parameter, per mode (float32 overflow shows as inf).

    python experiments/reset_grad.py --ssm results/pipeline-smollm2/kd [--out experiments/results/reset_grad]

The thresholds are calibrated once with the pipeline recipe (marjax.app.recipe.spiking_student);
only ATMNConfig.reset_grad changes between rows. Every config is pinned to what the committed
table was measured with (the SmolLM2 pipeline of commit 513e2e2), not read from today's pipeline.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import marjax  # noqa: E402
from marjax.app.recipe import Recipe, calibration_ids, spiking_student  # noqa: E402
from marjax.app.runner import RunConfig, RunSection  # noqa: E402
from marjax.config import RESET_GRADS, ATMNConfig, DistillConfig, TrainConfig  # noqa: E402
from marjax.distill.stages import make_loss  # noqa: E402
from marjax.models.lm import forward  # noqa: E402
from marjax.spiking import ATMNParams, atmn  # noqa: E402


# the SmolLM2 pipeline's configs at commit 513e2e2, where the committed table was measured
MEASURED_TRAIN = TrainConfig(seq_len=64, micro_batch=4, batch_tokens=256, lr=3e-4, log_every=1, keep=1,
                             optimizer="optax")
MEASURED_ATMN = ATMNConfig(T=4, tau=1.0, surrogate="rectangular", width=1.0, init="stats", quantizer="floor",
                           calib_max_ratio=4.0, calib_rate_weight=0.0)
MEASURED_DISTILL = DistillConfig(alpha=0.2, beta=0.7, temperature=1.0, feature_weight=1.0, feature="prenorm",
                                 feature_norm="relative", rate_weight=0.0, rate_target=0.0, token_grad_clip=0.0)


def zero_grad_fraction(x, a, cfg) -> float:
    """Fraction of elements of x whose elementwise dy/dx (ATMN is elementwise) is exactly 0."""
    g = jax.grad(lambda x: jnp.sum(atmn(x, ATMNParams(a), cfg)))(x)
    return float(jnp.mean(g == 0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ssm", required=True, help="dense SSM checkpoint dir (the pipeline's kd stage)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reset_grad"))
    ap.add_argument("--rows", type=int, default=4, help="sequences in the batch")
    a = ap.parse_args(argv)
    ssm = marjax.load(a.ssm)
    rc = RunConfig(run=RunSection(teacher="smollm2-135m-instruct", data=""), train=MEASURED_TRAIN,
                   distill=MEASURED_DISTILL, atmn=MEASURED_ATMN)
    pcfg, pparams = spiking_student(ssm, rc, Recipe(calib_rows=4))
    ids = jnp.asarray(calibration_ids(rc, ssm.tokenizer, ssm.config, a.rows, seed_offset=2000))
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": jnp.ones(ids[:, 1:].shape, jnp.float32)}
    _, aux = jax.jit(forward, static_argnames=("cfg", "taps", "head"))(pparams, batch["inputs"], cfg=pcfg,
                                                                      taps=("site_inputs",), head=False)
    rows = {}
    for mode in RESET_GRADS:
        at = dataclasses.replace(MEASURED_ATMN, reset_grad=mode)
        cfg = dataclasses.replace(pcfg, atmn=at)
        zf = {}
        for site in at.sites:
            xs, thr = aux["site_inputs"][site], getattr(pparams.blocks.spikes, site).a
            zf[site] = float(np.mean([zero_grad_fraction(xs[i], thr[i], at) for i in range(cfg.n_layers)]))
        loss = make_loss("sbds", ssm.config, cfg, MEASURED_DISTILL)
        g = jax.jit(jax.grad(lambda p: loss(p, ssm.params, batch, None)[0]))(pparams)
        leaves = jax.tree.leaves(g)
        rows[mode] = {"zero_grad_fraction": zf,
                      "max_abs_grad": float(max(jnp.max(jnp.abs(x)) for x in leaves)),
                      "finite": bool(all(bool(jnp.all(jnp.isfinite(x))) for x in leaves))}
        print(mode, json.dumps(rows[mode]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    head = "| reset_grad | " + " | ".join(f"zero-grad {s}" for s in MEASURED_ATMN.sites) + " | max abs grad | finite |"
    lines = [head, "|" + "---|" * (len(MEASURED_ATMN.sites) + 3)]
    for mode, r in rows.items():
        lines.append(f"| {mode} | " + " | ".join(f"{r['zero_grad_fraction'][s]:.3f}" for s in MEASURED_ATMN.sites)
                     + f" | {r['max_abs_grad']:.3g} | {r['finite']} |")
    md = "\n".join(["# ATMN reset gradient on SmolLM2's spiking student", "",
                    f"Dense SSM `{a.ssm}`, {pcfg.n_layers} layers; thresholds calibrated by the pipeline recipe "
                    f"(T {MEASURED_ATMN.T}, tau {MEASURED_ATMN.tau}, {MEASURED_ATMN.surrogate} surrogate, "
                    f"width {MEASURED_ATMN.width}); one "
                    f"batch of {a.rows} x {ids.shape[1] - 1} tokens; SBDS loss as the pipeline's. Zero-grad: fraction "
                    "of a site's input elements whose dy/dx is exactly 0 (mean over layers).", "",
                    "\n".join(lines), "", f"Command: `python experiments/reset_grad.py --ssm {a.ssm}`", ""])
    (out / "README.md").write_text(md)
    (out / "reset_grad.json").write_text(json.dumps(rows, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
