"""The native CPU kernels (marjax.kernels.cpu_kernels) against float64 numpy products, the QWeight
product's routing (kernel for decode-sized float32 products, XLA otherwise, and the kernel absent
from programs lowered for other platforms), and the build's failure paths."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.api import load
from marjax.kernels import cpu_kernels
from marjax.models import lm, quant
from marjax.models.quant import QWeight, quantize_int8, quantize_q4, quantize_weight
from quant_oracle import np_dequantize   # tests/quant_oracle.py


@pytest.fixture(scope="module", autouse=True)
def kernels():
    st = cpu_kernels.status()
    if not st.available:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs on x86-64 with AVX-512 and g++: the kernels must build ({st.reason})")
        pytest.skip(f"marjax CPU kernels unavailable here: {st.reason}")


def _np_q(w: QWeight) -> np.ndarray:
    """The kernels' (out, in) matrix in float64, from the stored int8 or 4-bit values."""
    return np_dequantize(w, np.float64).T


# (out, in, group): partial tiles of 4 output rows, contractions not a multiple of 16 (masked
# tails), one group per row (in % group != 0) and several groups per row
SHAPES = [(5, 40, 32), (67, 96, 32), (1, 16, 32), (130, 64, 16), (33, 48, 48)]


@pytest.mark.parametrize("out,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 4, 6, 16])
def test_q8_matmul_matches_numpy(out, k, group, m):
    rng = np.random.default_rng(out * 1000 + k + m)
    w = quantize_int8(jnp.asarray(rng.normal(size=(k, out)), jnp.float32), axis=-2, group=group)
    x = rng.normal(size=(m, k)).astype(np.float32)
    want = x.astype(np.float64) @ _np_q(w).T
    got = np.asarray(jax.jit(cpu_kernels.q8_matmul)(jnp.asarray(x), w.data, w.scale))
    scale = np.abs(x).astype(np.float64) @ np.abs(_np_q(w)).T     # float32 summation error bound
    assert got.shape == (m, out)
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6), np.max(np.abs(got - want) / scale)


@pytest.mark.parametrize("out,k", [(5, 32), (67, 96), (130, 576)])
@pytest.mark.parametrize("m", [1, 3, 4, 6])
def test_q4_matmul_matches_numpy(out, k, m):
    """Within float32 summation error plus the activations' int16 rounding (per group of 32,
    at most half a step of max |x| / 32767 per value)."""
    rng = np.random.default_rng(out * 1000 + k + m)
    w = quantize_q4(jnp.asarray(rng.normal(size=(k, out)), jnp.float32), axis=-2)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[0, :32] *= 1e3                                                   # one loud group
    deq = _np_q(w)
    want = x.astype(np.float64) @ deq.T
    got = np.asarray(jax.jit(cpu_kernels.q4_matmul)(jnp.asarray(x), w.data, w.scale, w.zero))
    step = np.repeat(np.abs(x).reshape(m, -1, 32).max(-1) / 32767, 32, axis=-1)       # (m, k)
    bound = 1e-5 * (np.abs(x) @ np.abs(deq).T) + (step / 2) @ np.abs(deq).T + 1e-6
    assert got.shape == (m, out)
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    # the int16 rounding is real, not an accident of the tolerance: it is below 1e-4 relative
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(x) @ np.abs(deq).T)


@pytest.mark.parametrize("out,k", [(5, 40), (67, 96), (9, 17)])
@pytest.mark.parametrize("m", [1, 5])
def test_bf16_matmul_matches_numpy(out, k, m):
    rng = np.random.default_rng(out + k + m)
    w = jnp.asarray(rng.normal(size=(out, k)), jnp.bfloat16)
    x = rng.normal(size=(m, k)).astype(np.float32)
    want = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T
    got = np.asarray(jax.jit(cpu_kernels.bf16_matmul)(jnp.asarray(x), w))
    scale = np.abs(x).astype(np.float64) @ np.abs(np.asarray(w.astype(jnp.float32), np.float64)).T
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6)


def test_kernel_argument_errors():
    x = jnp.ones((2, 32), jnp.float32)
    w = quantize_int8(jnp.ones((32, 8)), axis=-2)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.q8_matmul(x.astype(jnp.bfloat16), w.data, w.scale)
    with pytest.raises(ValueError, match=r"x \(m, in\)"):
        cpu_kernels.q8_matmul(jnp.ones((2, 31)), w.data, w.scale)
    with pytest.raises(ValueError, match="float16 scale"):
        cpu_kernels.q8_matmul(x, w.data, w.scale.astype(jnp.float32))
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_kernels.bf16_matmul(x, w.data)
    w4 = quantize_q4(jnp.ones((64, 8)), axis=-2)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernels.q4_matmul(jnp.ones((1, 40)), w4.data, w4.scale, w4.zero)
    with pytest.raises(ValueError, match="uint8"):
        cpu_kernels.q4_matmul(jnp.ones((1, 64)), w4.data, w4.scale, w4.zero.astype(jnp.float32))


