import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# no persistent compilation cache for the CLI commands the tests run (in process and in children):
# every run compiles, nothing is written under the home folder (tests/app/test_compile_cache.py
# turns it on where it tests it)
os.environ["MARJAX_COMPILE_CACHE"] = "0"
# The suite's codegen switches (LLVM -O0, the classic fusion emitter): compile time only, see
# tests/xla_test_flags.py. Set before jax is imported; child processes inherit them.
import xla_test_flags  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

xla_test_flags.install()

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
