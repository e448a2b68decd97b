"""Every SSD implementation against the token-by-token reference: values, final states, gradients
for all inputs, bf16, state carry, the mixing matrix, vmap/jit, the decode step and input errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marjax import ssm
from marjax.errors import MarjaxError
from marjax.ssm import associative as assoc_mod

IMPL_CASES = [
    ("chunked", {"chunk_size": 16}),
    ("chunked", {"chunk_size": 16, "inter_chunk": "associative"}),
    ("chunked", {"chunk_size": 4}),
    ("chunk_scan", {"chunk_size": 16}),
    ("associative", {}),
    ("hybrid", {"chunk_size": 16}),
    ("pallas", {"chunk_size": 16}),
    ("auto", {"chunk_size": 16}),
    ("native", {"chunk_size": 16}),    # the CPU kernel where built (tests/kernels), else the chunk scan
]
IDS = ["chunked-scan", "chunked-assoc", "chunked-q4", "chunk_scan", "associative", "hybrid", "pallas", "auto", "native"]


def make_inputs(b=2, l=37, h=3, p=8, n=4, dtype=jnp.float32, seed=0, decay_scale=1.0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    return dict(
        x=jax.random.normal(k[0], (b, l, h, p)).astype(dtype),
        log_a=(-decay_scale * jax.nn.softplus(jax.random.normal(k[1], (b, l, h)))).astype(dtype),
        B=jax.random.normal(k[2], (b, l, h, n)).astype(dtype),
        C=jax.random.normal(k[3], (b, l, h, n)).astype(dtype),
        D=jax.random.normal(k[5], (h,)).astype(dtype),
        initial_state=jax.random.normal(k[4], (b, h, p, n)).astype(dtype),
    )


def run(inp, impl, **kw):
    f = jax.jit(functools.partial(ssm.ssd, impl=impl, return_final_state=True, **kw))
    return f(inp["x"], inp["log_a"], inp["B"], inp["C"], D=inp["D"], initial_state=inp["initial_state"])


def grads(inp, impl, **kw):
    names = ("x", "log_a", "B", "C", "D", "initial_state")
    b, l, h, p = inp["x"].shape
    wy = jax.random.normal(jax.random.PRNGKey(7), (b, l, h, p))
    ws = jax.random.normal(jax.random.PRNGKey(8), inp["initial_state"].shape)

    def loss(*args):
        a = dict(zip(names, args))
        y, s = ssm.ssd(a["x"], a["log_a"], a["B"], a["C"], D=a["D"], initial_state=a["initial_state"],
                       return_final_state=True, impl=impl, **kw)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(jnp.sin(s) * ws)

    g = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*(inp[k] for k in names))
    return dict(zip(names, g))


def close(a, b, rtol):
    """Max abs error relative to the reference's max magnitude."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = max(1.0, float(np.max(np.abs(b))))
    err = float(np.max(np.abs(a - b)))
    assert err <= rtol * scale, f"max abs err {err} > {rtol} * {scale}"


@pytest.fixture(scope="module")
def f32_case():
    inp = make_inputs()
    return inp, run(inp, "reference"), grads(inp, "reference")


@pytest.mark.parametrize("impl,kw", IMPL_CASES, ids=IDS)
def test_values_and_grads_match_reference_f32(f32_case, impl, kw):
    inp, (y_ref, s_ref), g_ref = f32_case
    y, s = run(inp, impl, **kw)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32 and s.dtype == jnp.float32
    close(y, y_ref, 1e-4)
    close(s, s_ref, 1e-4)
    g = grads(inp, impl, **kw)
    for k in g_ref:
        assert g[k].shape == inp[k].shape, k
        close(g[k], g_ref[k], 1e-4)


