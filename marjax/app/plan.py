"""`marjax plan`: what one train step of a stage costs on a mesh, before any weights exist.

    marjax plan --teacher llama-3.2-1b --student llamba-1b --stage sbds --mesh 8,1,1 \
        --seq-len 512 --micro-batch 8

The real step (marjax.train.step.make_train_step with the stage loss of
marjax.distill.stages.make_loss) is lowered on abstract inputs (ShapeDtypeStructs carrying their
target shardings) over simulated CPU devices, then compiled unless --no-compile. It prints:
  - per-device bytes: student params, optimizer state, gradient accumulator, teacher params,
    activations (analytic, marjax.train.memory) next to XLA's memory analysis of the compiled
    step (arguments, temporaries, outputs), when compiled;
  - FLOPs per token: XLA's cost analysis of the whole (unpartitioned) step next to the analytic
    count below, and their ratio;
  - the tokens/s ceiling of the mesh's chip count for named accelerators (PEAK_FLOPS).

Analytic FLOPs per token (a matmul of an (m, k) by (k, n) counts 2mkn; S = seq_len):
  teacher forward   2 M_t + L_t * 4 S H_t hd_t (+ the attention scores and values over all S x S
                    positions: XLA computes the full square, masked)
  student fwd+bwd   3 (2 M_s + L_s * (SSD + conv))        (backward = 2x forward for matmuls)
    SSD (chunked, chunk Q) per layer = H (2 Q n + 2 Q p + 4 n p): in-chunk C B^T and its product
    with x, the chunk-state product x^T B and the carried-state read-out C h
    conv per layer = 2 K c
  heads (stage kd/sbds): student 2 d V (forward) + 4 d V (backward) = 6 d V, teacher 2 d V;
    when the KL runs over more than one sequence chunk (seq_len > DistillConfig.kl_chunk), each
    chunk is rematerialised in the backward (marjax.distill.losses): + 2 d V for each head.
    With one chunk nothing is recomputed (pretrain: no teacher, no KL: 6 d V)
where M = the params of the per-layer projections and MLP (L x (q,k,v,o or in/out projections
+ 3 d f)); embeddings are gathers (no FLOPs). Left out (below 1% at 1B scale): norms, softmax
and KL elementwise work (~20 V per token), ATMN neuron updates (T x ~10 per site channel),
the conv bias, rotary embeddings and the optimizer (~15 per param per update).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from marjax.config import ATMNConfig, DistillConfig, MeshConfig, ModelConfig, TrainConfig, preset
from marjax.distill.stages import make_loss, trainable_mask
from marjax.errors import ConfigError
from marjax.models.lm import init_params
from marjax.models.spiking import spiking_config
from marjax.ssm.api import effective_chunk
from marjax.train.memory import estimate_stage_bytes
from marjax.train.mesh import batch_shardings, make_mesh, param_shardings
from marjax.train.optim import accum_steps, make_optimizer, param_bound
from marjax.train.state import TrainState, state_shardings
from marjax.train.step import StepShardings, make_train_step

__all__ = ["PEAK_FLOPS", "analytic_flops_per_token", "plan", "format_plan", "main"]

# dense bf16 peak FLOP/s per chip (vendor datasheets; no sparsity)
PEAK_FLOPS = {"H100 SXM (bf16 989 TFLOP/s)": 989e12, "A100 (bf16 312 TFLOP/s)": 312e12,
              "TPU v5e (bf16 197 TFLOP/s)": 197e12, "TPU v5p (bf16 459 TFLOP/s)": 459e12}
STAGES = ("pretrain", "kd", "sbds")


def _layer_matmul_params(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.d_ff
    if cfg.is_ssm:
        s = cfg.ssm
        mixer = d * (s.conv_dim + s.d_inner + s.n_heads) + s.d_inner * d
    else:
        hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        mixer = d * (hq + 2 * hkv) + hq * d
    return mixer + 3 * d * f


def _mixer_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Per token per layer: attention scores + values, or SSD + conv."""
    if not cfg.is_ssm:
        return 4 * seq_len * cfg.n_heads * cfg.head_dim
    s = cfg.ssm
    q = effective_chunk(seq_len, s.chunk_size)
    return s.n_heads * (2 * q * s.state_dim + 2 * q * s.head_dim + 4 * s.state_dim * s.head_dim) + \
        2 * s.conv_kernel * s.conv_dim


