"""Time a pytest subset under two environments side by side: one process pinned to each core,
then the cores swapped, so both settings see the same phase of a VM whose speed drifts by a third
within minutes (sequential runs do not resolve a 5% change there).

    python experiments/bench/paired_pytest.py --b XLA_FLAGS=--xla_cpu_parallel_codegen_split_count=32 \
        --rounds 1 --json out.json -- tests/nn tests/spiking

Each side runs `python -m pytest -n 0 -p no:cacheprovider <args>` (one process, so it uses one
core), with its `NAME=VALUE` settings added to the environment; the tests' own codegen switches
(tests/xla_test_flags.py) apply unless a side sets the flag (the caller's XLA_FLAGS win). Prints
each pair's wall times and the ratio b / a (< 1: b is faster); both sides must pass."""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

from marjax.kernels.cpu_kernels import cpu_model


def _env(assignments: list[str]) -> dict:
    env = dict(os.environ)
    for a in assignments:
        name, sep, value = a.partition("=")
        if not sep or not name:
            raise SystemExit(f"--a/--b take NAME=VALUE, got {a!r}")
        env[name] = value
    return env


def _run(cmd: list[str], env: dict, core: int, out: dict, key: str) -> None:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, preexec_fn=lambda: os.sched_setaffinity(0, {core}), capture_output=True,
                       text=True)
    lines = p.stdout.strip().splitlines()
    out[key] = {"s": time.perf_counter() - t, "rc": p.returncode, "summary": lines[-1] if lines else p.stderr[-500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", action="append", default=[], metavar="NAME=VALUE", help="side a's settings")
    ap.add_argument("--b", action="append", default=[], metavar="NAME=VALUE", help="side b's settings")
    ap.add_argument("--rounds", type=int, default=1, help="pairs per core order (each round runs both orders)")
    ap.add_argument("--json", default="")
    ap.add_argument("pytest_args", nargs="+", help="after --: what pytest runs")
    args = ap.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs two cores: one process pinned to each")
    cmd = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", *args.pytest_args]
    envs = {"a": _env(args.a), "b": _env(args.b)}
    pairs = []
    for r in range(args.rounds):
        for order in (("a", "b"), ("b", "a")):
            res: dict = {}
            threads = [threading.Thread(target=_run, args=(cmd, envs[side], cores[i], res, side))
                       for i, side in enumerate(order)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for side in "ab":
                if res[side]["rc"]:
                    raise SystemExit(f"side {side} failed (rc {res[side]['rc']}): {res[side]['summary']}")
            pair = {"round": r, "core_of_a": cores[order.index("a")], "a_s": res["a"]["s"], "b_s": res["b"]["s"],
                    "b_over_a": res["b"]["s"] / res["a"]["s"], "summary": res["a"]["summary"]}
            pairs.append(pair)
            print(f"round {r} a on core {pair['core_of_a']}: a {pair['a_s']:.1f} s, b {pair['b_s']:.1f} s, "
                  f"b / a {pair['b_over_a']:.3f}  ({pair['summary']})", flush=True)
    ratios = sorted(p["b_over_a"] for p in pairs)
    print(f"b / a over {len(pairs)} pairs: {', '.join(f'{x:.3f}' for x in ratios)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": args.a, "b": args.b, "pytest_args": args.pytest_args, "pairs": pairs,
                       "cpu": cpu_model()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
