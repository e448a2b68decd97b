"""Native CPU kernels for decoding, as XLA FFI custom calls: decode-sized products with
weight-only quantised matrices (source: csrc/qgemv.cc) and one-token attention over a KV cache
(csrc/attention.cc). marjax.models.quant routes a QWeight product here on the CPU, and
marjax.nn.layers.attention a float32 decode step; everything else (other platforms, prefill, bf16
activations) keeps XLA's own ops.

    if cpu_kernels.available():
        y = cpu_kernels.q8_matmul(x, q, scale)       # x (m, in) f32, q (out, in) int8 -> (m, out) f32
        y = cpu_kernels.q4_matmul(x, q, scale, zero) # q (out, in / 2) uint8: two 4-bit weights a byte
        y = cpu_kernels.bf16_matmul(x, w)            # w (out, in) bfloat16
        q, k, v = cpu_kernels.matmuls("q4", x, [(wq, sq, zq), (wk, sk, zk), (wv, sv, zv)])   # one call
        o = cpu_kernels.attn_decode(q, k, v, n)      # q (b, h, d), cache k, v (b, S, g, d), n (b,) valid keys
        y, h = cpu_kernels.ssd_scan(x, log_a, B, C, h0)  # the SSD recurrence over a sequence (prefill)

Why a native kernel: one decode token reads every weight once, so decoding is bound by how fast
the matrix-vector products stream their weights. XLA:CPU fuses a dequantising producer into the
product but runs it single-threaded at about 6 GB/s of int8 (measured on the 2-core dev VM);
the kernel uses both cores and AVX-512 (or AVX2) and streams int8 at memory speed (`marjax bench decode`).
Pallas cannot express such a loop here (it runs only interpreted on the CPU); an FFI custom call can.
The attention kernel exists because XLA:CPU's batched dot copies each layer's whole K and V buffer
into a head-major layout on every decode step, and scores every slot of the buffer; the kernel reads
the valid prefix in place. The SSD scan kernel (csrc/ssd.cc; marjax.ssm's impl "native") runs the
recurrence over a whole sequence with each (batch, head) state in cache: XLA's lax.scan of it
round-trips the state through memory every token, and the chunked form's small batched products
run far from the matmul peak on an AVX2 CPU (`marjax bench ssd`).

The kernels are compiled on first use with the machine's C++ compiler (`$CXX`, else g++, c++ or
clang++; -O3 -march=native) against the FFI headers jaxlib ships, into
`$MARJAX_CACHE_DIR/kernels` (default ~/.cache/marjax), keyed by the sources, jaxlib's version, the
compiler and the CPU's flags; later processes load the cached library. It needs an x86-64 CPU with
AVX-512 F/BW/VNNI and F16C (the VNNI loops), else AVX2, FMA and F16C (8-wide loops: AMD Zen 2/3,
Intel before Ice Lake); `status().isa` names the build. Where neither, the compiler or the build is
missing, `available()` is False, `status()` says why (a warning says so once, when a build fails) and
callers fall back to XLA. `MARJAX_CPU_KERNELS=0` turns the kernels off; `MARJAX_CPU_KERNELS=avx2`
builds the AVX2 loops on an AVX-512 CPU too (to test or compare them).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

try:
    import fcntl          # the build lock (POSIX; the kernels are built on Linux x86-64 only)
except ImportError:       # pragma: no cover
    fcntl = None

__all__ = ["MAX_ROWS", "KernelStatus", "status", "available", "cpu_flags", "cpu_model", "select_isa", "ISA_FLAGS", "cache_root", "matmuls", "q8_matmul", "q4_matmul", "bf16_matmul",
           "attn_decode", "ssd_scan"]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "qgemv.cc", CSRC / "attention.cc", CSRC / "ssd.cc")   # one library
HEADERS = (CSRC / "parallel.h",)
ENV_SWITCH = "MARJAX_CPU_KERNELS"
ENV_CACHE = "MARJAX_CACHE_DIR"
# the /proc/cpuinfo flags each build needs, best first (csrc/parallel.h picks the loops from the
# compiler's target; "avx2" compiles with AVX-512 off so that it is the AVX2 build on any CPU)
ISA_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512_vnni", "f16c"), "avx2": ("avx2", "fma", "f16c")}
ISA_CXXFLAGS = {"avx512": (), "avx2": ("-mno-avx512f",)}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# products with more activation rows than this (prefill) are matmul-bound, not weight-bound:
# XLA's dequantise-then-matmul is the right tool there
MAX_ROWS = 16
_VMAP = "sequential"   # under jax.vmap: one call per batch element (the kernels take 2-D operands)
_TARGETS = {"q8": ("marjax_q8_matmul", "MarjaxQ8Matmul"), "q4": ("marjax_q4_matmul", "MarjaxQ4Matmul"),
            "bf16": ("marjax_bf16_matmul", "MarjaxBf16Matmul"), "attn": ("marjax_attn_decode", "MarjaxAttnDecode"),
            "ssd": ("marjax_ssd_scan", "MarjaxSsdScan")}


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    available: bool
    reason: str                  # why not, or where the library was loaded from
    library: Optional[str] = None
    isa: Optional[str] = None    # the build: "avx512" or "avx2"


def _cpuinfo(field: str) -> Optional[str]:
    """The value of the first `field` line of /proc/cpuinfo, None where absent or unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> Optional[set]:
    """This CPU's feature flags (/proc/cpuinfo), None where unreadable."""
    flags = _cpuinfo("flags")
    return None if flags is None else set(flags.split())


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo; else platform.processor())."""
    return _cpuinfo("model name") or platform.processor()


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    return next((p for p in map(shutil.which, ("g++", "c++", "clang++")) if p), None)


def cache_root(environ=os.environ) -> Path:
    """marjax's cache folder: $MARJAX_CACHE_DIR, default ~/.cache/marjax."""
    return Path(environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "marjax"))


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _compile_command(cxx: str, cxxflags, out) -> list:
    """The compiler command line that builds the kernel library from SOURCES into `out`."""
    return [cxx, *cxxflags, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(out)]