def _custom_calls(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("mode", ["int8", "bf16", "q4"])
def test_qweight_product_routes_and_agrees(mode):
    """x @ QWeight: decode-sized float32 products run the kernel (seen in the lowered program),
    prefill-sized, bfloat16 or impl="xla" ones the dequantised matmul; all agree."""
    rng = np.random.default_rng(0)
    w32 = jnp.asarray(rng.normal(size=(96, 40)), jnp.float32)            # the model's (in, out)
    auto = quantize_weight(w32, -2, mode)
    xla = quantize_weight(w32, -2, mode, impl="xla")
    target = f"marjax_{ {'int8': 'q8', 'bf16': 'bf16', 'q4': 'q4'}[mode]}_matmul"
    tol = 1e-4 if mode == "q4" else 1e-6                                   # q4: int16 activations
    for shape, kernel in (((1, 1, 96), True), ((2, 3, 96), True), ((1, cpu_kernels.MAX_ROWS + 1, 96), False)):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        assert (target in _custom_calls(lambda x: x @ auto, x)) == kernel, shape
        assert target not in _custom_calls(lambda x: x @ xla, x)
        got, want = jax.jit(lambda x: x @ auto)(x), jax.jit(lambda x: x @ xla)(x)
        assert got.shape == want.shape == shape[:-1] + (40,)
        # q4's worst case (test_q4_matmul_matches_numpy) scales with sum |x| |w|
        mag = float(jnp.max(jnp.abs(x) @ jnp.abs(xla.dequantize())))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol * mag)
    assert target not in _custom_calls(lambda x: x @ auto, jnp.ones((1, 1, 96), jnp.bfloat16))
    # the transposed view (the tied head's embed.T) contracts over the other axis: no kernel
    table = quantize_weight(w32.T, -1, mode)                              # (40, 96) as stored
    x = jnp.ones((1, 96), jnp.float32)
    assert target in _custom_calls(lambda x: x @ table.T, x)
    np.testing.assert_allclose(np.asarray(x @ table.T), np.asarray(x @ table.T.dequantize()), rtol=tol, atol=tol)
    assert target not in _custom_calls(lambda x: x @ table, jnp.ones((1, 40), jnp.float32))


def test_vmap_over_a_kernel_product():
    w = quantize_weight(jnp.asarray(np.random.default_rng(2).normal(size=(64, 8)), jnp.float32), -2, "int8")
    xs = jnp.asarray(np.random.default_rng(3).normal(size=(3, 1, 64)), jnp.float32)
    got = jax.vmap(lambda x: x @ w)(xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xs @ w.dequantize()), rtol=1e-5, atol=1e-5)


def test_other_platforms_lower_without_the_kernel():
    """A program exported for TPU from this CPU holds no CPU custom call (platform_dependent)."""
    w = quantize_weight(jnp.ones((64, 32), jnp.float32), -2, "int8")
    exp = jax.export.export(jax.jit(lambda x: x @ w), platforms=["tpu"])(jax.ShapeDtypeStruct((1, 64), jnp.float32))
    assert "marjax_q8_matmul" not in exp.mlir_module()


def test_decode_step_uses_the_kernel():
    """A quantised decode step of the tiny preset calls the kernel for every block product and
    the head; its prefill (more rows than MAX_ROWS) does not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the preset's weights are random
        m = load("tiny")
    cfg = m.config
    q = quant.quantize_params(lm.unroll_layers(m.params), "int8")
    cache = lm.init_cache(cfg, 1, 32, unrolled=True)
    step = jax.jit(quant.forward_cached_q, static_argnames="cfg")
    hlo = step.lower(q, jnp.zeros((1, 1), jnp.int32), cache, cfg=cfg).as_text()
    assert hlo.count("marjax_q8_matmul") >= 7 * cfg.n_layers + 1, hlo.count("marjax_q8_matmul")
    prefill = step.lower(q, jnp.zeros((1, cpu_kernels.MAX_ROWS + 1), jnp.int32), cache, cfg=cfg).as_text()
    assert "marjax_q8_matmul" not in prefill


def test_status_off_switch_and_failed_build(monkeypatch, tmp_path):
    """MARJAX_CPU_KERNELS=0 turns the kernels off; a compiler that fails leaves them off with a
    warning that names the command (callers then use XLA's matmul)."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    st = cpu_kernels.status.__wrapped__()
    assert not st.available and cpu_kernels.ENV_SWITCH in st.reason
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))      # nothing cached: it must compile
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        st = cpu_kernels.status.__wrapped__()
    assert not st.available and "failed" in st.reason
    assert not list((tmp_path / "kernels").glob("*.so"))          # no half-written library left