@pytest.mark.parametrize("unroll", [1, 3, 4, 16])
def test_chunk_scan_unroll_matches_reference(f32_case, unroll):
    """ssd_chunk_scan walks 10 chunks of 4 (l = 37, padded to 40) with `unroll` chunks per scan
    iteration, dividing the chunk count or not, or more than it: values, state and grads."""
    from marjax.ssm.chunked import ssd_chunk_scan
    inp, (y_ref, s_ref), g_ref = f32_case
    args = [inp[k] for k in ("x", "log_a", "B", "C")]

    def f(x, log_a, B, C):
        y, s = ssd_chunk_scan(x, log_a, B, C, inp["initial_state"], 4, unroll=unroll)
        return y + inp["D"][:, None] * x, s            # the reference's output includes D x
    y, s = jax.jit(f)(*args)
    close(y, y_ref, 1e-4)
    close(s, s_ref, 1e-4)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] * jnp.cos(a[0])), argnums=(0, 1, 2, 3)))(*args)
    g_want = jax.jit(jax.grad(lambda *a: jnp.sum(ssm.ssd(*a, D=inp["D"], initial_state=inp["initial_state"],
                                                          impl="reference") * jnp.cos(a[0])),
                              argnums=(0, 1, 2, 3)))(*args)
    for got, want in zip(g, g_want):
        close(got, want, 1e-4)


@pytest.mark.parametrize("impl,kw", [IMPL_CASES[0], IMPL_CASES[6], IMPL_CASES[8]], ids=["chunked", "pallas", "native"])
def test_bf16_matches_reference(impl, kw):
    inp = make_inputs(l=21, dtype=jnp.bfloat16, seed=1)
    y_ref, s_ref = run(inp, "reference")
    y, s = run(inp, impl, **kw)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    close(y, y_ref, 2e-2)      # bf16 output rounding
    close(s, s_ref, 1e-4)      # same bf16 inputs, float32 accumulation in both
    g_ref, g = grads(inp, "reference"), grads(inp, impl, **kw)
    for k in g_ref:
        assert g[k].dtype == jnp.bfloat16, k
        close(g[k], g_ref[k], 3e-2)


def test_bf16_close_to_f32_oracle():
    inp = make_inputs(l=21, seed=2)
    y32, s32 = run(inp, "reference")
    y16, s16 = run({k: v.astype(jnp.bfloat16) for k, v in inp.items()}, "auto")
    close(y16, y32, 5e-2)
    close(s16, s32, 5e-2)


@pytest.mark.parametrize("impl", ["chunked", "chunk_scan", "reference", "pallas", "native"])
def test_state_carry_two_calls_equal_one(impl):
    inp = make_inputs(l=37, seed=3)
    y_all, s_all = run(inp, impl)
    first = {k: (v[:, :20] if k in ("x", "log_a", "B", "C") else v) for k, v in inp.items()}
    second = {k: (v[:, 20:] if k in ("x", "log_a", "B", "C") else v) for k, v in inp.items()}
    y1, s1 = run(first, impl)
    second["initial_state"] = s1
    y2, s2 = run(second, impl)
    close(jnp.concatenate([y1, y2], 1), y_all, 1e-5)
    close(s2, s_all, 1e-5)


def test_strong_decays_stay_accurate():
    # log decays down to about -20 per token: cumsum-difference segsums would lose precision here
    inp = make_inputs(l=40, seed=4, decay_scale=8.0)
    y_ref, s_ref = run(inp, "reference")
    for impl, kw in (IMPL_CASES[0], IMPL_CASES[3], IMPL_CASES[4], IMPL_CASES[6], IMPL_CASES[8]):
        y, s = run(inp, impl, **kw)
        close(y, y_ref, 1e-4)
        close(s, s_ref, 1e-4)


def test_materialize_mixer_matches_reference():
    inp = make_inputs(l=19, seed=5)
    M = jax.jit(ssm.materialize_mixer)(inp["log_a"], inp["B"], inp["C"])
    assert M.shape == (2, 3, 19, 19)
    assert float(jnp.max(jnp.abs(jnp.triu(M, 1)))) == 0.0
    y_mix = jnp.einsum("bhts,bshp->bthp", M, inp["x"]) + inp["D"][:, None] * inp["x"]
    y_ref = jax.jit(functools.partial(ssm.ssd, impl="reference"))(inp["x"], inp["log_a"], inp["B"], inp["C"],
                                                                   D=inp["D"])
    close(y_mix, y_ref, 1e-5)


