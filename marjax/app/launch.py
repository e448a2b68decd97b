"""`marjax launch`: run a marjax command as N JAX processes (multi-process / multi-host training).

    marjax launch --processes 2 -- marjax distill --stage kd train.steps=10 ...   # N local processes
    marjax launch --worker -- marjax distill ...      # one process of a job started by SLURM / a pod

Every process calls `jax.distributed.initialize` before any JAX computation, then runs the
command (the ordinary `marjax` entry point), so all processes see one global device list and
one mesh. The processes of a job find each other by:
  - MARJAX_COORDINATOR (host:port of process 0), MARJAX_NUM_PROCESSES, MARJAX_PROCESS_ID: set by
    `--processes N` for local runs, or by you (a SLURM script, a GPU cluster's launcher);
  - none of them set: `jax.distributed.initialize()` auto-detects (Cloud TPU pods, SLURM,
    Open MPI): on a TPU pod run the same `marjax launch --worker -- ...` on every host.
On CPU, cross-process collectives go through gloo (jax_cpu_collectives_implementation).
See docs/distributed.md for the semantics of batch sizes, data shards and checkpoints.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import jax

from marjax.errors import ConfigError

__all__ = ["init_distributed", "launch", "main", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "MARJAX_COORDINATOR", "MARJAX_NUM_PROCESSES", "MARJAX_PROCESS_ID"
ENV_LOCAL_DEVICES = "MARJAX_LOCAL_DEVICES"     # CPU devices per process (tests simulate several)


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {v!r}") from None


def init_distributed() -> dict:
    """`jax.distributed.initialize` from the MARJAX_* variables (all three, or none: auto-detect).
    Must run before anything touches a JAX backend. Returns {process_id, num_processes}."""
    coord, n, pid = os.environ.get(ENV_COORDINATOR), _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
    given = [v is not None for v in (coord, n, pid)]
    if any(given) and not all(given):
        raise ConfigError(f"set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} or none (auto-detect); "
                          f"got {ENV_COORDINATOR}={coord!r}, {ENV_NUM_PROCESSES}={n!r}, {ENV_PROCESS_ID}={pid!r}")
    local = _env_int(ENV_LOCAL_DEVICES)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or local is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if local is not None:
            jax.config.update("jax_num_cpu_devices", local)
    if all(given):
        if n < 1 or not 0 <= pid < n:
            raise ConfigError(f"{ENV_PROCESS_ID} must be in [0, {ENV_NUM_PROCESSES}={n}), got {pid}")
        jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)
    else:
        jax.distributed.initialize()
    return {"process_id": jax.process_index(), "num_processes": jax.process_count()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(cmd: list) -> list:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if cmd and os.path.basename(cmd[0]) == "marjax":
        cmd = cmd[1:]
    if not cmd:
        raise ConfigError("marjax launch: give the command after '--', e.g. `marjax launch --processes 2 -- "
                          "marjax distill --stage kd`")
    return cmd


def launch(cmd: list, processes: int, *, port: Optional[int] = None, local_devices: Optional[int] = None,
           log_dir: Optional[str] = None, env: Optional[dict] = None, timeout: Optional[float] = None) -> int:
    """Start `processes` local workers of `marjax <cmd>` on localhost and wait; the first
    non-zero exit code stops the others and is returned (0 when all succeed). Process i's output
    goes to log_dir/process_i.log when log_dir is given, else to this terminal."""
    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"--processes must be an integer >= 1, got {processes!r}")
    cmd = _command(list(cmd))
    coord = f"localhost:{port or _free_port()}"
    procs, logs = [], []
    for i in range(processes):
        e = dict(os.environ if env is None else env, **{ENV_COORDINATOR: coord, ENV_NUM_PROCESSES: str(processes),
                                                      ENV_PROCESS_ID: str(i)})
        if local_devices is not None:
            e[ENV_LOCAL_DEVICES] = str(local_devices)
        out = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
            logs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-m", "marjax.app.launch", "--worker", "--", *cmd], env=e,
                                      stdout=out, stderr=subprocess.STDOUT if out else None))
    t0, rc = time.monotonic(), 0
    try:
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad or (timeout is not None and time.monotonic() - t0 > timeout):
                rc = bad[0] if bad else 124
                break
            time.sleep(0.2)
        else:
            rc = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:            # one failed or timed out: the others would wait on it forever
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    return rc


def _worker(cmd: list) -> int:
    init_distributed()
    from marjax.cli import main as cli_main   # late import: after jax.distributed is initialised
    return cli_main(_command(cmd))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="marjax launch", description="run a marjax command as N JAX processes")
    ap.add_argument("--processes", type=int, default=None, help="start this many local processes (localhost)")
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--local-devices", type=int, default=None, help="CPU devices per process (simulated)")
    ap.add_argument("--log-dir", default=None, help="write process i's output to LOG_DIR/process_i.log")
    ap.add_argument("--worker", action="store_true", help="be one process of a job: jax.distributed.initialize "
                    "from MARJAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID, or auto-detected (TPU pod, SLURM)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- marjax <command> [args...]")
    a = ap.parse_args(argv)
    if a.worker:
        return _worker(a.command)
    if a.processes is None:
        raise ConfigError("marjax launch: give --processes N (local processes) or --worker (one process of a job)")
    return launch(a.command, a.processes, port=a.port, local_devices=a.local_devices, log_dir=a.log_dir)


if __name__ == "__main__":
    sys.exit(main())
