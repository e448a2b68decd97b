"""JAX's persistent compilation cache for the `marjax` commands (marjax.app.compile_cache): the
folder is keyed by the machine and switched by MARJAX_COMPILE_CACHE, the compiling commands turn
it on (not bench, plan), and a second process loads the first one's program from it (JAX's
cache-hit events, counted in child processes) with the same result. (The default pipeline run
twice from one clone: experiments/bench/RESULTS.md, seventeenth session.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marjax.app import compile_cache
from marjax.app.compile_cache import cache_dir, machine_key
from marjax.cli import main

REPO = Path(__file__).resolve().parents[2]

# a child that turns the cache on as the `marjax` commands do and compiles one small program
CHILD = """
import jax, jax.numpy as jnp
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
from marjax.app import compile_cache
folder = compile_cache.enable()
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.arange(64.0).reshape(8, 8) / 64)
print("HITS", len(hits), folder, repr(float(y.sum())))
"""


def _child(tmp_path, switch: str):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}   # CI sets one for the suite
    env.update(MARJAX_COMPILE_CACHE=switch, MARJAX_CACHE_DIR=str(tmp_path / "home-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")   # store even a program this small
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _, hits, folder, value = r.stdout.split()
    return int(hits), folder, value


def test_second_process_loads_the_compiled_program(tmp_path):
    folder = tmp_path / "xla"
    hits1, where1, value1 = _child(tmp_path, str(folder))
    stored = list(folder.iterdir())
    assert hits1 == 0 and stored and where1 == str(folder), "the first process compiles and stores"
    hits2, _, value2 = _child(tmp_path, str(folder))
    assert any(p.name.startswith("jit__lambda-") for p in stored)
    assert 1 <= hits2 <= len(stored) and value2 == value1   # jax's own small programs (iota, ...) hit too
    assert sorted(folder.iterdir()) == sorted(stored)


def test_default_folder_is_under_the_marjax_cache(tmp_path):
    _, where, _ = _child(tmp_path, "1")
    assert Path(where).parent == tmp_path / "home-cache" / "xla" and any(Path(where).iterdir())


@pytest.mark.parametrize("cmd, cached", [("generate", True), ("distill", True), ("pipeline", True),
                                         ("bench", False), ("plan", False)])
def test_commands_that_compile_turn_it_on(monkeypatch, cmd, cached):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda *a, **k: calls.append(cmd))
    with pytest.raises(SystemExit):
        main([cmd, "--help"]) if cmd != "bench" else main([cmd, "step", "--help"])
    assert calls == ([cmd] if cached else [])


def test_switched_off_enables_nothing(tmp_path):
    import jax
    before = jax.config.jax_compilation_cache_dir   # None, or the folder CI gives the whole suite
    assert compile_cache.enable(environ={"MARJAX_COMPILE_CACHE": "off", "MARJAX_CACHE_DIR": str(tmp_path)}) is None
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "xla").exists()


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
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    try:
        assert compile_cache.enable(tmp_path / "ours") == tmp_path / "theirs"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert not (tmp_path / "ours").exists()
