"""`marjax bench plot FILE.json ...`: a PNG beside each bench JSON (or under `--out`), drawn from
the JSON alone, so a committed result can be redrawn without rerunning it.

    python -m marjax bench plot experiments/bench/decode_curve_smollm2_q4.json
    python -m marjax bench plot experiments/bench/all_tiny/*.json --out /tmp/plots

One figure per JSON, its panels chosen by the JSON's `bench` field and by what the run measured:

  ssd     speedup of each impl over the faster baseline, forward and forward+backward (bars:
          median; dots: min), with the 1.5x target
  step    per stage: step time against teacher fwd + student fwd+bwd stacked (the 1.2x target
          drawn over the parts), and each program's fraction of the matmul peak (the 0.5 target)
  decode  the per-token step against context, KV teacher vs SSM student (log-log; the curve's
          KV / 3 line is the ">= 3x at 8k" target); tok/s of each weight format over float32;
          marjax against llama.cpp where the run had it
  atmn    forward and forward+backward time by T micro-steps, dense vs ATMN-decoded products
  eval    tokens/s of the eval path and of the plain forward loop

Every panel names the device and the run's matmul peak in the title, as the tables do.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from marjax.errors import ConfigError

__all__ = ["main", "plot_file", "figure", "bench_kind", "PANELS"]

TARGET_STYLE = dict(color="tab:red", linestyle="--", linewidth=1)


def _machine(rec: dict) -> str:
    peak = rec.get("matmul_peak_gflops")
    return f"{rec.get('device', '?')}" + (f", peak {peak:.0f} GFLOP/s" if peak else "")


def _bars(ax, labels, series: dict, ylabel: str) -> None:
    """Grouped bars: series name -> values, one group per label."""
    n = len(series)
    width = 0.8 / max(n, 1)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([j + (i - (n - 1) / 2) * width for j in range(len(labels))], vals, width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)


def _ssd(rec: dict, fig) -> None:
    rows = rec["records"]
    ax = fig.subplots(1, 1)
    labels = [f"{r['impl']} L={r['length']}" for r in rows]
    _bars(ax, labels, {"fwd": [r["fwd_speedup"] for r in rows], "fwd+bwd": [r["fwd_bwd_speedup"] for r in rows]},
          "speedup over the faster baseline (median)")
    for k, (key, dx) in enumerate((("fwd_min_speedup", -0.2), ("fwd_bwd_min_speedup", 0.2))):
        ax.plot([j + dx for j in range(len(rows))], [r.get(key, float("nan")) for r in rows], "k.",
                label="min" if k == 0 else None)
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.axhline(1.5, label="target 1.5x", **TARGET_STYLE)
    ax.legend(fontsize=8)
    ax.set_title(f"SSD scan ({_machine(rec)})", fontsize=9)


def _step(rec: dict, fig) -> None:
    rows = rec["records"]
    ax_t, ax_p = fig.subplots(1, 2)
    labels = [f"{r['stage']} ({r.get('layer_layout', 'stacked')})" for r in rows]
    xs = range(len(rows))
    med = lambda r, k: r["times"][k]["median_s"]  # noqa: E731  (a one-line accessor)
    teacher = [med(r, "teacher_fwd") for r in rows]
    student = [med(r, "student_fwd_bwd") for r in rows]
    ax_t.bar([x - 0.2 for x in xs], teacher, 0.4, label="teacher fwd")
    ax_t.bar([x - 0.2 for x in xs], student, 0.4, bottom=teacher, label="student fwd+bwd")
    ax_t.bar([x + 0.2 for x in xs], [med(r, "step") for r in rows], 0.4, label="train step")
    ax_t.plot([x - 0.2 for x in xs], [1.2 * (a + b) for a, b in zip(teacher, student)], "_", markersize=24,
              label="1.2x the parts (target)", color=TARGET_STYLE["color"])
    ax_t.set_xticks(list(xs), labels, fontsize=8)
    ax_t.set_ylabel("seconds (median)")
    ax_t.legend(fontsize=7)
    ax_t.set_title(f"train step vs its parts ({_machine(rec)})", fontsize=9)
    progs = ("teacher_fwd", "student_fwd_bwd", "step")
    frac = {p: [r.get("peak_fraction_by_round", r.get("peak_fraction", {})).get(p, float("nan")) for r in rows]
            for p in progs}
    _bars(ax_p, labels, frac, "fraction of the matmul peak (by round)")
    ax_p.axhline(0.5, label="target 0.5", **TARGET_STYLE)
    ax_p.legend(fontsize=7)
    ax_p.set_title("analytic FLOP/s over the measured peak", fontsize=9)


def _decode_panels(rec: dict) -> list:
    """The parts a decode run measured, one panel each."""
    return [k for k in ("curve", "weights", "llama_cpp") if rec.get(k)]


def _decode(rec: dict, fig) -> None:
    panels = _decode_panels(rec)
    if not panels:
        raise ConfigError("decode JSON has none of 'curve', 'weights', 'llama_cpp' to plot")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, kind in zip(axes, panels):
        if kind == "curve":
            curve = rec["curve"]
            for name, label in (("kv", "KV teacher"), ("ssm", "SSM student"), ("kv_xla_attention", "KV, XLA attention")):
                pts = curve.get(name) or []
                if pts:
                    ax.plot([p["context"] for p in pts], [1e3 * p["step_s"] for p in pts], "o-", label=label)
            kv = curve.get("kv") or []
            if kv:
                ax.plot([p["context"] for p in kv], [1e3 * p["step_s"] / 3 for p in kv], label="KV / 3 (target)",
                        **TARGET_STYLE)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("ms per decoded token")
            ax.set_title(f"{rec.get('model', '')} {curve.get('weights', '')} decode step ({_machine(rec)})", fontsize=9)
        elif kind == "weights":
            w = rec["weights"]
            names = [r["weights"] for r in next(iter(w.values()))["rows"]]
            series = {m: [next((r["tok_s_over_f32"] for r in v["rows"] if r["weights"] == n), float("nan"))
                          for n in names] for m, v in w.items()}
            _bars(ax, names, series, "tok/s over float32 (median)")
            ax.axhline(1.0, color="gray", linewidth=1)
            ax.set_title("decode by weight format", fontsize=9)
        else:
            lc = rec["llama_cpp"]
            keys = [k for k in lc if k.startswith("marjax") and k.endswith("_over_llama_cpp")]
            names = [k[len("marjax"):-len("_over_llama_cpp")].strip("_").replace("_", " ") or "f32" for k in keys]
            _bars(ax, names, {"median": [lc[k] for k in keys]},
                  "tok/s over llama.cpp's")
            ax.axhline(1.0, color="gray", linewidth=1)
            ax.axhline(0.5, label="target 0.5", **TARGET_STYLE)
            ax.set_title(f"against llama.cpp ({lc.get('threads', '?')} threads)", fontsize=9)
        ax.legend(fontsize=7)


def _atmn(rec: dict, fig) -> None:
    rows = rec["rows"]
    ax = fig.subplots(1, 1)
    ts = [r["T"] for r in rows]
    for key, label in (("dense_fwd_s", "dense fwd"), ("dense_fwdbwd_s", "dense fwd+bwd"),
                       ("decoded_fwd_s", "ATMN decoded fwd"), ("decoded_fwdbwd_s", "ATMN decoded fwd+bwd"),
                       ("spike_passes_fwd_s", "one product per micro-step, fwd")):
        if all(key in r for r in rows):
            ax.plot(ts, [1e3 * r[key] for r in rows], "o-", label=label)
    ax.set_xlabel("T (micro-steps)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    ax.set_title(f"ATMN products, {rec.get('tokens')} tokens ({_machine(rec)})", fontsize=9)


def _eval(rec: dict, fig) -> None:
    ax = fig.subplots(1, 1)
    ax.bar(["marjax eval path", "plain forward loop"], [rec["marjax_tok_s"], rec["plain_tok_s"]])
    ax.set_ylabel("tokens / s (median)")
    ax.set_title(f"perplexity scoring, {rec.get('model', '')} ({_machine(rec)})", fontsize=9)


PANELS = {"ssd": (_ssd, (6, 3.6)), "step": (_step, (10, 3.8)), "decode": (_decode, None),
          "atmn": (_atmn, (5.5, 3.6)), "eval": (_eval, (4.5, 3.4))}


def bench_kind(rec) -> str:
    """The record's bench ("ssd", "step", ...); ConfigError if it is not a plottable bench record."""
    kind = rec.get("bench") if isinstance(rec, dict) else None
    if kind is None and isinstance(rec, dict) and "impl" in (rec.get("records") or [{}])[0]:
        kind = "ssd"   # ssd JSONs written before the dispatcher added the `bench` field
    if kind not in PANELS:
        raise ConfigError(f"bench={kind!r}; plottable: {sorted(PANELS)} (a JSON written by `marjax bench ... --json`)")
    return kind


