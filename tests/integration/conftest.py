import pytest
from fault_tools import train_cli


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory):
    """One folder (and one tokenizer cache) for the failure tests' runs."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def reference(fault_root):
    """The uninterrupted tiny run (one process): checkpoints at steps 3 and 6."""
    code, _, err = train_cli(fault_root, "run.name=reference")
    assert code == 0, err
    return fault_root / "reference"
