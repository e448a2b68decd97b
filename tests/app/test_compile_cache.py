"""JAX's persistent compilation cache for the `marjax` commands (marjax.app.compile_cache): the
folder is keyed by the machine, switched by MARJAX_COMPILE_CACHE, and a second `marjax generate`
loads its programs from it (JAX's cache-hit events, counted in a child process) with the same
text."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marjax.app import compile_cache
from marjax.app.compile_cache import cache_dir, machine_key

REPO = Path(__file__).resolve().parents[2]

CHILD = """
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
from marjax.cli import main
rc = main(["generate", "Once upon a time", "--model", "tiny", "--max-new-tokens", "4"])
print("\\nHITS", len(hits), "RC", rc)
"""


def _generate(tmp_path, switch: str):
    env = dict(os.environ, MARJAX_COMPILE_CACHE=switch, MARJAX_CACHE_DIR=str(tmp_path / "home-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")   # the tiny model compiles in well under 1 s
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text, tail = r.stdout.rsplit("\nHITS", 1)
    hits, _, rc = tail.split()
    assert rc == "0"
    return text, int(hits)


def test_second_run_loads_compiled_programs(tmp_path):
    folder = tmp_path / "xla"
    text1, hits1 = _generate(tmp_path, str(folder))
    stored = list(folder.iterdir())
    assert hits1 == 0 and stored, "the first run compiles and stores"
    text2, hits2 = _generate(tmp_path, str(folder))
    assert hits2 >= len(stored) // 2 > 0, (hits2, len(stored))
    assert text2 == text1 and "Once upon a time" in text1


def test_switched_off_enables_nothing(tmp_path):
    import jax
    assert compile_cache.enable(environ={"MARJAX_COMPILE_CACHE": "off", "MARJAX_CACHE_DIR": str(tmp_path)}) is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "xla").exists()


def test_default_folder_is_keyed_by_machine(tmp_path):
    env = {"MARJAX_CACHE_DIR": str(tmp_path)}
    d = cache_dir(env)
    assert d.parent == tmp_path / "xla" and len(d.name) == 16
    assert cache_dir(dict(env, MARJAX_COMPILE_CACHE="1")) == d
    for off in ("0", "off", "False"):
        assert cache_dir({"MARJAX_COMPILE_CACHE": off}) is None
    assert cache_dir({"MARJAX_COMPILE_CACHE": str(tmp_path / "mine")}) == tmp_path / "mine"


@pytest.mark.parametrize("change", ["model", "flags", "jaxlib", "arch"])
def test_machine_key_changes_with_the_target(change):
    base = dict(cpu_model="Intel Xeon", cpu_flags={"avx512f", "amx_bf16"}, jaxlib_version="0.10.2", arch="x86_64")
    other = dict(base, **{"model": {"cpu_model": "AMD EPYC"}, "flags": {"cpu_flags": {"avx512f"}},
                          "jaxlib": {"jaxlib_version": "0.10.3"}, "arch": {"arch": "aarch64"}}[change])
    assert machine_key(**other) != machine_key(**base)
    assert machine_key(**dict(base, cpu_flags=["amx_bf16", "avx512f"])) == machine_key(**base)   # order-free


def test_enable_keeps_a_folder_jax_already_has(tmp_path):
    import jax
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    try:
        assert compile_cache.enable(tmp_path / "ours") == tmp_path / "theirs"
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
    assert not (tmp_path / "ours").exists()