def figure(rec: dict):
    """A matplotlib Figure of one bench record (the caller closes it)."""
    import matplotlib  # late import: matplotlib is slow to import and only needed for the plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: matplotlib is slow to import and only needed for the plots
    kind = bench_kind(rec)
    draw, size = PANELS[kind]
    if size is None:   # decode: one panel per measured part
        size = (5.2 * max(1, len(_decode_panels(rec))), 3.8)
    fig = plt.figure(figsize=size)
    try:
        draw(rec, fig)
    except BaseException as e:
        plt.close(fig)
        if isinstance(e, KeyError):
            raise ConfigError(f"a {kind} record without the field {e}") from None
        raise
    fig.tight_layout()
    return fig


def plot_file(path, out_dir=None) -> Path:
    """Draw the bench JSON at `path`; returns the PNG written (`<stem>.png` beside it, or in
    `out_dir`). Raises ConfigError for a file that is missing, not JSON, or not a bench record."""
    import matplotlib.pyplot as plt  # late import: matplotlib is slow to import and only needed for the plots
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench plot: no such file: {path}")
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"bench plot: {path} is not JSON ({e})") from None
    try:
        fig = figure(rec)
    except ConfigError as e:
        raise ConfigError(f"bench plot: {path}: {e}") from None
    try:
        dest = (Path(out_dir) if out_dir else path.parent) / (path.stem + ".png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(dest, dpi=110)
    finally:
        plt.close(fig)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax bench plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="bench JSONs (marjax bench ... --json)")
    ap.add_argument("--out", default="", help="folder for the PNGs (default: beside each JSON)")
    a = ap.parse_args(argv)
    for f in a.files:
        print(plot_file(f, a.out or None))
    return 0
