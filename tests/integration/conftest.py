import pytest
from tests.helpers.cli import HEADS2, train_ok


@pytest.fixture(scope="session")
def run_root(tmp_path_factory):
    """One folder for the integration tests' runs, and one data cache (``run_root/cache``): the
    tokenizer is trained and the store prepared once for every run of the tiny settings."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def reference(run_root):
    """The uninterrupted tiny run (one process, CP = DP = 1): checkpoints at steps 3 and 6.
    Shared by every module: tests that change or resume it work on a ``copy_run``."""
    train_ok(run_root, "run.name=reference")
    return run_root / "reference"


@pytest.fixture(scope="session")
def reference_heads2(run_root):
    """The tiny run with two key/value heads (so that tp = 2 divides them), one process."""
    train_ok(run_root, *HEADS2, "run.name=reference_heads2")
    return run_root / "reference_heads2"
