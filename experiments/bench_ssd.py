"""Benchmark the SSD implementations (same as `marjax bench ssd`); results in experiments/results/.

    python experiments/bench_ssd.py --json experiments/results/ssd_cpu.json
"""
import sys

from marjax.ssm.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
