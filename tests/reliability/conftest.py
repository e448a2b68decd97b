import os

import jax
import pytest


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
    """A persistent XLA compile cache shared by the `marjax distill` processes these tests start
    (only compile time changes: test_determinism.py checks that cached executables give the same
    bits as freshly compiled ones)."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(xla_cache):
    """In-process train() calls recompile identical steps (new closures): the persistent cache
    turns repeats into hits."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    if not old[names[0]]:
        for n, v in zip(names, (xla_cache, 0, 0)):
            jax.config.update(n, v)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