@pytest.mark.parametrize("impl", ["chunked", "chunk_scan", "pallas", "auto", "native"])
def test_vmap_and_jit(impl):
    inp = make_inputs(b=1, l=13, seed=6)
    args = [jnp.stack([inp[k], 0.5 * inp[k]]) for k in ("x", "log_a", "B", "C")]
    f = jax.jit(jax.vmap(functools.partial(ssm.ssd, impl=impl, chunk_size=8)))
    y = f(*args)

    def sq(impl_, *a):
        return jnp.sum(ssm.ssd(*a, impl=impl_, chunk_size=8) ** 2)

    g = jax.jit(jax.vmap(jax.grad(functools.partial(sq, impl), argnums=(0, 1, 2, 3))))(*args)
    ref_y = jax.jit(functools.partial(ssm.ssd, impl="reference"))
    ref_g = jax.jit(jax.grad(functools.partial(sq, "reference"), argnums=(0, 1, 2, 3)))
    for i in range(2):
        one = [a[i] for a in args]
        close(y[i], ref_y(*one), 1e-5)
        for gi, gr in zip(g, ref_g(*one)):
            close(gi[i], gr, 1e-4)


def test_eager_calls_compile_once_per_shape():
    """A repeated eager `ssd` call reuses its compiled program (before the jitted core, every call
    compiled its scans again: about a second per call here)."""
    from compile_count import count_compiles
    inp = make_inputs(b=1, l=24, seed=7)
    args = [inp[k] for k in ("x", "log_a", "B", "C")]
    y1 = ssm.ssd(*args, D=inp["D"], chunk_size=8)
    with count_compiles() as n:
        y2 = ssm.ssd(*args, D=inp["D"], chunk_size=8)
        y2.block_until_ready()
    assert n[0] == 0, n[0]
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    with count_compiles() as n:
        ssm.ssd(*args, D=inp["D"], chunk_size=4).block_until_ready()       # a new static choice compiles
    assert n[0] >= 1
    with pytest.raises(MarjaxError, match="log_a must be <= 0"):         # the eager value check still runs
        ssm.ssd(args[0], -args[1], *args[2:], chunk_size=8)


def test_step_iterated_equals_reference():
    inp = make_inputs(l=9, seed=7)
    y_ref, s_ref = run(inp, "reference")
    step = jax.jit(ssm.ssd_step)
    state = inp["initial_state"]
    ys = []
    for t in range(9):
        y_t, state = step(state, inp["x"][:, t], inp["log_a"][:, t], inp["B"][:, t], inp["C"][:, t], inp["D"])
        ys.append(y_t)
    close(jnp.stack(ys, 1), y_ref, 1e-5)
    close(state, s_ref, 1e-5)


def test_auto_and_short_sequences():
    assert ssm.resolve_impl("auto") in ssm.IMPL_FNS
    assert set(ssm.IMPL_FNS) == set(ssm.IMPLS) - {"auto"}
    inp = make_inputs(l=5, seed=8)
    y_ref, _ = run(inp, "reference")
    close(run(inp, "auto")[0], y_ref, 1e-5)                                   # default chunk clamps
    close(run(inp, "chunked", chunk_size=ssm.effective_chunk(5, 128))[0], y_ref, 1e-5)
    assert ssm.effective_chunk(5, 128) == 8 and ssm.effective_chunk(37, 16) == 16
    assert ssm.effective_chunk(1, 64) == 1 and ssm.effective_chunk(300, 128) == 128


