import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile far more than they compute (tiny models), and most of a CPU compile is LLVM's
# backend optimisation: level 0 takes about a fifth off the suite (measured on the 2-core dev
# VM). No fast-math either way, so what the tests check is unchanged; the product, the benches and
# the experiments keep XLA's default. Child processes inherit it (tests/simulated_devices.py).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository elsewhere and lays shared/ beside the clone, as on a developer's machine
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_dir() -> Path:
    """../shared/data relative to the repository root. Missing: a test failure in CI (CI=true),
    a skip elsewhere (a user's clone without the shared folder)."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"shared data not found at {SHARED_DATA} (CI lays ../shared beside the clone)")
    pytest.skip(f"shared data not present at {SHARED_DATA}")


@pytest.fixture
def shared_data() -> Path:
    return shared_data_dir()


# Shape legend checks (marjax/typing.py): while the tests run, jaxtyping + beartype check the
# annotated signatures of the core layers, the LM and the sampler (dims consistent across the
# arguments of one call). Installed before any marjax module is imported by a test.
from jaxtyping import install_import_hook  # noqa: E402

_TYPECHECKED = ("marjax.nn", "marjax.models.lm", "marjax.sampling")
_typecheck_hook = install_import_hook(list(_TYPECHECKED), "beartype.beartype")
