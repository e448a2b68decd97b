"""Where a distillation train step's time goes: the real step of a stage (`marjax bench step`'s,
at the pipeline's shapes) traced with `jax.profiler`, its ops summed by kind.

    python experiments/bench/step_profile_probe.py [--model smollm2] [--stage sbds] [--steps 3] [--top 25]
        [--json FILE]
    python experiments/bench/step_profile_probe.py --plot kd.json sbds.json --png FILE

Kinds, from the op names XLA:CPU gives its thunks: products (YNNPACK fusions holding a dot, and
Eigen dots), dynamic-update-slice (a scan writing a layer's slice of a stacked buffer), dynamic-
slice (a scan reading one), zero-fill (a broadcast filling a fresh buffer: the scans' stacked
outputs), copy, loop control (while / conditional bodies' own time), other fusions (elementwise
work: norms, SiLU, ATMN, SSD, the KL, the optimizer), other YNNPACK fusions (reductions).
Shares are of the summed op time: the two threads often run two ops at once, so op times add up
to more than the wall time, and the rates of two products that ran side by side read low. The
top-ops table names each op's output shape and, for products, its GFLOP/s (FLOPs parsed from the
compiled HLO). The profiler stretches the step (about 10%); the wall time printed is the traced
steps'. Run as a script it re-executes under the glibc tunables the `marjax` commands use
(marjax.app.hostmem), as the trainer runs.
"""
from __future__ import annotations

import argparse
import collections
import math
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":   # before jax loads: train under the `marjax` commands' heap (marjax.app.hostmem)
    from marjax.app.hostmem import reexec_for_hugepages
    reexec_for_hugepages()

import jax  # noqa: E402

from marjax.app.bench_step import pipeline_stage, train_step_runner  # noqa: E402
from marjax.app.benchkit import header_line, machine_info  # noqa: E402
from marjax.app.pipeline import PIPELINES  # noqa: E402
from marjax.errors import ConfigError  # noqa: E402

# runtime wrappers in the trace: their spans hold the ops' spans
_RUNTIME = ("ThunkExecutor", "$", "SlinkyThreadPool")
# a conditional thunk named after its HLO instruction ("cond.97"): its span holds the taken
# branch's ops (the train step's update: 144 ms of nested op spans in a 72 ms cond span, measured)
_WRAPPER = re.compile(r"cond(\.\d+)+(\.clone)?$")
KINDS = ("products", "dynamic-update-slice", "dynamic-slice", "zero-fill", "copy", "loop control",
         "other fusions", "other ynn fusions")


def op_times(events: list) -> tuple[dict, dict]:
    """({op name: summed microseconds}, {op name: count}) of the complete ("X") events of a
    Chrome/perfetto trace, runtime wrappers left out."""
    tot, cnt = collections.Counter(), collections.Counter()
    for e in events:
        name = str(e.get("name", ""))
        if e.get("ph") == "X" and not name.startswith(_RUNTIME) and not _WRAPPER.match(name):
            tot[e["name"]] += float(e.get("dur", 0.0))
            cnt[e["name"]] += 1
    return dict(tot), dict(cnt)


