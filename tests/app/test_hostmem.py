"""marjax.app.hostmem: when the `marjax` command re-executes itself with glibc's huge-page tunable,
and that the re-executed process does get huge pages for malloc's large blocks."""
import os
import subprocess
import sys
import textwrap

import pytest

from marjax import cli
from marjax.app import hostmem
from marjax.app.hostmem import ENV_SWITCH, TUNABLE, hugepage_env, thp_mode

LINUX_GLIBC = dict(thp="madvise", glibc=(2, 36), platform="linux")


def test_hugepage_env_adds_the_tunable_only_where_it_helps():
    env = hugepage_env({"PATH": "/bin"}, **LINUX_GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    # other tunables are kept, colon-separated
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX_GLIBC)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    for environ, kw in [({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),   # the user chose
                        ({ENV_SWITCH: "0"}, {}), ({ENV_SWITCH: "off"}, {}),
                        ({}, {"thp": "always"}),          # the kernel already gives huge pages
                        ({}, {"thp": "never"}), ({}, {"thp": None}),
                        ({}, {"glibc": (2, 34)}), ({}, {"glibc": None}),   # no such tunable / not glibc
                        ({}, {"platform": "darwin"})]:
        assert hugepage_env(environ, **{**LINUX_GLIBC, **kw}) is None, (environ, kw)


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


# a child that re-executes itself (printing once per process), then mallocs and touches 64 MiB
_CHILD = textwrap.dedent("""
    import ctypes, os, resource
    print("start", os.getpid(), flush=True)
    from marjax.app.hostmem import reexec_for_hugepages
    reexec_for_hugepages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    n = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
""")


@pytest.mark.skipif(hostmem.hugepage_env({}, thp_mode(), hostmem.glibc_version()) is None,
                    reason="huge pages not in madvise mode, or no glibc >= 2.35, on this machine")
def test_reexecuted_process_gets_huge_pages():
    def run(extra):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", ENV_SWITCH)}
        out = subprocess.run([sys.executable, "-c", _CHILD], env={**env, **extra}, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split("\n")
        fields = dict(line.split(" ", 1) for line in out if " " in line)
        return sum(line.startswith("start") for line in out), int(fields["faults"]), fields.get("tunables", "")
    starts, faults, tunables = run({})
    assert starts == 2 and TUNABLE in tunables            # ran twice: once before the exec
    starts_off, faults_off, tunables_off = run({ENV_SWITCH: "0"})
    assert starts_off == 1 and TUNABLE not in tunables_off
    # 64 MiB: 16,384 pages of 4 KiB, or 32 of 2 MiB (plus the unaligned ends in small pages)
    assert faults_off > 8000 and faults < 2000, (faults, faults_off)
