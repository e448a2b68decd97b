"""Experiment 3: ATMN sweeps (micro-steps T, leak tau, readout) under the full SBDS loss, and
which defaults they support (compared with marjax.config.ATMNConfig).

    python experiments/atmn_sweep.py [--config experiments/configs/atmn_sweep.toml]

Writes results/atmn_sweep.{md,json,png}.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common as C  # noqa: E402
from marjax.config import ATMNConfig


def sweeps(res: dict) -> dict:
    """{sweep: [(label, variant name)]} from the variants' ATMN fields (the config's grid: T at
    tau 1, tau at T 4, readout at T 4 and tau 0.5)."""
    def a(n):
        return res[n][0]["atmn"]
    out = {
        "T (tau 1, readout ones)": sorted(((a(n)["T"], n) for n in res
                                           if a(n)["tau"] == 1.0 and a(n)["readout"] == "ones")),
        "tau (T 4, readout ones)": sorted(((a(n)["tau"], n) for n in res
                                           if a(n)["T"] == 4 and a(n)["readout"] == "ones")),
        "readout (T 4, tau 0.5)": sorted(((a(n)["readout"], n) for n in res
                                          if a(n)["T"] == 4 and a(n)["tau"] == 0.5)),
    }
    return {k: v for k, v in out.items() if len(v) > 1}


def best(res: dict, names: list, key: str = "agreement", higher: bool = True) -> str:
    return (max if higher else min)(names, key=lambda n: C.aggregate(res[n], key)[0])


def recommendation(res: dict, sw: dict) -> str:
    d = ATMNConfig()
    lib = {"T (tau 1, readout ones)": d.T, "tau (T 4, readout ones)": d.tau, "readout (T 4, tau 0.5)": d.readout}
    lines = []
    for sweep, pts in sw.items():
        names = [n for _, n in pts]
        b_ag, b_kl = best(res, names, "agreement"), best(res, names, "kl", higher=False)
        default = [n for v, n in pts if v == lib[sweep]]
        line = f"- {sweep}: best agreement **{b_ag}**, lowest KL **{b_kl}**; library default {lib[sweep]!r}"
        if default:
            dn = default[0]
            if b_ag != dn:
                txt, better, beyond = C.compare(res, dn, b_ag, "agreement", True)
                line += f" ({dn} -> {b_ag}: {txt}; {'beyond' if beyond else 'within'} the seed spread)"
            else:
                line += " (the default is the best here)"
            e = {n: C.aggregate(res[n], "energy_pj_per_token")[0] / 1e3 for n in (dn, b_ag)}
            line += f"; energy/token {dn} {e[dn]:.0f} nJ vs {b_ag} {e[b_ag]:.0f} nJ"
        lines.append(line)
    return "\n".join(lines)


def plot(res: dict, sw: dict, path: Path) -> None:
    import matplotlib  # late import: matplotlib is slow to import and only needed for the plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late import: matplotlib is slow to import and only needed for the plots
    metrics = [("agreement w/ SSM", "agreement", 1.0), ("KL to SSM", "kl", 1.0), ("energy / token (nJ)",
                                                                                  "energy_pj_per_token", 1e-3)]
    fig, axes = plt.subplots(len(metrics), len(sw), figsize=(3.4 * len(sw), 2.6 * len(metrics)), squeeze=False)
    for j, (sweep, pts) in enumerate(sw.items()):
        for i, (lab, key, sc) in enumerate(metrics):
            ax = axes[i][j]
            ms = [C.aggregate(res[n], key) for _, n in pts]
            x = list(range(len(pts)))
            ax.errorbar(x, [m[0] * sc for m in ms], yerr=[m[1] * sc for m in ms], marker="o", capsize=3)
            ax.set_xticks(x)
            ax.set_xticklabels([str(v) for v, _ in pts], fontsize=8)
            if i == 0:
                ax.set_title(sweep, fontsize=9)
            if j == 0:
                ax.set_ylabel(lab, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a, exp, setup, res, wall = C.run_from_cli("atmn_sweep", __doc__, argv)
    sw = sweeps(res)
    parts = ["# ATMN sweeps (small scale)", "",
             "Full SBDS loss (alpha 0.2, beta 0.7, pre-norm features). Mean ± std over seeds; columns as in "
             "ablation_ladder.md. Energy grows with T and the firing rate (one AC per non-zero spike per "
             "output unit, per micro-step).", ""]
    for sweep, pts in sw.items():
        sub = {n: res[n] for _, n in pts}
        parts += [f"## {sweep}", "", C.markdown_table(sub), ""]
    covered = {n for pts in sw.values() for _, n in pts}
    rest = {n: r for n, r in res.items() if n not in covered}
    if rest:
        parts += ["## Other points" if sw else "## Variants", "", C.markdown_table(rest), ""]
    parts += ["## Which defaults the results support", "", recommendation(res, sw) if sw else "-", "",
              C.provenance(exp, setup, wall, a.config), ""]
    md = "\n".join(parts)
    d = C.write_outputs(a.results_dir, "atmn_sweep", md, {"results": res, "wall_s": wall})
    if sw:
        plot(res, sw, d / "atmn_sweep.png")
    else:
        C.bar_plot(res, [("agreement w/ SSM", "agreement", 1.0)], d / "atmn_sweep.png", "ATMN sweep")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
