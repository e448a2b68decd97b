"""Host memory for the `marjax` command: transparent huge pages for malloc's large blocks.

XLA:CPU allocates an executable's temporaries afresh on every run: the SmolLM2 kd train step maps
a 1.64 GB block with mmap and unmaps it after, every step (strace), so each step first-touches
about 400,000 new 4 KiB pages: 450,000 page faults and 0.8 s of kernel time a step on the 2-core
VM (getrusage). Where the kernel's transparent huge pages are in `madvise` mode (a common
default), glibc's `glibc.malloc.hugetlb=1` tunable has malloc advise its mmap'd blocks for huge
pages: 4,000 faults a step, and the step 0.80-0.87x as long, the same losses bit for bit
(experiments/bench/RESULTS.md, "Train step, thirteenth session").

glibc reads tunables only at process start, so the training commands (`marjax pipeline`,
`distill`, `bench step`: marjax.cli.TRAINING_COMMANDS) re-execute themselves once, with the
tunable added to GLIBC_TUNABLES, before anything else runs (`reexec_for_hugepages`). Not the
others: the re-execution and huge pages for their many mid-size blocks cost a short command
more than it gains (`marjax generate` 32 tokens: 8.0-8.3 s without, 10.1-11.3 s with; the test
suite's compile-bound processes got slower too). It does nothing where it cannot help (not
Linux, glibc older than 2.35 or not glibc, huge pages `always` or `never`, the tunable already
set) and when MARJAX_HUGEPAGES=0. Library users (a notebook, their own script) can start Python
with the same variable:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

__all__ = ["ENV_SWITCH", "TUNABLE", "thp_mode", "glibc_version", "hugepage_env", "reexec_for_hugepages"]

ENV_SWITCH = "MARJAX_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)   # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> Optional[str]:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple]:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def hugepage_env(environ: Mapping[str, str], thp: Optional[str], glibc: Optional[tuple],
                 platform: str = sys.platform) -> Optional[dict]:
    """The environment to re-execute with (GLIBC_TUNABLES plus TUNABLE), or None when a
    re-execution would not help or is switched off (module doc)."""
    if environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if platform != "linux" or thp != "madvise" or glibc is None or glibc < MIN_GLIBC:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def reexec_for_hugepages() -> None:
    """Replace this process with the same command line under `hugepage_env`, where it applies;
    else (or if exec fails) return and carry on as before. Call it first thing in a command."""
    env = hugepage_env(os.environ, thp_mode(), glibc_version())
    argv = getattr(sys, "orig_argv", None)   # the interpreter's own command line, options included
    if env is None or not argv:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:
        return
