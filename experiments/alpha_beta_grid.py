"""Experiment 2: the alpha/beta grid of SBDS (forward vs reverse KL weight), pre-norm features.

    python experiments/alpha_beta_grid.py [--config experiments/configs/alpha_beta_grid.toml]

Writes results/alpha_beta_grid.{md,json,png}.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common as C  # noqa: E402

PAPER = {"(1, 0)": 55.20, "(0, 1)": 55.92, "(0.7, 0.2)": 56.39, "(0.2, 0.7)": 56.40}
ORDER = [("(1, 0)", "(0, 1)"), ("(0, 1)", "(0.7, 0.2)"), ("(0.7, 0.2)", "(0.2, 0.7)"), ("(1, 0)", "(0.2, 0.7)")]


def main(argv=None) -> int:
    a, exp, setup, res, wall = C.run_from_cli("alpha_beta_grid", __doc__, argv)
    table = C.markdown_table(res, first="(alpha, beta)", extra={"paper avg acc": lambda n, r: PAPER.get(n, "-")})
    pairs = [(x, y) for x, y in ORDER if x in res and y in res]
    md = C.ordering_report(
        a, exp, setup, res, wall, stem="alpha_beta_grid", title="alpha / beta grid (small scale)",
        intro="alpha weights the forward KL(p_SSM || q_student), beta the reverse KL(q || p); every row adds the "
        "pre-norm feature loss. Mean ± std over seeds; columns as in ablation_ladder.md.",
        table=table, orderings="Orderings (paper: (1,0) < (0,1) < (0.7,0.2) <= (0.2,0.7))", pairs=pairs, paper=PAPER,
        bars=C.FIDELITY_BARS, plot_title="SBDS alpha/beta grid (mean ± std over seeds)")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
