"""marjax.app.hostmem: when the `marjax` command re-executes itself with glibc's malloc tunables, and
that the re-executed process keeps a freed large block mapped (and in huge pages where it asks)."""
import os
import subprocess
import sys
import textwrap

import pytest

from marjax import cli
from marjax.app import hostmem
from marjax.app.hostmem import ENV_SWITCH, HEAP_TUNABLES, THP_TUNABLE, hugepage_env, thp_mode

LINUX_GLIBC = dict(thp="madvise", glibc=(2, 36), platform="linux")
ALL = ":".join(HEAP_TUNABLES + (THP_TUNABLE,))


def test_hugepage_env_adds_the_tunables_only_where_they_help():
    assert hugepage_env({"PATH": "/bin"}, **LINUX_GLIBC) == {"PATH": "/bin", "GLIBC_TUNABLES": ALL}
    # other tunables are kept, colon-separated
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096"}, **LINUX_GLIBC)
    assert env["GLIBC_TUNABLES"] == f"glibc.rtld.optional_static_tls=4096:{ALL}"
    # the heap tunables without huge pages where the kernel gives them unasked or never, or glibc lacks it
    heap_only = ":".join(HEAP_TUNABLES)
    for kw in [{"thp": "always"}, {"thp": "never"}, {"thp": None}, {"glibc": (2, 34)}]:
        assert hugepage_env({}, **{**LINUX_GLIBC, **kw})["GLIBC_TUNABLES"] == heap_only, kw
    for environ, kw in [({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),   # the user chose
                        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, {}),
                        ({ENV_SWITCH: "0"}, {}), ({ENV_SWITCH: "off"}, {}),
                        ({}, {"glibc": (2, 25)}), ({}, {"glibc": None}),   # no tunables / not glibc
                        ({}, {"platform": "darwin"})]:
        assert hugepage_env(environ, **{**LINUX_GLIBC, **kw}) is None, (environ, kw)
    # re-executed once: the child's environment already carries them
    assert hugepage_env(hugepage_env({}, **LINUX_GLIBC), **LINUX_GLIBC) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    p = tmp_path / "enabled"
    p.write_text("always [madvise] never\n")
    assert thp_mode(str(p)) == "madvise"
    p.write_text("[always] madvise never\n")
    assert thp_mode(str(p)) == "always"
    assert thp_mode(str(tmp_path / "missing")) is None


def test_only_training_commands_reexecute_from_the_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(hostmem, "reexec_for_hugepages", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])              # called from Python: never
    assert calls == []
    for argv, reexec in [(["distill", "--help"], True), (["bench", "step", "--help"], True),
                         (["energy", "--help"], False), (["bench", "ssd", "--help"], False)]:
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["marjax", *argv])
        with pytest.raises(SystemExit):
            cli.main()                               # the `marjax` command
        assert calls == ([1] if reexec else []), argv


# a child that re-executes itself (printing once per process), then mallocs and touches 64 MiB twice,
# freeing it in between (as XLA:CPU does an executable's temporaries every run)
_CHILD = textwrap.dedent("""
    import ctypes, os, resource
    print("start", os.getpid(), flush=True)
    from marjax.app.hostmem import reexec_for_hugepages
    reexec_for_hugepages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    n = 64 << 20
    for run in ("first", "again"):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        print(run, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(p)
    print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
""")


@pytest.mark.skipif(hostmem.hugepage_env({}, thp_mode(), hostmem.glibc_version()) is None,
                    reason="no glibc >= 2.26 on Linux here")
def test_reexecuted_process_keeps_its_heap_mapped():
    def run(extra):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", ENV_SWITCH)}
        out = subprocess.run([sys.executable, "-c", _CHILD], env={**env, **extra}, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split("\n")
        fields = dict(line.split(" ", 1) for line in out if " " in line)
        starts = sum(line.startswith("start") for line in out)
        return starts, int(fields["first"]), int(fields["again"]), fields.get("tunables", "")
    starts, first, again, tunables = run({})
    assert starts == 2 and all(t in tunables for t in HEAP_TUNABLES)   # ran twice: once before the exec
    starts_off, first_off, again_off, tunables_off = run({ENV_SWITCH: "0"})
    assert starts_off == 1 and "glibc.malloc." not in tunables_off
    # 64 MiB is 16,384 pages of 4 KiB. Off: mmap'd and unmapped, so faulted in afresh both times;
    # on: the freed block stays in the heap, mapped, for the next malloc
    assert first_off > 8000 and again_off > 8000, (first_off, again_off)
    assert again < 100, again
    if THP_TUNABLE in tunables:   # and in 2 MiB pages: 32 of them, plus the unaligned ends
        assert first < 2000, first


def test_heap_kept_only_under_all_heap_tunables():
    assert hostmem.heap_kept({"GLIBC_TUNABLES": hugepage_env({}, **LINUX_GLIBC)["GLIBC_TUNABLES"]})
    assert hostmem.heap_kept({"GLIBC_TUNABLES": ":".join(HEAP_TUNABLES)})
    assert not hostmem.heap_kept({})
    assert not hostmem.heap_kept({"GLIBC_TUNABLES": ":".join(HEAP_TUNABLES[:-1] + (THP_TUNABLE,))})
    assert not hostmem.heap_kept({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})


@pytest.mark.parametrize("tunables, async_save", [(None, True), (":".join(HEAP_TUNABLES), False)])
def test_stages_save_synchronously_under_the_heap_tunables(monkeypatch, tmp_path, tunables, async_save):
    """An asynchronous save's host copy of the state outlives the next steps and, in a heap that
    never shrinks, makes their temporaries extend it (hostmem's doc): the stages save in line."""
    import marjax
    from marjax.app import runner
    seen = []
    monkeypatch.setattr(runner, "train", lambda *a, **k: seen.append(k["async_save"]) or (None, []))
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    m = marjax.load("tiny")
    runner.run_stage("pretrain", None, m.config, m.params, runner.RunConfig(), str(tmp_path), tokenizer=m.tokenizer)
    assert seen == [async_save]
