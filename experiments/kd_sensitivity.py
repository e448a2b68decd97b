"""How far float rounding moves the default pipeline's dense SSM, per kd recipe.

The same pipeline has ended its dense SSM at held-out ppl 281, 304, 474 and 493 on different
CPUs and after rounding-only code changes (experiments/bench/RESULTS.md, "Twenty-fourth
session"). This script runs the default pipeline's orient and align once (resumable), then kd
from the align output perturbed by about one float32 ulp (each weight times 1 + 2^-23 * a random
sign; perturbation 0 = none), under each kd variant, and scores every dense SSM on the pipeline's
held-out text. The spread across perturbations is what another CPU's rounding would do to a
variant; its median is how good the variant is.

    python experiments/kd_sensitivity.py --config experiments/configs/kd_sensitivity.toml \
        --out results/kd_sensitivity

The TOML pins the pipeline fields the result depends on ([train], [recipe], stage steps) and
names the variants ([[variant]] name, lr_mult, warmup). Each (variant, perturbation) is cached
in <out>/runs.json and skipped when re-run; results: <out>/kd_sensitivity.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import marjax
from marjax.app import hostmem
from marjax.app.pipeline import PIPELINES, _rc
from marjax.app.recipe import dense_student
from marjax.app.runner import apply_sections, load_for_run, read_toml, run_stage
from marjax.errors import ConfigError
from marjax.eval.perplexity import text_perplexity
from marjax.train.data import heldout_text


def perturb(params, seed: int):
    """Each floating weight times (1 + 2^-23 * s), s = +-1 at random: about one float32 ulp."""
    if seed == 0:
        return params
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        if jnp.issubdtype(x.dtype, jnp.floating):
            s = jax.random.rademacher(k, x.shape, x.dtype)
            x = x * (1 + s * jnp.asarray(2.0 ** -23, x.dtype))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def load(path: str):
    data = read_toml(path)
    variants = data.pop("variant", [])
    if not variants:
        raise ConfigError(f"{path}: no [[variant]] tables")
    perturbations = data.pop("perturbations", [0, 1, 2])
    pc = apply_sections(PIPELINES["smollm2"], data)   # the same rules as `marjax pipeline --config`
    for v in variants:
        unknown = set(v) - {"name", "lr_mult", "warmup"}
        if unknown or "name" not in v:
            raise ConfigError(f"{path}: variant {v}: needs name; known keys name, lr_mult, warmup")
    return pc.validate(), variants, [int(p) for p in perturbations]


def write_tables(out: Path, pc, variants, perts, runs: dict) -> None:
    """kd_sensitivity.{json,md} from the runs so far (a variant's missing perturbations are left out)."""
    rows = []
    for v in variants:
        ps = [runs[f"{v['name']}/{s}"]["ppl"] for s in perts if f"{v['name']}/{s}" in runs]
        if not ps:
            continue
        rows.append({"variant": v["name"], "lr_mult": v.get("lr_mult", 1.0), "warmup": v.get("warmup"),
                     "ppl": ps, "median": statistics.median(ps), "max_over_min": max(ps) / min(ps)})
    res = {"config": json.loads(json.dumps(dataclasses.asdict(pc), default=str)), "variants": variants,
           "perturbations": perts, "rows": rows, "backend": jax.default_backend(), "jax_version": jax.__version__}
    (out / "kd_sensitivity.json").write_text(json.dumps(res, indent=1))
    lines = ["| kd variant | lr x | warmup | dense SSM ppl per perturbation | median | max / min |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['lr_mult']} | {r['warmup'] or 'recipe'} | "
                     f"{', '.join(f'{p:.1f}' for p in r['ppl'])} | {r['median']:.1f} | {r['max_over_min']:.3f} |")
    (out / "kd_sensitivity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/configs/kd_sensitivity.toml")
    ap.add_argument("--out", default="results/kd_sensitivity")
    a = ap.parse_args(argv)
    pc, variants, perts = load(a.config)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}

    teacher = load_for_run(pc.teacher, pc.train)
    text = heldout_text(pc.data or None, tokenizer=teacher.tokenizer)
    cfg, params = dense_student(teacher, _rc(pc, "orient", out, True), pc.recipe)
    for stage in ("orient", "align"):
        rc = _rc(pc, stage, out, True)
        params, _ = run_stage(stage, teacher, cfg, params, rc, rc.run.out)

    def ppl(p) -> float:
        m = marjax.Model(cfg, p, teacher.tokenizer, "")
        fn = lambda x: np.asarray(marjax.logits(m, x))  # noqa: E731
        return text_perplexity(fn, teacher.tokenizer, text, window=pc.eval_window, max_tokens=pc.eval_tokens)["token_ppl"]

    # perturbation-major order: every variant's unperturbed run first, so a cut-short run still compares
    for seed in perts:
        for v in variants:
            key = f"{v['name']}/{seed}"
            if key in runs:
                continue
            rc = _rc(pc, "kd", out / "kd" / v["name"] / str(seed), True)
            tc = rc.train
            tc = dataclasses.replace(tc, lr=tc.lr * float(v.get("lr_mult", 1.0)), warmup=int(v.get("warmup", tc.warmup)))
            rc = dataclasses.replace(rc, train=tc)
            t = time.time()
            kd_params, hist = run_stage("kd", teacher, cfg, perturb(params, seed), rc, rc.run.out)
            runs[key] = {"variant": v["name"], "perturbation": seed, "ppl": ppl(kd_params),
                         "final_loss": hist[-1]["loss"] if hist else None, "lr": tc.lr, "warmup": tc.warmup,
                         "wall_s": time.time() - t}
            print(key, runs[key], flush=True)
            runs_path.write_text(json.dumps(runs, indent=1))
            write_tables(out, pc, variants, perts, runs)

    write_tables(out, pc, variants, perts, runs)
    return 0


if __name__ == "__main__":
    hostmem.reexec_for_hugepages()   # the malloc tunables the `marjax` training commands run under
    sys.exit(main())
