"""What reading each update's results one update late saves in marjax.train.loop.

    python experiments/bench/loop_lag_probe.py [--steps 40] [--rounds 3] [--model tiny]
    python experiments/bench/loop_lag_probe.py --model smollm2-135m-instruct --steps 6 --rounds 1 --only lagged
    python experiments/bench/loop_lag_probe.py --model smollm2-135m-instruct --steps 6 --rounds 1 --only synced

The loop dispatches update s + 1 before it fetches update s's loss and finite flag, so the
host's work between updates (the next batch from the Grain iterator, stacking, device_put,
logging, the progress bar, the dispatch itself) overlaps the device's step instead of following
it. "synced" rebuilds the schedule before that change in the same process: a step wrapper that
blocks on each update's results right after dispatching it. Both train the same kd stage (the
attention teacher, its SSM student from marjax.distill.init) on packed batches of the embedded text (marjax.train.data.make_dataset), alternating, `rounds`
times each; the figure is the seconds per update from update 2 to update steps - 1 (neither the
compile nor the final save), from the loop's own metrics.jsonl clock. The host gap itself is timed in "synced": from an update's
results being ready to the next update's dispatch. `--only VARIANT` runs one variant and prints
the process's peak resident memory: run it once per variant (a process's peak only grows), with
the glibc tunables the `marjax` commands run under (marjax.app.hostmem) for the pipeline's figure.

The gap is host time, so it weighs most where steps are short (TPU/GPU, small models); on this
CPU with the 135M student's multi-second steps it is a fraction of a percent.
"""
import argparse
import resource
import statistics
import tempfile
import time
import warnings

import jax

from marjax.api import load
from marjax.config import DistillConfig, TrainConfig
from marjax.distill.init import init_from_attention
from marjax.distill.stages import make_loss
from marjax.train import loop
from marjax.train.data import make_dataset


def run(model, student, steps: int, synced: bool, gaps: list) -> float:
    tc = TrainConfig(steps=steps, seq_len=64, micro_batch=4, batch_tokens=256, lr=3e-4, log_every=1,
                     save_every=steps, keep=1, dispatch_ahead="on")   # "auto" is off on CPU
    data = make_dataset(None, model.tokenizer, tc.seq_len, tc.micro_batch)
    make = loop.make_train_step
    ready = []

    def make_synced(*a, **k):
        step = make(*a, **k)

        def call(*args):
            if ready:
                gaps.append(time.perf_counter() - ready[-1])
            out = jax.block_until_ready(step(*args))   # the old schedule: wait on each update at once
            ready.append(time.perf_counter())
            return out
        return call

    loop.make_train_step = make_synced if synced else make
    try:
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s_cfg, s_params = student
            _, hist = loop.train(make_loss("kd", model.config, s_cfg, DistillConfig()), s_params, model.params,
                                 data, tc, out, model_meta={"stage": "kd"}, progress=True)
    finally:
        loop.make_train_step = make
    steady = [h["time"] for h in hist if 2 <= h["step"] < steps]   # no compile (1st), no save (last)
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--only", choices=("lagged", "synced"), help="one variant; prints the peak RSS")
    args = ap.parse_args(argv)
    model = load(args.model)
    student = init_from_attention(model.params, model.config)
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; model {args.model}; "
          f"{args.steps} updates per run, {args.rounds} rounds")
    t = {name: [] for name in ("lagged", "synced") if args.only in (None, name)}
    gaps: list = []
    for _ in range(args.rounds):
        for name in t:
            t[name].append(run(model, student, args.steps, name == "synced", gaps))
    for name, ts in t.items():
        print(f"{name}: s/update median {statistics.median(ts) * 1e3:.2f} ms")
    if args.only:
        print(f"{args.only}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    else:
        print(f"synced/lagged {statistics.median(t['synced']) / statistics.median(t['lagged']):.3f}")
    if gaps:
        print(f"host gap per update in synced (ready -> next dispatch): median {statistics.median(gaps) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