def test_bad_inputs_raise():
    inp = make_inputs(l=10)
    x, la, B, C = inp["x"], inp["log_a"], inp["B"], inp["C"]
    cases = [
        (dict(x=x[:, :9]), "log_a"),                        # length mismatch
        (dict(B=B[..., :3]), "C"),                          # B / C state size mismatch
        (dict(x=x[0]), "x"),                                # wrong rank
        (dict(log_a=jnp.abs(la)), "log_a must be <= 0"),    # positive decay (eager check)
        (dict(x=jnp.ones(x.shape, jnp.int32)), "x must be a floating"),
        (dict(chunk_size=12), "power of two"),
        (dict(chunk_size=64), "chunk_size=64 is larger"),   # 64 > 16 = pow2 above l=10
        (dict(impl="fast"), "impl must be one of"),
        (dict(inter_chunk="tree"), "inter_chunk"),
        (dict(D=jnp.ones((4,))), "D must have shape"),
        (dict(initial_state=jnp.zeros((2, 3, 8, 5))), "initial_state"),
    ]
    for over, msg in cases:
        args = dict(x=x, log_a=la, B=B, C=C, impl="chunked")
        args.update(over)
        with pytest.raises(MarjaxError, match=msg):
            ssm.ssd(args.pop("x"), args.pop("log_a"), args.pop("B"), args.pop("C"), **args)
    # a reference call ignores chunk_size, and an explicit chunk of 16 fits l=10 (shape-only calls)
    jax.eval_shape(functools.partial(ssm.ssd, impl="reference", chunk_size=64), x, la, B, C)
    jax.eval_shape(functools.partial(ssm.ssd, impl="chunked", chunk_size=16), x, la, B, C)
    with pytest.raises(MarjaxError, match="x_t"):
        ssm.ssd_step(inp["initial_state"], x[:, 0, :, :4], la[:, 0], B[:, 0], C[:, 0])
    with pytest.raises(MarjaxError, match="B and C"):
        ssm.materialize_mixer(la, B, C[..., :2])


def test_associative_memory_guard():
    b, l, h, p, n = 2, 1 << 16, 8, 64, 64
    assert assoc_mod.state_bytes(b, l, h, p, n) > assoc_mod.MAX_STATE_BYTES
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, l, h, p), (b, l, h), (b, l, h, n), (b, l, h, n))]
    with pytest.raises(MarjaxError, match="impl='chunked'"):
        jax.eval_shape(functools.partial(ssm.ssd, impl="associative"), *shapes)


def test_pallas_tpu_kernel_logic_matches_reference():
    """The TPU ("grid") kernels, run by the Pallas interpreter on this CPU: values and all grads.
    (The native lowerings of both kernels are checked in tests/test_export.py.)"""
    from pallas_kernels.ssd import ssd_pallas
    inp = make_inputs(l=37, seed=10)
    args = [inp[k] for k in ("x", "log_a", "B", "C", "initial_state")]

    def loss(impl, *a):
        y, s = impl(*a)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(s))

    ref = lambda *a: ssm.IMPL_FNS["reference"](*a, None, "scan")
    grid = lambda *a: ssd_pallas(*a, 16, mode="interpret_grid")
    for got, want in zip(jax.jit(grid)(*args), jax.jit(ref)(*args)):
        close(got, want, 1e-4)
    g = jax.jit(jax.grad(functools.partial(loss, grid), argnums=tuple(range(5))))(*args)
    g_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=tuple(range(5))))(*args)
    for got, want in zip(g, g_ref):
        close(got, want, 1e-4)


@pytest.mark.gpu
def test_pallas_compiled_matches_reference_on_gpu():
    if jax.default_backend() == "cpu":
        pytest.skip("needs a GPU")
    with jax.default_matmul_precision("highest"):
        inp = make_inputs(b=2, l=300, h=4, p=64, n=64, seed=9)
        y_ref, s_ref = run(inp, "reference")
        g_ref = grads(inp, "reference")
        for impl, kw in (("pallas", {"chunk_size": 128}), ("chunked", {"chunk_size": 128})):
            y, s = run(inp, impl, **kw)
            close(y, y_ref, 1e-4)
            close(s, s_ref, 1e-4)
            g = grads(inp, impl, **kw)
            for k in g_ref:
                close(g[k], g_ref[k], 1e-3)
