"""Host memory for the `marjax` command: malloc tuned so XLA:CPU's per-run temporaries stay mapped.

XLA:CPU allocates an executable's temporaries afresh on every run: the SmolLM2 kd train step maps
a 1.64 GB block with mmap and unmaps it after, every step (strace), so each step first-touches
about 400,000 new 4 KiB pages: 450,000 page faults and 0.6-0.8 s of kernel time a step on the
2-core VM (getrusage). Two sets of glibc tunables fix that, measured side by side
(experiments/bench/RESULTS.md, "Train step, fourteenth session"):

* `HEAP_TUNABLES`: one malloc arena, no mmap'd blocks and no trimming, so the block comes from
  the main heap and is reused, already mapped, by the next step. (A thread's arena cannot grow
  past 64 MiB, so without `arena_max=1` a large block is mmap'd whatever `mmap_max` says.)
* `THP_TUNABLE` (`glibc.malloc.hugetlb=1`, glibc >= 2.35, where the kernel's transparent huge
  pages are in `madvise` mode): malloc advises its memory for huge pages. Alone, it cut the
  faults to 4,000 a step, but every step still took fresh huge pages from the kernel, and on a VM
  whose balloon reports free 2 MiB blocks to the host those came back slowly: steps of 3-4 s
  among steps of 1.2 s. With the heap tunables: no faults, 0.03 s of kernel time a step, no
  such outliers, the same losses bit for bit.

glibc reads tunables only at process start, so the training commands (`marjax pipeline`,
`distill`, `bench step`: marjax.cli.TRAINING_COMMANDS) re-execute themselves once, with the
tunables added to GLIBC_TUNABLES, before anything else runs (`reexec_for_hugepages`). Not the
others: the re-execution costs a short command more than it gains (`marjax generate` 32 tokens:
8.0-8.3 s without, 10.1-11.3 s with huge pages; the test suite's compile-bound processes got
slower too). It does nothing off Linux or glibc (>= 2.26), when GLIBC_TUNABLES already sets a
`glibc.malloc.` tunable (the user's choice, or this re-execution's), and when MARJAX_HUGEPAGES=0.
The price is memory: the heap never shrinks until the process ends, and it fragments (the
default SmolLM2 pipeline from one fresh clone, back to back: 10.4 min and 14.5 GB peak RSS with
the tunables, 13.0 min and 10.5 GB without). Most of that was Orbax's asynchronous saves: their
host copy of the state (1.9 GB for the SmolLM2 kd student and its Adam moments) lives on through
the next steps, so each step's temporaries find the freed block taken and extend the heap. Under
the tunables the training commands therefore save synchronously (`heap_kept`; marjax.app.runner):
a one-off probe of 8 kd steps with a save every 2 peaked at 6.3 GB RSS against 10.1 GB with
asynchronous saves, the same losses bit for bit, a few seconds more a save; the default pipeline
then peaked at 9.6 GB (a fresh clone at fdd5efd, on the Intel VM). Library users (a notebook, their own script) can
start Python with the same variable:

    GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.hugetlb=1 python train.py
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

__all__ = ["ENV_SWITCH", "HEAP_TUNABLES", "THP_TUNABLE", "thp_mode", "glibc_version", "malloc_tunables",
           "hugepage_env", "reexec_for_hugepages", "heap_kept"]

ENV_SWITCH = "MARJAX_HUGEPAGES"
HEAP_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 40}")
THP_TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 26)       # the first glibc with GLIBC_TUNABLES
MIN_GLIBC_THP = (2, 35)   # the first with glibc.malloc.hugetlb


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


def malloc_tunables(thp: Optional[str], glibc: Optional[tuple]) -> tuple:
    """The tunables that apply under this kernel THP mode and glibc version (module doc): the heap
    ones on any glibc with tunables, huge pages only where the kernel waits to be asked (`madvise`;
    `always` gives them unasked, `never` not at all)."""
    if glibc is None or glibc < MIN_GLIBC:
        return ()
    return HEAP_TUNABLES + ((THP_TUNABLE,) if thp == "madvise" and glibc >= MIN_GLIBC_THP else ())


def hugepage_env(environ: Mapping[str, str], thp: Optional[str], glibc: Optional[tuple],
                 platform: str = sys.platform) -> Optional[dict]:
    """The environment to re-execute with (GLIBC_TUNABLES plus `malloc_tunables`), or None when a
    re-execution would not help or is switched off (module doc)."""
    if environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off") or platform != "linux":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    tunables = malloc_tunables(thp, glibc)
    if not tunables or "glibc.malloc." in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(((current,) if current else ()) + tunables)
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


def heap_kept(environ: Mapping[str, str] = os.environ) -> bool:
    """True when this process runs with the heap tunables (its heap never shrinks): long-lived
    host buffers allocated between train steps, such as an asynchronous checkpoint's copy of the
    state, would then fragment it for good."""
    current = environ.get("GLIBC_TUNABLES", "").split(":")
    return all(t in current for t in HEAP_TUNABLES)