def hlo_ops(hlo: str) -> dict:
    """{instruction name: {"shape": output shape text, "flops": FLOPs of the dots it computes}}
    for the top-level instructions of a compiled HLO module's text (fusions' dots counted from
    their fused computations)."""
    comps = {m.group(1): m.group(0) for m in re.finditer(r"\n(%[\w.\-]+) \([^\n]*\{\n.*?\n\}", hlo, re.S)}
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))

    def dot_flops(text: str) -> int:
        total = 0
        for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? dot\(%([\w.\-]+), %[\w.\-]+\)[^\n]*?lhs_contracting_dims=\{([\d,]*)\}",
                             text):
            out = [int(x) for x in m.group(1).split(",") if x]
            lhs = [int(x) for x in shapes.get(m.group(2), "").split(",") if x]
            k = math.prod(lhs[i] if i < len(lhs) else 1 for i in (int(x) for x in m.group(3).split(",") if x))
            total += 2 * math.prod(out) * k
        return total

    ops = {}
    for m in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|[^ ]+) ([\w\-]+)\(([^\n]*)", hlo):
        name, shape, opcode, rest = m.groups()
        calls = re.search(r"calls=(%[\w.\-]+)", rest)
        body = comps.get(calls.group(1), "") if calls else m.group(0)
        flops = dot_flops(body) if (opcode in ("dot", "fusion")) else 0
        ops[name] = {"shape": "(tuple)" if shape.startswith("(") else shape, "flops": flops}
    return ops


def kind(name: str, flops: int = 0) -> str:
    """The kind (KINDS) of an op from its thunk name (and whether it computes a dot)."""
    if name.startswith(("ynn_fusion", "dot")):
        return "products" if flops or name.startswith("dot") else "other ynn fusions"
    if "dynamic-update-slice" in name:
        return "dynamic-update-slice"
    if "dynamic-slice" in name:
        return "dynamic-slice"
    if name.startswith("wrapped_broadcast"):
        return "zero-fill"
    if name.startswith("copy") or "_copy" in name or "copy_" in name:
        return "copy"
    if name.startswith(("while", "conditional", "call")):
        return "loop control"
    return "other fusions"


def summarize(tot: dict, cnt: dict, ops: dict, steps: int, top: int = 25) -> dict:
    """Per-kind milliseconds a step and shares, and the `top` ops (ms a step, calls a step,
    output shape, GFLOP/s of products). Spans whose name is no instruction of the program (the
    Python dispatch, the runtime) are left out of the kinds and summed as host_ms_per_step."""
    host = sum(us for name, us in tot.items() if name not in ops)   # Python / runtime spans
    tot = {name: us for name, us in tot.items() if name in ops}
    by_kind = collections.Counter()
    for name, us in tot.items():
        by_kind[kind(name, ops[name]["flops"])] += us
    total = sum(by_kind.values()) or 1.0
    kinds = {k: {"ms_per_step": by_kind.get(k, 0.0) / steps / 1e3, "share": by_kind.get(k, 0.0) / total}
             for k in KINDS}
    rows = []
    for name, us in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
        info = ops[name]
        calls = cnt[name] / steps
        flops = info["flops"] * calls
        rows.append({"op": name, "ms_per_step": us / steps / 1e3, "calls_per_step": calls,
                     "shape": info["shape"], "kind": kind(name, info["flops"]),
                     "gflops": flops / (us / steps * 1e-6) / 1e9 if flops and us else None})
    return {"kinds": kinds, "op_ms_per_step": total / steps / 1e3, "host_ms_per_step": host / steps / 1e3,
            "top": rows}


def trace_step(run, steps: int, warmup: int = 2) -> tuple[list, float]:
    """The trace events of `steps` calls of run() after `warmup` untraced ones, and their wall
    seconds a step."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(run())
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        files = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {d}")
        with gzip.open(files[0]) as fh:
            events = json.load(fh)["traceEvents"]
    return events, wall


def plot(results: list, path: str) -> None:
    """Horizontal stacked bars, one per saved summary (stage): ms a step of op time by kind."""
    import matplotlib  # late import: only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: only the plot needs it
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(results)))
    labels = [f"{r['model']} {r['stage']} ({r['wall_s_per_step']:.2f} s a step traced)" for r in results]
    left = [0.0] * len(results)
    for i, k in enumerate(KINDS):
        ms = [r["kinds"][k]["ms_per_step"] for r in results]
        ax.barh(labels, ms, left=left, label=k, color=plt.cm.tab10(i))
        left = [a + b for a, b in zip(left, ms)]
    ax.set_xlabel("op time a step, summed over threads (ms)")
    ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45 / len(results) - 0.05))
    ax.set_title("where the train step's time goes (jax.profiler)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(PIPELINES))
    ap.add_argument("--stage", default="sbds", choices=("kd", "sbds"))
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after 2 untraced)")
    ap.add_argument("--top", type=int, default=25, help="ops listed")
    ap.add_argument("--json", default="", help="write the summary here")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="only draw saved summaries (--json files) as one figure into --png")
    ap.add_argument("--png", default="", help="the figure's path (with --plot)")
    a = ap.parse_args(argv)
    if a.plot is not None:
        if not a.png:
            raise ConfigError("--plot needs --png FILE")
        missing = [f for f in a.plot if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"--plot: no such file(s): {missing}")
        plot([json.loads(Path(f).read_text()) for f in a.plot], a.png)
        print(f"wrote {a.png}")
        return 0
    if a.steps < 1 or a.top < 0:
        raise ConfigError(f"--steps must be >= 1 and --top >= 0, got {a.steps}, {a.top}")
    print(header_line(machine_info()))
    pc, t_cfg, t_params, s_cfg, s_params, batch = pipeline_stage(a.stage, a.model)
    run, secs, _, _ = train_step_runner(a.stage, t_cfg, t_params, s_cfg, s_params, batch, pc.train, pc.distill)
    events, wall = trace_step(run, a.steps)
    tot, cnt = op_times(events)
    res = summarize(tot, cnt, hlo_ops(run.compiled.as_text()), a.steps, a.top)
    res.update(model=a.model, stage=a.stage, steps=a.steps, wall_s_per_step=wall, compile_s=secs,
               layer_layout=pc.train.layer_layout, teacher_layout=pc.train.teacher_layout)
    print(f"# {a.model} {a.stage} train step under jax.profiler: {wall:.3f} s a step (traced), op time summed over "
          f"threads {res['op_ms_per_step'] / 1e3:.3f} s a step\n")
    print("| kind | ms a step | share of op time |\n|---|---|---|")
    for k, v in sorted(res["kinds"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        print(f"| {k} | {v['ms_per_step']:.1f} | {v['share']:.3f} |")
    print("\n| op | kind | ms a step | calls a step | output | GFLOP/s |\n|---|---|---|---|---|---|")
    for r in res["top"]:
        rate = f"{r['gflops']:.0f}" if r["gflops"] else ""
        print(f"| {r['op']} | {r['kind']} | {r['ms_per_step']:.1f} | {r['calls_per_step']:g} | `{r['shape']}` | {rate} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
