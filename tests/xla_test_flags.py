"""The XLA:CPU flags the test suite compiles with, and the product's codegen for the few tests
whose claim is about the product's exact bits.

The tests compile far more than they compute (tiny models): most of a test's time is XLA:CPU
compiling (the suite's backend compiles took 367 of its ~640 worker-seconds, measured with
jax.monitoring on the 2-core dev VM). These codegen switches cut that without changing what the
tests check:
- LLVM backend optimisation level 0: about a fifth off the suite;
- the classic elemental IR emitter instead of XLA:CPU's newer MLIR fusion emitters
  (`xla_cpu_use_fusion_emitters=false`): the tests of tests/spiking and tests/nn in one process
  69.5 s / 67.1 s with the fusion emitters, 45.6 s without; the whole suite 3.4 min against
  5.0-6.4 min the same hour.
- one LLVM module per program (`xla_cpu_parallel_codegen_split_count=1`; XLA splits it into up
  to 32 and compiles the parts on a thread pool, meant for large programs on idle cores, not the
  tests' small -O0 ones with every core busy running a worker) and LLVM's expensive
  passes off (`xla_llvm_disable_expensive_passes`, what `jax_disable_most_optimizations` adds to
  -O0): measured in pairs, the two settings run side by side, one process pinned to each core
  (the VM's speed drifts by a third within minutes, so sequential runs do not resolve 5%):
  tests/nn + tests/spiking 93-95% of the time with the split alone, 97% with the passes alone;
  tests/train + tests/models + tests/ssm 88% with both (experiments/bench/RESULTS.md, twenty-first
  session).
None of these is fast-math: the same IEEE operations, but a fusion may round differently (measured:
the bound-gated and the recomputing train steps of tests/reliability/test_numerics.py differ in
the last bit under the classic emitter, and agree under the product's). The product, the
benches and the experiments keep XLA's defaults; a test whose claim is bit equality between two
programs the product compiles compiles them with `PRODUCT_CODEGEN`
(jax `.lower(...).compile(compiler_options=PRODUCT_CODEGEN)`).
Child processes inherit the flags (tests/simulated_devices.py passes XLA_FLAGS on)."""
import os

TEST_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false",
              "xla_cpu_parallel_codegen_split_count": "1", "xla_llvm_disable_expensive_passes": "true"}
# XLA's defaults for every switch above (xla/debug_options_flags.cc)
PRODUCT_CODEGEN = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True,
                   "xla_cpu_parallel_codegen_split_count": 32, "xla_llvm_disable_expensive_passes": False}


def install() -> None:
    """Append TEST_FLAGS to XLA_FLAGS (before jax is imported); a flag the caller already set wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{k}={v}" for k, v in TEST_FLAGS.items() if k not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