def _build(cxx: str, flags: set, isa: str) -> Path:
    """The cached library for this source/jaxlib/compiler/CPU/build, compiled now if missing.
    Raises RuntimeError with the compiler's message on failure."""
    src = b"\0".join(p.read_bytes() for p in SOURCES + HEADERS)
    cxxflags = FLAGS + ISA_CXXFLAGS[isa]
    key = hashlib.sha256(b"\0".join([src, importlib.metadata.version("jaxlib").encode(), cxx.encode(), " ".join(cxxflags).encode(),
                                     " ".join(sorted(flags)).encode()])).hexdigest()[:16]
    out = _cache_dir() / f"marjax-cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one build at a time: a second process (a pytest-xdist worker) waits for the first's library
    # instead of compiling it again beside it; the atomic rename keeps a reader from a half-written file
    with open(out.with_suffix(".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = _compile_command(cxx, cxxflags, tmp)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


@functools.cache
def status() -> KernelStatus:
    """Whether the kernels are registered with XLA in this process (building them on the first
    call), and why not. Cached: set MARJAX_CPU_KERNELS before the first call."""
    switch = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return KernelStatus(False, f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    if switch not in ("", "1", "true", "yes", "on", "auto", *ISA_FLAGS):
        warnings.warn(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not 0, 1 or a build ({', '.join(ISA_FLAGS)}): "
                      "the CPU kernels stay off", RuntimeWarning, stacklevel=2)
        return KernelStatus(False, f"unknown {ENV_SWITCH}={os.environ[ENV_SWITCH]!r} (0, 1, {', '.join(ISA_FLAGS)})")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return KernelStatus(False, f"the kernels are x86-64 (AVX-512 or AVX2); this CPU is {platform.machine()}")
    flags = cpu_flags()
    forced = switch if switch in ISA_FLAGS else None
    isa = select_isa(flags, forced=forced)
    if isa is None:
        want = " or ".join("+".join(ISA_FLAGS[i]) for i in ([forced] if forced else ISA_FLAGS))
        return KernelStatus(False, f"this CPU lacks {want} (or /proc/cpuinfo is unreadable)")
    cxx = _compiler()
    if cxx is None:
        return KernelStatus(False, "no C++ compiler found ($CXX, g++, c++, clang++)")
    try:
        lib_path = _build(cxx, flags, isa)
        lib = ctypes.cdll.LoadLibrary(str(lib_path))
        lib.marjax_kernels_isa.restype = ctypes.c_char_p
        built = lib.marjax_kernels_isa().decode()
        if built != isa:   # the compiler's -march=native disagrees with /proc/cpuinfo
            raise RuntimeError(f"{lib_path} is the {built} build, expected {isa}")
        for name, symbol in _TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        warnings.warn(f"marjax CPU kernels unavailable, using XLA's dequantising matmul instead: {e}",
                      RuntimeWarning, stacklevel=2)
        return KernelStatus(False, f"build or load failed: {e}")
    return KernelStatus(True, f"loaded {lib_path} ({isa} build)", str(lib_path), isa)


def select_isa(flags: Optional[set], forced: Optional[str] = None) -> Optional[str]:
    """The best build this CPU's flags allow ("avx512", "avx2"), or `forced` where the CPU has its
    flags; None where it has neither (or the flags are unknown)."""
    if flags is None:
        return None
    for isa in ([forced] if forced else ISA_FLAGS):
        if all(f in flags for f in ISA_FLAGS[isa]):
            return isa
    return None


def available() -> bool:
    return status().available


def _require_available() -> None:
    if not available():
        raise RuntimeError(f"marjax CPU kernels are unavailable: {status().reason}")


def _check(x, w) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x (m, in) and w (out, in), got {x.shape} and {w.shape}")
    if x.dtype != jnp.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")


def _check_q8(x, q, scale) -> None:
    _check(x, q)
    if q.dtype != jnp.int8 or scale.dtype != jnp.float16 or scale.shape[0] != q.shape[0] or \
            q.shape[1] % scale.shape[1] != 0:
        raise ValueError(f"expected int8 q (n, k) and float16 scale (n, g, 1) with g dividing k, got "
                         f"{q.dtype} {q.shape} and {scale.dtype} {scale.shape}")


def _check_q4(x, q, scale, zero) -> None:
    k = x.shape[-1] if x.ndim == 2 else -1
    if x.ndim != 2 or q.ndim != 2 or k != 2 * q.shape[1] or k % 32 or x.dtype != jnp.float32:
        raise ValueError(f"expected float32 x (m, k) with k a multiple of 32 and q (n, k / 2), got {x.dtype} "
                         f"{x.shape} and {q.shape}")
    want = (q.shape[0], k // 32, 1)
    if q.dtype != jnp.uint8 or any(a.dtype != jnp.float16 or a.shape != want for a in (scale, zero)):
        raise ValueError(f"expected uint8 q and float16 scale and zero {want}, got {q.dtype}, "
                         f"{scale.dtype} {scale.shape}, {zero.dtype} {zero.shape}")


def _check_bf16(x, w) -> None:
    _check(x, w)
    if w.dtype != jnp.bfloat16:
        raise ValueError(f"w must be bfloat16, got {w.dtype}")


_CHECKS = {"q8": _check_q8, "q4": _check_q4, "bf16": _check_bf16}


def matmuls(kind: str, x: Float[Array, "m k"], mats) -> tuple:
    """(x @ W_1.T, x @ W_2.T, ...) in one call: `kind` "q8", "q4" or "bf16", `mats` a sequence of
    one operand tuple per matrix, as q8_matmul, q4_matmul and bf16_matmul take them after x. The
    products share the hand-off to the thread pool (a layer's q, k and v, or gate and up)."""
    _require_available()
    if kind not in _CHECKS or not mats:
        raise ValueError(f"expected kind in {tuple(_CHECKS)} and at least one matrix, got {kind!r}, {len(mats)}")
    for ops in mats:
        _CHECKS[kind](x, *ops)
    out = [jax.ShapeDtypeStruct((x.shape[0], ops[0].shape[0]), jnp.float32) for ops in mats]
    return tuple(jax.ffi.ffi_call(_TARGETS[kind][0], out, vmap_method=_VMAP)(x, *[a for ops in mats for a in ops]))


def q8_matmul(x: Float[Array, "m k"], q: Int[Array, "n k"], scale: Float[Array, "n g 1"]) -> Float[Array, "m n"]:
    """x @ dequantised(q).T for int8 q with one float16 scale per k // g consecutive weights; with
    groups of 32, x rounded to int16 per group as q4_matmul rounds it."""
    return matmuls("q8", x, [(q, scale)])[0]


def q4_matmul(x: Float[Array, "m k"], q: Int[Array, "n k2"], scale: Float[Array, "n g 1"],
              zero: Float[Array, "n g 1"]) -> Float[Array, "m n"]:
    """x @ W.T for the 4-bit W of quant.quantize_q4: groups of 32 along k, w = scale * q + zero,
    byte j of a group's 16 holding q_j (low nibble) and q_(j+16) (high)."""
    return matmuls("q4", x, [(q, scale, zero)])[0]


def bf16_matmul(x: Float[Array, "m k"], w: Float[Array, "n k"]) -> Float[Array, "m n"]:
    """x @ w.T (float32 accumulation) for a bfloat16 w."""
    return matmuls("bf16", x, [(w,)])[0]


def attn_decode(q: Float[Array, "b h d"], k: Float[Array, "b s g d"], v: Float[Array, "b s g d"],
                n: Int[Array, "b"]) -> Float[Array, "b h d"]:
    """softmax(q k^T / sqrt(d)) v over the first n[i] keys of batch row i (0 <= n[i] <= s; no valid
    key gives zeros), query head j reading KV head j // (h // g): one decode token's causal GQA
    attention over its cache, in float32."""
    _require_available()
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2] \
            or q.shape[1] % k.shape[2]:
        raise ValueError(f"expected q (b, h, d) and k, v (b, s, g, d) with g dividing h, got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if any(a.dtype != jnp.float32 for a in (q, k, v)) or n.shape != q.shape[:1] or not jnp.issubdtype(n.dtype, jnp.integer):
        raise ValueError(f"expected float32 q, k, v and integer n (b,), got {q.dtype}, {k.dtype}, {v.dtype} and "
                         f"{n.dtype} {n.shape}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["attn"][0], out, vmap_method=_VMAP)(q, k, v, n.astype(jnp.int32))


def ssd_scan(x: Float[Array, "b l h p"], log_a: Float[Array, "b l h"], B: Float[Array, "b l h n"],
             C: Float[Array, "b l h n"], h0: Float[Array, "b h p n"]) -> tuple:
    """The SSD recurrence h_t = exp(log_a_t) h_{t-1} + x_t B_t^T, y_t = h_t C_t over the whole
    sequence, from state h0, in float32 -> (y (b, l, h, p), final state (b, h, p, n)). No
    derivative (marjax.ssm's impl "native" pairs it with the chunk scan's vjp)."""
    _require_available()
    if x.ndim != 4 or log_a.shape != x.shape[:3] or B.ndim != 4 or B.shape[:3] != x.shape[:3] or C.shape != B.shape \
            or h0.shape != (x.shape[0], x.shape[2], x.shape[3], B.shape[3]):
        raise ValueError(f"expected x (b, l, h, p), log_a (b, l, h), B and C (b, l, h, n), h0 (b, h, p, n), got "
                         f"{x.shape}, {log_a.shape}, {B.shape}, {C.shape}, {h0.shape}")
    if any(a.dtype != jnp.float32 for a in (x, log_a, B, C, h0)):
        raise ValueError(f"expected float32 operands, got {[str(a.dtype) for a in (x, log_a, B, C, h0)]}")
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(h0.shape, jnp.float32))
    return tuple(jax.ffi.ffi_call(_TARGETS["ssd"][0], out, vmap_method=_VMAP)(x, log_a, B, C, h0))
