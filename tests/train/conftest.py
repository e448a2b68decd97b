import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """Identical train steps recompile in every train() call (new closures); XLA's persistent
    cache turns the repeats into cache hits (results are unchanged). CI may already run with a
    persistent cache: then it is kept."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    if not old[names[0]]:
        jax.config.update(names[0], str(tmp_path_factory.getbasetemp() / "xla_cache"))
        jax.config.update(names[1], 0)
        jax.config.update(names[2], 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
