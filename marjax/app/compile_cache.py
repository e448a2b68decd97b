"""JAX's persistent compilation cache for the commands that compile big programs, so a rerun or a
resumed job loads its train steps and forwards instead of compiling them again.

    from marjax.app import compile_cache
    compile_cache.enable()          # the `marjax` commands do this themselves (not `bench`, `plan`)
    # or, in a notebook:  marjax.enable_compile_cache()

Where: $MARJAX_COMPILE_CACHE if it names a folder, else `<marjax cache>/xla/<machine key>` (the
marjax cache is $MARJAX_CACHE_DIR, default ~/.cache/marjax). The machine key hashes jaxlib's
version, the CPU's architecture, model and feature flags: XLA:CPU compiles for the host's
instruction set, and a home folder shared between machines (or a VM that changes CPU under the
same disk) must not load another CPU's code. MARJAX_COMPILE_CACHE=0 turns it off; a cache folder
already set in JAX's own config (jax_compilation_cache_dir, JAX_COMPILATION_CACHE_DIR) is kept.
JAX stores programs that took >= 1 s to compile (jax_persistent_cache_min_compile_time_secs) and
keys them by the program, the compile options, the XLA flags and the backend; a hit returns the
same executable, so results do not move. `marjax bench` and `marjax plan` leave it off: they
report compile time.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Mapping, Optional

__all__ = ["ENV_SWITCH", "OFF", "machine_key", "cache_dir", "enable"]

ENV_SWITCH = "MARJAX_COMPILE_CACHE"
OFF = ("0", "false", "no", "off")


def machine_key(cpu_model: str, cpu_flags, jaxlib_version: str, arch: str) -> str:
    """16 hex digits naming the compiled code's target: jaxlib, architecture, CPU model and flags."""
    text = "\0".join([jaxlib_version, arch, cpu_model, " ".join(sorted(cpu_flags or ()))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _switched_off(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV_SWITCH, "").strip().lower() in OFF


def cache_dir(environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """The folder `enable` uses (module doc), or None when MARJAX_COMPILE_CACHE turns it off."""
    from marjax.kernels.cpu_kernels import cache_root, cpu_flags, cpu_model  # late import: keeps `marjax --help` free of jax
    if _switched_off(environ):
        return None
    value = environ.get(ENV_SWITCH, "").strip()
    if value and value.lower() not in ("1", "true", "yes", "on"):
        return Path(value).expanduser()
    key = machine_key(cpu_model(), cpu_flags(), importlib.metadata.version("jaxlib"), platform.machine())
    return cache_root(environ) / "xla" / key


def enable(path=None, environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """Turn on JAX's persistent compilation cache in `path` (default: `cache_dir()`); returns the
    folder in use, or None when MARJAX_COMPILE_CACHE turns it off (JAX's own config is then left
    as it is). A folder already set in JAX's config wins over marjax's."""
    if path is None and _switched_off(environ):
        return None
    import jax  # late import: keeps `marjax --help` free of jax
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    folder = Path(path).expanduser() if path is not None else cache_dir(environ)
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    from jax.experimental.compilation_cache import compilation_cache  # late import: jax's cache module
    compilation_cache.reset_cache()   # a process that compiled before starts the cache afresh on the next compile
    return folder