def analytic_flops_per_token(teacher: Optional[ModelConfig], student: ModelConfig, stage: str,
                             seq_len: int, kl_chunk: int = DistillConfig.kl_chunk) -> dict:
    """The module doc's formula, term by term (FLOPs per trained token) and their total. The
    heads' recompute counts only where the KL loss runs over more than one chunk of `kl_chunk`
    tokens (marjax.distill.losses rematerialises its chunks only then)."""
    if kl_chunk < 1:
        raise ConfigError(f"kl_chunk must be >= 1, got {kl_chunk}")
    s_fwd = student.n_layers * (2 * _layer_matmul_params(student) + _mixer_flops(student, seq_len))
    dv_s = student.d_model * student.vocab_size
    terms = {"student fwd+bwd (layers)": 3 * s_fwd}
    remat = stage != "pretrain" and seq_len > kl_chunk
    if not remat:
        terms["student head (fwd+bwd)"] = 6 * dv_s
    else:
        terms["student head (fwd+remat+bwd)"] = 8 * dv_s
    if stage != "pretrain":
        terms["teacher fwd (layers)"] = teacher.n_layers * (2 * _layer_matmul_params(teacher) +
                                                            _mixer_flops(teacher, seq_len))
        dv_t = teacher.d_model * teacher.vocab_size
        terms["teacher head (fwd+remat)" if remat else "teacher head (fwd)"] = (4 if remat else 2) * dv_t
    terms["total"] = int(sum(terms.values()))
    return terms


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying their shardings; `shardings` may be a prefix of `tree` (a state
    leaf such as optax's EmptyState holds one sharding for its empty subtree)."""
    return jax.tree.map(lambda s, sub: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub), shardings, tree)


def _per_device_bytes(tree, shardings) -> int:
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(_abstract(tree, shardings))))


@contextlib.contextmanager
def _unrolled_scans():
    """Every jax.lax.scan traced inside runs fully unrolled (no while loop left in the HLO), so
    XLA's cost analysis, which counts a loop body once whatever its trip count, sees all of it."""
    orig = jax.lax.scan

    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
        return orig(f, init, xs, length, reverse=reverse, unroll=True, **kw)
    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = orig


