"""Native kernel lowering from a CPU host: every jitted entry point exported for TPU and CUDA holds
the Pallas SSD kernels as Mosaic (`tpu_custom_call`) or Triton custom calls, never the CPU
interpreter's expansion of them.

The interpreted kernel is recognised by the kernel body's own source locations (`_chunk_terms`,
`_fwd_chunk`, ...) among the module's top-level locations: an interpreted kernel is ordinary
StableHLO carrying them, a native one holds its body serialised inside the custom call. The CPU
export is the positive control for that check.
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

from marjax import ssm
from marjax.config import PRESETS, DistillConfig, MeshConfig
from marjax.distill.stages import make_loss
from marjax.models import lm
from marjax.train.mesh import make_mesh
from marjax.train.state import TrainState
from marjax.train.step import make_step_shardings, make_train_step

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"
# kernel-body functions of pallas_kernels/ssd.py: top-level locations naming them mean interpreted
KERNEL_BODY = ("_chunk_terms", "_fwd_chunk", "_bwd_chunk", "_loop_fwd_kernel", "_loop_bwd_kernel",
               "_grid_fwd_kernel", "_grid_bwd_kernel")


def export_text(fn, args, platform: str) -> str:
    checks = [export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
    return export.export(fn, platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def native_kernels(text: str, platform: str) -> int:
    """Number of native Pallas kernel calls in an exported module."""
    if platform == "tpu":
        return len(re.findall(r"custom_call @tpu_custom_call", text))
    return text.count(f"custom_call @{TRITON}")


def interpreted(text: str) -> bool:
    locs = [ln for ln in text.splitlines() if ln.startswith("#loc")]
    return any(f'"{name}"' in ln for ln in locs for name in KERNEL_BODY)


def ssd_args(b=1, l=40, h=2, p=8, n=4):
    return [S((b, l, h, p), jnp.float32), S((b, l, h), jnp.float32), S((b, l, h, n), jnp.float32),
            S((b, l, h, n), jnp.float32), S((b, h, p, n), jnp.float32)]


def ssd_fns(impl: str):
    def fwd(x, log_a, B, C, h0):
        return ssm.ssd(x, log_a, B, C, initial_state=h0, return_final_state=True, impl=impl, chunk_size=16)

    def loss(*a):
        y, s = fwd(*a)
        return jnp.sum(jnp.sin(y)) + jnp.sum(s * s)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def test_interpreted_kernel_is_detected():
    """Positive control: the CPU export of the Pallas impl is the interpreted kernel."""
    fwd, _ = ssd_fns("pallas")
    text = export_text(fwd, ssd_args(), "cpu")
    assert interpreted(text) and native_kernels(text, "tpu") == 0 and native_kernels(text, "cuda") == 0


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("impl", ssm.IMPLS)
def test_ssd_impls_export_native(impl, platform):
    """Forward (1 kernel) and forward+backward (forward and backward kernels) of every impl."""
    fwd, grad = ssd_fns(impl)
    for fn, kernels in ((fwd, 1), (grad, 2)):
        text = export_text(fn, ssd_args(), platform)
        assert not interpreted(text)
        want = kernels if impl == "pallas" else 0
        assert native_kernels(text, platform) == want, (impl, platform, native_kernels(text, platform))


def pallas_cfg(name: str):
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, ssm=dataclasses.replace(cfg.ssm, impl="pallas", chunk_size=16))


def abstract(tree):
    return jax.tree.map(lambda x: S(x.shape, x.dtype), tree)


@functools.lru_cache(maxsize=None)
def train_step_and_args(stage: str):
    """The stage's real jitted train step (kd: stage 1, dense SSM student; sbds: stage 2, spiking
    student) and abstract arguments: 2 micro-batches of (2, 24) tokens, one device."""
    teacher_cfg = PRESETS["tiny"]
    student_cfg = pallas_cfg("tiny-ssm" if stage == "kd" else "tiny-spiking")
    loss_fn = make_loss(stage, teacher_cfg, student_cfg, DistillConfig(stage=stage))
    tx = optax.adamw(1e-3)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    student = jax.eval_shape(lambda: lm.init_params(jax.random.PRNGKey(0), student_cfg))
    teacher = jax.eval_shape(lambda: lm.init_params(jax.random.PRNGKey(1), teacher_cfg))
    state = TrainState(step=S((), jnp.int32), params=student, opt_state=jax.eval_shape(tx.init, student),
                       rng=S((2,), jnp.uint32))
    batch = {"inputs": S((2, 2, 24), jnp.int32), "targets": S((2, 2, 24), jnp.int32),
             "mask": S((2, 2, 24), jnp.float32)}
    step = make_train_step(loss_fn, tx, mesh, make_step_shardings(state, teacher, batch, mesh), accum_steps=2)
    return step, (state, teacher, batch)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("stage", ["kd", "sbds"])
def test_train_steps_export_native(stage, platform):
    step, args = train_step_and_args(stage)
    text = export_text(step, args, platform)
    assert not interpreted(text)
    # the layers run under lax.scan, so one forward and one backward kernel per micro-batch body
    assert native_kernels(text, platform) >= 2


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_eval_logits_and_decode_export_native(platform):
    cfg = pallas_cfg("tiny-ssm")
    params = abstract(jax.eval_shape(lambda: lm.init_params(jax.random.PRNGKey(0), cfg)))
    logits = jax.jit(functools.partial(lm.forward, cfg=cfg))
    text = export_text(logits, (params, S((2, 24), jnp.int32)), platform)
    assert not interpreted(text) and native_kernels(text, platform) >= 1

    cache = abstract(jax.eval_shape(lambda: lm.init_cache(cfg, 1, 64)))
    step = jax.jit(functools.partial(lm.forward_cached, cfg=cfg))
    # prefill runs the SSD kernel; a one-token decode step is the O(1) recurrence (ssd_step), no kernel
    text = export_text(step, (params, S((1, 16), jnp.int32), cache), platform)
    assert not interpreted(text) and native_kernels(text, platform) >= 1
    text = export_text(step, (params, S((1, 1), jnp.int32), cache), platform)
    assert not interpreted(text) and native_kernels(text, platform) == 0
