"""The native CPU kernels (marjax.kernels.cpu_kernels) against float64 numpy loops, their routing
(the QWeight product: kernel for decode-sized float32 products, XLA otherwise; attention: kernel
for a float32 one-token step over a cache; neither in programs lowered for other platforms), and
the build's failure paths."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax.api import load
from marjax.kernels import cpu_kernels
from marjax.models import lm, quant
from marjax.nn import layers
from marjax.models.quant import QWeight, quantize_int8, quantize_q4, quantize_weight
from quant_oracle import np_dequantize   # tests/quant_oracle.py


@pytest.fixture(scope="module", autouse=True)
def kernels():
    st = cpu_kernels.status()
    if not st.available:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs on x86-64 (AVX2 or AVX-512) with g++: the kernels must build ({st.reason})")
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
    """Groups of 32 (the default): the activations rounded to int16 per group, as the q4 kernel
    rounds them (VNNI); other groupings: float32 activations, float32 summation error only."""
    rng = np.random.default_rng(out * 1000 + k + m)
    w = quantize_int8(jnp.asarray(rng.normal(size=(k, out)), jnp.float32), axis=-2, group=group)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[0, :min(k, 32)] *= 1e3                                            # one loud group
    deq = _np_q(w)
    want = x.astype(np.float64) @ deq.T
    got = np.asarray(jax.jit(cpu_kernels.q8_matmul)(jnp.asarray(x), w.data, w.scale))
    scale = np.abs(x).astype(np.float64) @ np.abs(deq).T            # float32 summation error bound
    assert got.shape == (m, out)
    if group == 32 and k % 32 == 0:
        step = np.repeat(np.abs(x).reshape(m, -1, 32).max(-1) / 32767, 32, axis=-1)   # (m, k)
        bound = 1e-5 * scale + (step / 2) @ np.abs(deq).T + 1e-6
        assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
        # and that rounding exactly: against the oracle of the int16-rounded x, summation error only
        xq = np.where(step > 0, np.round(x / np.where(step > 0, step, 1)) * step, 0).astype(np.float64)
        np.testing.assert_allclose(got, xq @ deq.T, rtol=1e-5, atol=1e-5 * np.max(scale))
    else:
        assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6), np.max(np.abs(got - want) / scale)


@pytest.mark.parametrize("out,k", [(5, 32), (67, 96), (130, 576), (9, 160)])
@pytest.mark.parametrize("m", [1, 3, 4, 6])
def test_q4_matmul_matches_numpy(out, k, m):
    """Within float32 summation error plus the activations' int16 rounding (per group of 32, at
    most half a step of max |x| / 32767 per value); an odd number of groups (k 96, 160) included."""
    rng = np.random.default_rng(out * 1000 + k + m)
    w = quantize_q4(jnp.asarray(rng.normal(size=(k, out)), jnp.float32), axis=-2)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[0, :32] *= 1e3                                                   # one loud group
    deq = _np_q(w)
    want = x.astype(np.float64) @ deq.T
    got = np.asarray(jax.jit(cpu_kernels.q4_matmul)(jnp.asarray(x), w.data, w.scale, w.zero))
    step = np.repeat(np.abs(x).reshape(m, -1, 32).max(-1) / 32767, 32, axis=-1)       # (m, k)
    zero = np.repeat(np.asarray(w.zero, np.float64)[..., 0], 32, axis=1)              # (out, k)
    # the rounding multiplies the scale * q part of each weight (the zero term is exact)
    bound = 1e-5 * (np.abs(x) @ np.abs(deq).T) + (step / 2) @ np.abs(deq - zero).T + 1e-6
    assert got.shape == (m, out)
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    # the oracle with the same int16 rounding of x in the scale * q term (the zero term takes the
    # exact group sums of x) agrees to float32 summation error: the kernel computes that rounding,
    # not merely something within the bound
    xq = np.where(step > 0, np.round(x / np.where(step > 0, step, 1)) * step, 0).astype(np.float64)
    np.testing.assert_allclose(got, xq @ (deq - zero).T + x.astype(np.float64) @ zero.T, rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(x) @ np.abs(deq).T))


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
    tol = 1e-4 if mode in ("q4", "int8") else 1e-6                       # int16 activations (groups of 32)
    for shape, kernel in (((1, 1, 96), True), ((2, 3, 96), True), ((1, cpu_kernels.MAX_ROWS + 1, 96), False)):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        assert (target in _custom_calls(lambda x: x @ auto, x)) == kernel, shape
        assert target not in _custom_calls(lambda x: x @ xla, x)
        got, want = jax.jit(lambda x: x @ auto)(x), jax.jit(lambda x: x @ xla)(x)
        assert got.shape == want.shape == shape[:-1] + (40,)
        # the int16 rounding's worst case (test_q4_matmul_matches_numpy) scales with sum |x| |w|
        mag = float(jnp.max(jnp.abs(x) @ jnp.abs(xla.dequantize())))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol * mag)
    assert target not in _custom_calls(lambda x: x @ auto, jnp.ones((1, 1, 96), jnp.bfloat16))
    # the transposed view (the tied head's embed.T) contracts over the other axis: no kernel
    table = quantize_weight(w32.T, -1, mode)                              # (40, 96) as stored
    x = jnp.ones((1, 96), jnp.float32)
    assert target in _custom_calls(lambda x: x @ table.T, x)
    np.testing.assert_allclose(np.asarray(x @ table.T), np.asarray(x @ table.T.dequantize()), rtol=tol, atol=tol)
    assert target not in _custom_calls(lambda x: x @ table, jnp.ones((1, 40), jnp.float32))


@pytest.mark.parametrize("mode", ["int8", "bf16", "q4"])
def test_products_sharing_x_run_as_one_call(mode):
    """quant.matmul_many (layers.project's route for QWeights): one kernel call with a result per
    matrix, each equal to its own product; matrices of different kinds fall back to one call each."""
    rng = np.random.default_rng(5)
    ws = [quantize_weight(jnp.asarray(rng.normal(size=(64, o)), jnp.float32), -2, mode) for o in (40, 8, 130)]
    x = jnp.asarray(rng.normal(size=(1, 2, 64)), jnp.float32)
    target = f"marjax_{ {'int8': 'q8', 'bf16': 'bf16', 'q4': 'q4'}[mode]}_matmul"
    fn = lambda x: layers.project(x, ws)
    assert _custom_calls(fn, x).count(target) == 1
    got, want = jax.jit(fn)(x), [jax.jit(lambda x, w=w: x @ w)(x) for w in ws]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))    # same kernel, same row order
    mixed = [ws[0], quantize_weight(jnp.asarray(rng.normal(size=(64, 8)), jnp.float32), -2,
                                    "bf16" if mode != "bf16" else "int8")]
    hlo = _custom_calls(lambda x: layers.project(x, mixed), x)
    assert hlo.count("@marjax_") == 2, hlo.count("@marjax_")
    plain = [jnp.ones((64, 3)), jnp.ones((64, 5))]
    assert [y.shape for y in layers.project(x, plain)] == [(1, 2, 3), (1, 2, 5)]


def test_vmap_over_a_kernel_product():
    w = quantize_weight(jnp.asarray(np.random.default_rng(2).normal(size=(64, 8)), jnp.float32), -2, "int8")
    xs = jnp.asarray(np.random.default_rng(3).normal(size=(3, 1, 64)), jnp.float32)
    got = jax.vmap(lambda x: x @ w)(xs)
    # one kernel call a batch element: each the unbatched call's result, bit for bit
    np.testing.assert_array_equal(np.asarray(got), np.stack([np.asarray(jax.jit(lambda x: x @ w)(x)) for x in xs]))
    mag = float(jnp.max(jnp.abs(xs) @ jnp.abs(w.dequantize())))       # the int16 rounding scales with it
    np.testing.assert_allclose(np.asarray(got), np.asarray(xs @ w.dequantize()), rtol=1e-4, atol=1e-4 * mag)


def test_other_platforms_lower_without_the_kernel():
    """A program exported for TPU from this CPU holds no CPU custom call (platform_dependent)."""
    w = quantize_weight(jnp.ones((64, 32), jnp.float32), -2, "int8")
    exp = jax.export.export(jax.jit(lambda x: x @ w), platforms=["tpu"])(jax.ShapeDtypeStruct((1, 64), jnp.float32))
    assert "marjax_q8_matmul" not in exp.mlir_module()


def test_decode_step_uses_the_kernel():
    """A quantised decode step of the tiny preset calls the kernel for every block product and
    the head, four calls a layer (q/k/v together, o, gate/up together, down), and the attention
    kernel in every layer; its prefill (more rows than MAX_ROWS) neither."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the preset's weights are random
        m = load("tiny")
    cfg = m.config
    q = quant.quantize_params(lm.unroll_layers(m.params), "int8")
    cache = lm.init_cache(cfg, 1, 32, unrolled=True)
    step = jax.jit(quant.forward_cached_q, static_argnames="cfg")
    hlo = step.lower(q, jnp.zeros((1, 1), jnp.int32), cache, cfg=cfg).as_text()
    assert hlo.count("marjax_q8_matmul") == 4 * cfg.n_layers + 1, hlo.count("marjax_q8_matmul")
    assert hlo.count("marjax_attn_decode") >= cfg.n_layers
    prefill = step.lower(q, jnp.zeros((1, cpu_kernels.MAX_ROWS + 1), jnp.int32), cache, cfg=cfg).as_text()
    assert "marjax_q8_matmul" not in prefill and "marjax_attn_decode" not in prefill


def _np_attention(q, k, v, n):
    """float64 loop: per batch row and query head, softmax over the first n keys of its KV head."""
    b, h, d = q.shape
    r = h // k.shape[2]
    out = np.zeros((b, h, d))
    for i in range(b):
        for j in range(h):
            if n[i] == 0:
                continue
            kk, vv = k[i, :n[i], j // r].astype(np.float64), v[i, :n[i], j // r].astype(np.float64)
            s = kk @ q[i, j].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ vv
    return out


# (b, h, g, d, S, n per row): GQA groups of 1-6 heads, d not a multiple of 16 (masked tails; the
# generic path), d of 16-128 with up to 6 heads a group (the register path: SmolLM2's 3 x 64,
# Llama-3.2-1B's 4 x 64), key counts that leave a partial 16-key block, several 256-key chunks
# (merged), rows with different lengths, none or all keys valid
ATTN_CASES = [(1, 9, 3, 64, 300, [257]), (2, 4, 4, 20, 600, [1, 600]), (3, 8, 2, 33, 1000, [0, 513, 999]),
              (1, 2, 1, 16, 3000, [2999]), (1, 9, 3, 64, 40, [40]), (1, 32, 8, 64, 700, [699]),
              (2, 6, 2, 128, 300, [17, 300]), (1, 6, 1, 64, 600, [0]), (1, 6, 1, 64, 600, [600]),
              (1, 8, 2, 32, 100, [77]), (1, 4, 1, 128, 50, [50])]


@pytest.mark.parametrize("b,h,g,d,S,n", ATTN_CASES)
def test_attn_decode_matches_numpy(b, h, g, d, S, n):
    rng = np.random.default_rng(S + d)
    q = (3 * rng.normal(size=(b, h, d))).astype(np.float32)      # peaked softmaxes too
    k, v = (rng.normal(size=(2, b, S, g, d))).astype(np.float32)
    n = np.array(n, np.int32)
    got = np.asarray(jax.jit(cpu_kernels.attn_decode)(q, k, v, n))
    np.testing.assert_allclose(got, _np_attention(q, k, v, n), rtol=1e-5, atol=1e-5)
    if n.min() == 0:
        assert np.all(got[n == 0] == 0)


def test_attn_decode_argument_errors():
    q, k, n = jnp.ones((1, 9, 64)), jnp.ones((1, 8, 3, 64)), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="g dividing h"):
        cpu_kernels.attn_decode(jnp.ones((1, 8, 64)), k, k, n)
    with pytest.raises(ValueError, match="g dividing h"):
        cpu_kernels.attn_decode(q, k, jnp.ones((1, 9, 3, 64)), n)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.attn_decode(q, k.astype(jnp.bfloat16), k, n)
    with pytest.raises(ValueError, match=r"integer n \(b,\)"):
        cpu_kernels.attn_decode(q, k, k, jnp.ones((2,), jnp.int32))


def _attn_case(dtype=jnp.float32, l=1, S=40, pos=17):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the preset's weights are random
        m = load("tiny")
    cfg, rng = m.config, np.random.default_rng(pos)
    p = jax.tree.map(lambda a: a[0].astype(dtype), m.params.blocks.mixer)
    x = jnp.asarray(rng.normal(size=(2, l, cfg.d_model)), dtype)
    shape = (2, S, cfg.n_kv_heads, cfg.head_dim)
    cache = tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
    positions = jnp.broadcast_to(pos + jnp.arange(l)[None], (2, l))
    return p, x, cfg, positions, cache


@pytest.mark.parametrize("pos", [0, 17, 39])
def test_attention_decode_step_routes_and_agrees(pos):
    """layers.attention's one-token float32 step over a cache runs the kernel (seen in the lowered
    program) and agrees with XLA's einsums, cache update included; impl="xla" does not call it."""
    p, x, cfg, positions, cache = _attn_case(pos=pos)
    run = lambda impl: jax.jit(lambda x, pos, c: layers.attention(p, x, cfg, pos, c, impl=impl))
    assert "marjax_attn_decode" in run("auto").lower(x, positions, cache).as_text()
    assert "marjax_attn_decode" not in run("xla").lower(x, positions, cache).as_text()
    (got, gc), (want, wc) = run("auto")(x, positions, cache), run("xla")(x, positions, cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, wc):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype,l,cached", [(jnp.bfloat16, 1, True), (jnp.float32, 3, True), (jnp.float32, 1, False)])
def test_attention_kernel_only_for_float32_decode(dtype, l, cached):
    """bfloat16 caches, prefill (l > 1) and cache-free attention keep XLA's einsums."""
    p, x, cfg, positions, cache = _attn_case(dtype, l)
    fn = jax.jit(lambda x, pos, c: layers.attention(p, x, cfg, pos, c if cached else None))
    assert "marjax_attn_decode" not in fn.lower(x, positions, cache).as_text()
    with pytest.raises(ValueError, match="impl"):
        layers.attention(p, x, cfg, positions, cache, impl="flash")


def test_attention_exported_for_tpu_has_no_kernel():
    p, x, cfg, positions, cache = _attn_case()
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    exp = jax.export.export(jax.jit(lambda x, pos, c: layers.attention(p, x, cfg, pos, c)), platforms=["tpu"])(
        spec(x), spec(positions), jax.tree.map(spec, cache))
    assert "marjax_attn_decode" not in exp.mlir_module()


def test_status_off_switch_and_failed_build(monkeypatch, tmp_path):
    """MARJAX_CPU_KERNELS=0 turns the kernels off; a compiler that fails leaves them off with a
    warning that names the command (callers then use XLA's matmul)."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    st = cpu_kernels.status.__wrapped__()
    assert not st.available and cpu_kernels.ENV_SWITCH in st.reason
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "avx")                # a typo: off, with a warning
    with pytest.warns(RuntimeWarning, match="not 0, 1 or a build"):
        st = cpu_kernels.status.__wrapped__()
    assert not st.available and "unknown" in st.reason
    if "avx512f" not in (cpu_kernels.cpu_flags() or set()):           # a build this CPU cannot run
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "avx512")
        st = cpu_kernels.status.__wrapped__()
        assert not st.available and "lacks avx512f" in st.reason and "avx2" not in st.reason
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))      # nothing cached: it must compile
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        st = cpu_kernels.status.__wrapped__()
    assert not st.available and "failed" in st.reason
    assert not list((tmp_path / "kernels").glob("*.so"))          # no half-written library left


def test_concurrent_builds_compile_once(monkeypatch, tmp_path):
    """Two processes (here threads) that find no cached library: one compiles, the other waits for
    its file lock and loads the result instead of compiling it again beside it."""
    import subprocess
    import threading
    import time
    calls = []

    def fake_compiler(cmd, **kw):          # a slow compile that writes the output file
        calls.append(cmd)
        time.sleep(0.5)
        with open(cmd[-1], "wb") as f:
            f.write(b"lib")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(cpu_kernels.subprocess, "run", fake_compiler)
    out = []
    threads = [threading.Thread(target=lambda: out.append(cpu_kernels._build("c++", {"avx2"}, "avx2")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 2 and out[0] == out[1] and out[0].read_bytes() == b"lib"


def test_cpu_model_and_flags_read_proc_cpuinfo(monkeypatch, tmp_path):
    """cpu_flags / cpu_model against an independent regex read of /proc/cpuinfo, and their
    fallbacks where the file is unreadable."""
    import platform
    import re
    from pathlib import Path
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    if model:
        assert cpu_kernels.cpu_model() == model.group(1).strip()
    if flags:
        assert cpu_kernels.cpu_flags() == set(flags.group(1).split())
    real_read = Path.read_text

    def unreadable(self, *a, **k):
        if str(self) == "/proc/cpuinfo":
            raise OSError("no /proc here")
        return real_read(self, *a, **k)
    monkeypatch.setattr(Path, "read_text", unreadable)
    assert cpu_kernels.cpu_flags() is None and cpu_kernels.cpu_model() == platform.processor()


def test_select_isa_prefers_avx512_and_honours_a_forced_build():
    avx512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni"}
    assert cpu_kernels.select_isa(avx512) == "avx512"
    assert cpu_kernels.select_isa(avx512, forced="avx2") == "avx2"
    assert cpu_kernels.select_isa(avx512 - {"avx512_vnni"}) == "avx2"      # Skylake-X: no VNNI
    assert cpu_kernels.select_isa({"avx2", "fma", "f16c"}) == "avx2"       # Zen 2/3
    assert cpu_kernels.select_isa({"avx2", "fma", "f16c"}, forced="avx512") is None
    assert cpu_kernels.select_isa({"avx", "f16c"}) is None                 # Sandy/Ivy Bridge
    assert cpu_kernels.select_isa(None) is None


def test_status_names_the_build_the_library_reports():
    """The loaded library's own marjax_kernels_isa() (the preprocessor's choice from the compiler's
    target) is what status() selected from /proc/cpuinfo."""
    import ctypes
    st = cpu_kernels.status()
    switch = os.environ.get(cpu_kernels.ENV_SWITCH, "").strip().lower()
    assert st.isa == cpu_kernels.select_isa(cpu_kernels.cpu_flags(), switch if switch in cpu_kernels.ISA_FLAGS else None)
    lib = ctypes.cdll.LoadLibrary(st.library)
    lib.marjax_kernels_isa.restype = ctypes.c_char_p
    assert lib.marjax_kernels_isa().decode() == st.isa and f"({st.isa} build)" in st.reason


def test_the_other_build_compiles_and_agrees(tmp_path):
    """Both builds stay alive whichever CPU runs the suite: on an AVX-512 CPU the AVX2 build runs
    this file's numpy-oracle tests in a child process (MARJAX_CPU_KERNELS=avx2); on an AVX2-only
    CPU the AVX-512 build is compiled for an Ice Lake target (it cannot run here)."""
    import subprocess
    import sys
    if cpu_kernels.status().isa == "avx512":
        env = dict(os.environ, **{cpu_kernels.ENV_SWITCH: "avx2", cpu_kernels.ENV_CACHE: str(tmp_path)})
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__,
                            "-k", "matches_numpy or names_the_build"], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert list((tmp_path / "kernels").glob("*.so"))      # it built its own (avx2) library
    else:
        cxx = cpu_kernels._compiler()
        # -O0: the same intrinsics and target checks in half the compile time (9 s against 18 here)
        flags = [{"-march=native": "-march=icelake-server", "-O3": "-O0"}.get(f, f) for f in cpu_kernels.FLAGS]
        r = subprocess.run(cpu_kernels._compile_command(cxx, flags, tmp_path / "k.so"), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        # the AVX-512 loops were compiled: their VNNI instruction is in the library
        dis = subprocess.run(["objdump", "-d", str(tmp_path / "k.so")], capture_output=True, text=True)
        if dis.returncode == 0:
            assert "vpdpbusd" in dis.stdout


def _np_ssd(x, log_a, B, C, h0):
    """The SSD recurrence token by token in float64 numpy: y (b, l, h, p), final state (b, h, p, n)."""
    x, log_a, B, C, S = (np.asarray(a, np.float64) for a in (x, log_a, B, C, h0))
    y = np.zeros(x.shape)
    for t in range(x.shape[1]):
        S = np.exp(log_a[:, t])[..., None, None] * S + x[:, t, :, :, None] * B[:, t, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", S, C[:, t])
    return y, S


def _ssd_inputs(b, l, h, p, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, l, h, p)).astype(np.float32),
            -np.log1p(np.exp(rng.normal(size=(b, l, h)))).astype(np.float32),     # -softplus: log decays < 0
            (rng.normal(size=(b, l, h, n)) / np.sqrt(n)).astype(np.float32),
            rng.normal(size=(b, l, h, n)).astype(np.float32),
            rng.normal(size=(b, h, p, n)).astype(np.float32))


# (b, l, h, p, n): 8-wide state rows in groups of 4 and single rows (p = 6), rows of no multiple of
# 8 (the scalar loop), one token, and more (batch, head) pairs than cores
SSD_CASES = [(2, 50, 3, 6, 64), (1, 9, 2, 5, 13), (1, 1, 1, 1, 8), (3, 33, 4, 8, 16)]


@pytest.mark.parametrize("b,l,h,p,n", SSD_CASES)
def test_ssd_scan_matches_numpy(b, l, h, p, n):
    args = _ssd_inputs(b, l, h, p, n, seed=l + n)
    y, s = jax.jit(cpu_kernels.ssd_scan)(*map(jnp.asarray, args))
    y_want, s_want = _np_ssd(*args)
    assert y.shape == (b, l, h, p) and s.shape == (b, h, p, n)
    np.testing.assert_allclose(np.asarray(y), y_want, rtol=1e-5, atol=1e-5 * np.max(np.abs(y_want)))
    np.testing.assert_allclose(np.asarray(s), s_want, rtol=1e-5, atol=1e-5 * np.max(np.abs(s_want)))


def test_ssd_scan_argument_errors():
    x, a, B, C, h0 = map(jnp.asarray, _ssd_inputs(1, 4, 2, 3, 8))
    with pytest.raises(ValueError, match="h0"):
        cpu_kernels.ssd_scan(x, a, B, C, h0[..., :4])
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.ssd_scan(x.astype(jnp.bfloat16), a, B, C, h0)


def test_auto_ssd_routes_long_sequences_to_the_kernel():
    """impl="auto" on the CPU: the chunk scan up to 256 tokens (the pipeline's results), the kernel
    above for values; its gradient is the chunk scan's; a program lowered for TPU holds no kernel."""
    from marjax import ssm
    assert ssm.auto_choice("cpu", 256) == ("chunk_scan", 32) and ssm.auto_choice("cpu", 257) == ("native", 32)
    x, a, B, C, h0 = map(jnp.asarray, _ssd_inputs(1, 300, 2, 8, 16, seed=5))
    f = lambda *z: ssm.ssd(*z, initial_state=h0, impl="auto", return_final_state=True)   # noqa: E731
    assert "marjax_ssd_scan" in jax.jit(f).lower(x, a, B, C).as_text()
    assert "marjax_ssd_scan" not in jax.jit(f).lower(x[:, :256], a[:, :256], B[:, :256], C[:, :256]).as_text()
    y, s = jax.jit(f)(x, a, B, C)
    y_want, s_want = _np_ssd(x, a, B, C, h0)
    np.testing.assert_allclose(np.asarray(y), y_want, rtol=1e-4, atol=1e-4 * np.max(np.abs(y_want)))
    np.testing.assert_allclose(np.asarray(s), s_want, rtol=1e-4, atol=1e-4 * np.max(np.abs(s_want)))
    loss = lambda impl: (lambda *z: jnp.sum(jnp.sin(ssm.ssd(*z, initial_state=h0, impl=impl, chunk_size=32))))  # noqa: E731
    g = jax.jit(jax.grad(loss("native"), argnums=(0, 1, 2, 3)))(x, a, B, C)
    g_want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2, 3)))(x, a, B, C)
    for got, want in zip(g, g_want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    exp = jax.export.export(jax.jit(lambda x: ssm.ssd(x, a, B, C, impl="native")), platforms=["tpu"])(spec)
    assert "marjax_ssd_scan" not in exp.mlir_module()