def _flops(lowered) -> Optional[float]:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def plan(teacher: Optional[ModelConfig], student: ModelConfig, stage: str, mesh, train_cfg: TrainConfig,
         dcfg: DistillConfig = DistillConfig(), compile: bool = True) -> dict:
    """Lower (and compile) the stage's train step on abstract inputs over `mesh`; a dict of
    per-device bytes, FLOPs per token (XLA and analytic) and the config it describes."""
    if stage not in STAGES:
        raise ConfigError(f"plan --stage must be one of {STAGES}, got {stage!r}")
    n_micro = accum_steps(train_cfg)
    s_shapes = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), student))
    if stage == "pretrain":
        from marjax.app.runner import pretrain_loss   # late import: the runner pulls in the data pipeline
        loss_fn, t_shapes, trainable = pretrain_loss(student), None, "all"
    else:
        loss_fn = make_loss(stage, teacher, student, dcfg)
        t_shapes = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), teacher))
        trainable = dcfg.trainable
    mask = trainable_mask(s_shapes, trainable)
    tx = make_optimizer(train_cfg, s_shapes, mask)
    state = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                rng=jax.random.PRNGKey(0)), s_shapes)
    batch = {"inputs": jax.ShapeDtypeStruct((n_micro, train_cfg.micro_batch, train_cfg.seq_len), jnp.int32),
             "targets": jax.ShapeDtypeStruct((n_micro, train_cfg.micro_batch, train_cfg.seq_len), jnp.int32),
             "mask": jax.ShapeDtypeStruct((n_micro, train_cfg.micro_batch, train_cfg.seq_len), jnp.float32)}
    sh = StepShardings(state=state_shardings(state, mesh), teacher=None if t_shapes is None else
                       param_shardings(t_shapes, mesh), batch=batch_shardings(batch, mesh, leading=1))
    bound = param_bound(train_cfg)   # as the trainer builds its step
    step = make_train_step(loss_fn, tx, mesh, sh, n_micro, trainable=mask, compute_dtype=train_cfg.compute_dtype,
                           param_bound=bound)
    args = (_abstract(state, sh.state), None if t_shapes is None else _abstract(t_shapes, sh.teacher),
            _abstract(batch, sh.batch))
    lowered = step.lower(*args)
    tokens = n_micro * train_cfg.micro_batch * train_cfg.seq_len
    looped = _flops(lowered)
    with _unrolled_scans():     # XLA counts a while loop's body once: count the unrolled program
        cost = _flops(make_train_step(loss_fn, tx, mesh, sh, n_micro, trainable=mask,
                                      compute_dtype=train_cfg.compute_dtype, param_bound=bound).lower(*args))
    n_dev = mesh.devices.size
    rows = train_cfg.micro_batch // math.prod(mesh.shape[a] for a in sh.batch["inputs"].spec[1] or ()) \
        if sh.batch["inputs"].spec[1:] else train_cfg.micro_batch
    local = dataclasses.replace(train_cfg, micro_batch=max(1, rows))
    est = estimate_stage_bytes(student, teacher, local, stage, dcfg.kl_chunk)
    out = {"stage": stage, "teacher": None if teacher is None else teacher.name, "student": student.name,
           "mesh": dict(mesh.shape), "devices": n_dev, "seq_len": train_cfg.seq_len,
           "micro_batch": train_cfg.micro_batch, "accum_steps": n_micro, "tokens_per_step": tokens, "rows_per_device": rows,
           "bytes_per_device": {
               "student params": _per_device_bytes(state.params, sh.state.params),
               "optimizer state": _per_device_bytes(state.opt_state, sh.state.opt_state),
               "grad accumulator (f32)": _per_device_bytes(
                   jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), state.params), sh.state.params),
               "teacher params": 0 if t_shapes is None else _per_device_bytes(t_shapes, sh.teacher),
               "activations (analytic)": int(sum(v for k, v in est.items()
                                                 if k.startswith(("activations", "logits", "mixing"))))},
           "xla_flops_per_token": None if cost is None else cost / tokens,
           "xla_flops_per_token_loop_bodies_once": None if looped is None else looped / tokens,
           "analytic_flops_per_token": analytic_flops_per_token(teacher, student, stage, train_cfg.seq_len,
                                                                 dcfg.kl_chunk),
           "compiled": False, "xla_memory": None}
    if compile:
        compiled = lowered.compile()
        out["compiled"] = True
        mem = compiled.memory_analysis()
        if mem is not None:
            out["xla_memory"] = {k: int(getattr(mem, k)) for k in
                                 ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                  "alias_size_in_bytes", "generated_code_size_in_bytes") if hasattr(mem, k)}
        dev_cost = compiled.cost_analysis()
        dev_cost = dev_cost[0] if isinstance(dev_cost, (list, tuple)) else dev_cost
        if dev_cost and "flops" in dev_cost:
            out["xla_flops_per_device"] = float(dev_cost["flops"])
    a = out["analytic_flops_per_token"]["total"]
    x = out["xla_flops_per_token"]
    out["ratio_analytic_over_xla"] = None if not x else a / x
    flops = x or a
    out["tokens_per_s_ceiling"] = {name: peak * n_dev / flops for name, peak in PEAK_FLOPS.items()}
    return out


def _gib(b) -> str:
    return f"{b / 2 ** 30:.3f} GiB" if b >= 2 ** 27 else f"{b / 2 ** 20:.3f} MiB"


