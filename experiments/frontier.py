"""Issue 10: the spiking student's perplexity-energy frontier (reset gradient, T, rate-aware
calibration, firing-rate loss, quantizer), with the pipeline's chosen default marked.

    python experiments/frontier.py [--config experiments/configs/frontier.toml] [--chosen NAME]

Writes results/frontier.{md,json,png}: held-out ppl of each spiking row relative to its dense
SSM, against the analytic energy per token relative to the attention teacher.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common as C  # noqa: E402
from marjax.app.pipeline import PIPELINE_ATMN, PIPELINE_DISTILL  # noqa: E402


def pareto(points: dict) -> list:
    """Names on the lower-left frontier of {name: (energy, ppl_ratio)} (neither coordinate beaten
    by one point at once)."""
    return sorted(n for n, (e, p) in points.items()
                  if not any(e2 <= e and p2 <= p and (e2, p2) != (e, p) for e2, p2 in points.values()))


def plot(points: dict, front: list, chosen: str, path: Path, title: str) -> None:
    import matplotlib  # late import: matplotlib is slow to import and only needed for the plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: matplotlib is slow to import and only needed for the plots
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for n, (e, p) in points.items():
        ax.scatter([e], [p], color="tab:red" if n == chosen else ("tab:blue" if n in front else "tab:gray"),
                   s=60 if n == chosen else 25, zorder=3)
        ax.annotate(n, (e, p), fontsize=6, xytext=(3, 3), textcoords="offset points")
    fe = sorted((points[n] for n in front))
    ax.plot([x for x, _ in fe], [y for _, y in fe], color="tab:blue", lw=1, alpha=0.6)
    ax.set_xlabel("energy per token vs the attention teacher")
    ax.set_ylabel("held-out ppl vs the dense SSM")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pipeline_row(res: dict) -> str:
    """The variant whose ATMN and SBDS configs (every field but the stage name) are the pipeline's
    defaults, or "" when no row is."""
    want_atmn = json.loads(json.dumps(dataclasses.asdict(PIPELINE_ATMN)))
    want_distill = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(PIPELINE_DISTILL))).items() if k != "stage"}
    for name, rows in res.items():
        r = json.loads(json.dumps(rows[0], default=str))   # a freshly trained row holds tuples, a cached one lists
        if r["atmn"] == want_atmn and {k: v for k, v in r["distill"].items() if k != "stage"} == want_distill:
            return name
    return ""


def main(argv=None) -> int:
    ap = C.base_argparser("frontier", "frontier.toml", __doc__.split("\n\n")[0])
    ap.add_argument("--chosen", default="", help="variant to mark as the pipeline default (default: the row whose "
                    "ATMN and SBDS configs equal `marjax pipeline`'s PIPELINE_ATMN / PIPELINE_DISTILL)")
    a = ap.parse_args(argv)
    exp = C.config_from_args(a)
    t0 = time.time()
    setup, res = C.run_experiment(exp)
    dense = C.evaluate_dense(setup, exp.eval)
    e0, p0 = dense["teacher"]["energy_pj_per_token"], dense["dense SSM"]["ppl"]
    for rows in res.values():
        for r in rows:
            r["ppl_vs_ssm"] = r["ppl"] / p0
            r["energy_vs_teacher"] = r["energy_pj_per_token"] / e0
    chosen = a.chosen or pipeline_row(res)
    points = {n: (C.aggregate(rr, "energy_vs_teacher")[0], C.aggregate(rr, "ppl_vs_ssm")[0]) for n, rr in res.items()}
    front = pareto(points)
    cols = [("ppl vs SSM", "ppl_vs_ssm", 3, 1.0), ("energy vs teacher", "energy_vs_teacher", 3, 1.0),
            ("agree w/ SSM", "agreement", 3, 1.0), ("KL to SSM", "kl", 4, 1.0),
            ("firing rate", "firing_rate", 3, 1.0), ("held-out ppl", "ppl", 3, 1.0)]
    table = C.markdown_table(res, cols, extra={"frontier": lambda n, rows: "yes" if n in front else "",
                                                "chosen": lambda n, rows: "**default**" if n == chosen else ""})
    wall = time.time() - t0
    md = "\n".join([
        "# Spiking student: held-out ppl vs energy (small scale)", "",
        f"Dense SSM held-out ppl {p0:.3f}, teacher {dense['teacher']['ppl']:.3f}; energy is the analytic 45 nm "
        f"estimate at context {exp.eval.window} with each row's measured firing rates, relative to the attention "
        f"teacher's {e0 / 1e3:.1f} nJ/token. 'frontier': not beaten on both axes by another row.", "",
        table, "", C.provenance(exp, setup, wall, a.config), ""])
    d = C.write_outputs(a.results_dir, "frontier", md, {"results": res, "dense": dense, "frontier": front,
                                                        "chosen": chosen, "wall_s": wall})
    plot(points, front, chosen, d / "frontier.png", "spiking student: ppl vs energy (2-layer setup, "
                                                      f"{len(exp.seeds)} seed(s))")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
