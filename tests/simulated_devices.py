"""Run Python in a child process on N simulated CPU devices (XLA_FLAGS must be set before jax
is imported, so multi-device tests run their script in a subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_env(devices: int = 8) -> dict:
    # the parent's flags (conftest's optimisation level) plus the device count
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("MARJAX_NUM_PROCESSES", None)
    return env


def run_on_devices(args, cwd, *, devices: int = 8, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python *args` on `devices` simulated CPU devices; asserts exit 0 (stderr tail in the message)."""
    r = subprocess.run([sys.executable, *map(str, args)], env=device_env(devices), capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r