def format_plan(p: dict) -> str:
    mesh = "x".join(str(v) for v in p["mesh"].values())
    lines = [f"plan: stage {p['stage']}, teacher {p['teacher']}, student {p['student']}, mesh (data, fsdp, tensor) "
             f"= {mesh} ({p['devices']} devices), seq_len {p['seq_len']}, micro_batch {p['micro_batch']} "
             f"x accum {p['accum_steps']} = {p['tokens_per_step']} tokens/step, {p['rows_per_device']} rows/device",
             f"compiled: {'yes' if p['compiled'] else 'no (lowered only; memory analytic)'}", "per-device bytes:"]
    for k, v in p["bytes_per_device"].items():
        lines.append(f"  {k:<28}{_gib(v)}")
    if p["xla_memory"]:
        for k, v in p["xla_memory"].items():
            lines.append(f"  xla {k.replace('_in_bytes', ''):<24}{_gib(v)}")
    lines.append("FLOPs per token:")
    for k, v in p["analytic_flops_per_token"].items():
        lines.append(f"  analytic {k:<30}{v:.4g}")
    x = p["xla_flops_per_token"]
    lines.append(f"  xla cost analysis (scans unrolled){'':<5}{x:.4g}" if x else "  xla cost analysis: n/a")
    if p.get("xla_flops_per_token_loop_bodies_once"):
        lines.append(f"  xla as lowered (loop bodies once){'':<6}{p['xla_flops_per_token_loop_bodies_once']:.4g}")
    if p["ratio_analytic_over_xla"]:
        lines.append(f"  analytic / xla{'':<25}{p['ratio_analytic_over_xla']:.4f}")
    lines.append(f"tokens/s ceiling ({p['devices']} chips at peak, {'XLA' if x else 'analytic'} FLOPs):")
    for k, v in p["tokens_per_s_ceiling"].items():
        lines.append(f"  {k:<30}{v:,.0f}")
    return "\n".join(lines)


def _models(teacher: str, student: str, stage: str, atmn: ATMNConfig, ssd_impl: str):
    t = None if stage == "pretrain" else preset(teacher)
    s = preset(student)
    if s.is_ssm and ssd_impl:
        s = dataclasses.replace(s, ssm=dataclasses.replace(s.ssm, impl=ssd_impl))
    if stage == "sbds" and not s.is_spiking:
        s = spiking_config(s, atmn)
    return t, s


def _simulate_devices(n: int) -> None:
    """n CPU devices, set before the backend starts (afterwards the count is fixed). Not under
    `marjax launch` (MARJAX_NUM_PROCESSES set), where the processes' devices are the job's."""
    if not os.environ.get("MARJAX_NUM_PROCESSES"):
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:       # the backend is already up: what it has is what we get
            pass
    if len(jax.devices()) < n:
        raise ConfigError(f"--devices {n}: this process has {len(jax.devices())} {jax.default_backend()} devices "
                          f"(run on CPU with JAX_PLATFORMS=cpu, or set XLA_FLAGS="
                          f"--xla_force_host_platform_device_count={n} before starting)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax plan", description="lower/compile a stage's train step on a "
                                 "simulated mesh: per-device bytes, FLOPs per token, tokens/s ceilings")
    ap.add_argument("--teacher", default="llama-3.2-1b", help="teacher preset (ignored for pretrain)")
    ap.add_argument("--student", default="llamba-1b", help="student preset (sbds: made spiking with [atmn] defaults)")
    ap.add_argument("--stage", default="sbds", choices=STAGES)
    ap.add_argument("--mesh", default="8,1,1", help="data,fsdp,tensor (default 8,1,1)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (global)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per update")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--ssd-impl", default="chunked", help="student SSD impl (default chunked: what accelerators "
                    "run; '' keeps the preset's)")
    ap.add_argument("--kl-chunk", type=int, default=DistillConfig.kl_chunk,
                    help="sequence chunk of the KL loss (DistillConfig.kl_chunk; longer sequences rematerialise "
                    "each chunk's logits in the backward)")
    ap.add_argument("--no-compile", action="store_true", help="lower only (analytic memory)")
    ap.add_argument("--json", default="", metavar="PATH", help="also write the plan as JSON")
    a = ap.parse_args(argv)
    try:
        shape = tuple(int(v) for v in a.mesh.split(","))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--mesh must be three positive integers data,fsdp,tensor, got {a.mesh!r}") from None
    _simulate_devices(math.prod(shape))
    mesh = make_mesh(MeshConfig(*shape))
    train_cfg = TrainConfig(seq_len=a.seq_len, micro_batch=a.micro_batch,
                            batch_tokens=a.seq_len * a.micro_batch * a.accum, compute_dtype=a.compute_dtype,
                            mesh=MeshConfig(*shape))
    teacher, student = _models(a.teacher, a.student, a.stage, ATMNConfig(), a.ssd_impl)
    p = plan(teacher, student, a.stage, mesh, train_cfg, DistillConfig(kl_chunk=a.kl_chunk), compile=not a.no_compile)
    print(format_plan(p))
    if a.json:
        import json   # late import: only for --json
        with open(a.json, "w") as f:
            json.dump(p, f, indent=1, default=str)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
