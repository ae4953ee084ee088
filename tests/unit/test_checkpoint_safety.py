"""Nothing in a checkpoint runs code when it is loaded (docs/design.md#run-guarantees).

Each test plants a pickle whose loading would create a marker file, and first shows that the
stock torch path does run it (so the test can fail), then that multitoken's does not.
"""

from __future__ import annotations

import contextlib
import io
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tests.helpers.models import SMALL_GPT, tiny_model
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from multitoken.errors import CheckpointError
from multitoken.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from multitoken.train.manifest import write_manifest
from multitoken.train.safe_load import (
    RestrictedUnpickler,
    SafeFileSystemReader,
    SafeLoadPlanner,
    dump_state,
    load_state,
    read_metadata,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def small_model():
    return tiny_model(1, **SMALL_GPT)


def trained(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(2, 64, (2, 8))
    sum(h.float().pow(2).mean() for h in model(ids)).backward()
    optimizer.step()
    return optimizer


@pytest.fixture
def checkpoint(tmp_path):
    model = small_model()
    optimizer = trained(model)
    extra = {"step": 1, "rng": torch.get_rng_state()}
    return save_checkpoint(tmp_path / "run", 1, model, optimizer, extra), model


def test_metadata_payload_runs_under_dcp_but_not_here(checkpoint, tmp_path):
    path, _ = checkpoint
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with contextlib.suppress(AttributeError):  # the payload returns None, not metadata
        FileSystemReader(str(path)).read_metadata()  # the stock reader: plain pickle.load
    assert marker.exists(), "control: the payload should run through torch's own reader"
    marker.unlink()
    with pytest.raises(CheckpointError, match="refused to load builtins.exec"):
        read_metadata(path)
    write_manifest(path, 1, 1)  # an attacker who can write the folder rewrites the manifest
    assert latest_checkpoint(path.parents[1], warn=None) is None
    assert not marker.exists()


def test_real_metadata_reads_with_the_restricted_unpickler(checkpoint):
    path, model = checkpoint
    metadata = read_metadata(path)
    saved = {key.removeprefix("model.") for key in metadata.state_dict_metadata}
    assert set(model.state_dict()) <= saved


@pytest.mark.parametrize(
    "payload",
    [
        lambda m: Payload(m),
        lambda m: [1, {"x": Payload(m)}],
    ],
)
def test_restricted_unpickler_refuses_callables(tmp_path, payload):
    marker = tmp_path / "pwned"
    data = pickle.dumps(payload(marker))
    with pytest.raises(pickle.UnpicklingError):
        RestrictedUnpickler(io.BytesIO(data)).load()
    assert not marker.exists()
    # And names outside the list even when they look harmless.
    with pytest.raises(pickle.UnpicklingError, match="os.getcwd"):
        RestrictedUnpickler(io.BytesIO(b"cos\ngetcwd\n(tR.")).load()


def _evil_optimizer_checkpoint(path, marker):
    """A DCP checkpoint whose optimiser param_groups hold a payload (stored as a byte entry)."""
    model = small_model()
    optimizer = trained(model)
    state = optimizer.state_dict()
    state["param_groups"][0]["lr"] = Payload(marker)
    dcp.save({"optim": state}, checkpoint_id=str(path), no_dist=True)
    return optimizer


def test_byte_entries_payload_runs_under_dcp_but_not_here(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt"
    optimizer = _evil_optimizer_checkpoint(path, marker)
    target = {"optim": optimizer.state_dict()}
    dcp.load(target, checkpoint_id=str(path), planner=DefaultLoadPlanner(), no_dist=True)
    assert marker.exists(), "control: DCP's default planner unpickles byte entries fully"
    marker.unlink()
    with pytest.raises(CheckpointException, match="more than plain data"):
        dcp.load(
            {"optim": optimizer.state_dict()},
            storage_reader=SafeFileSystemReader(str(path)),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
    assert not marker.exists()


def test_load_checkpoint_refuses_a_payload_in_the_optimiser_state(tmp_path, checkpoint):
    path, model = checkpoint
    marker = tmp_path / "pwned"
    model_state = {k: v for k, v in model.state_dict().items()}
    optimizer = trained(model)
    state = optimizer.state_dict()
    state["param_groups"][0]["lr"] = Payload(marker)
    # Rewrite the checkpoint as an attacker would: a valid DCP folder, a matching manifest.
    for file in path.glob("*.distcp"):
        file.unlink()
    (path / ".metadata").unlink()
    dcp.save({"model": model_state, "optim": state}, checkpoint_id=str(path), no_dist=True)
    write_manifest(path, 1, 1)
    with pytest.raises(CheckpointError, match="more than plain data"):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert not marker.exists()


def test_state_file_round_trip_and_payloads(tmp_path):
    state = {
        "step": 3,
        "lr": [0.1, 0.2],
        "nested": {"none": None, "flag": True, "name": "x"},
        "rng": torch.get_rng_state(),
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, dtype=torch.int64),
    }
    dump_state(tmp_path / "s.json", state)
    back = load_state(tmp_path / "s.json")
    assert back["step"] == 3 and back["lr"] == [0.1, 0.2] and back["nested"] == state["nested"]
    for key in ("rng", "bf16", "scalar", "empty"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), key
    # Anything but plain data is refused when written, and a pickle is not JSON when read.
    with pytest.raises(TypeError):
        dump_state(tmp_path / "bad.json", {"x": Payload(tmp_path / "pwned")})
    (tmp_path / "evil.json").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    with pytest.raises(CheckpointError, match="not a readable checkpoint state file"):
        load_state(tmp_path / "evil.json")
    (tmp_path / "dtype.json").write_text('{"t": {"__tensor__": "Tensor", "shape": [], "data": ""}}')
    with pytest.raises(CheckpointError, match="unknown tensor dtype"):
        load_state(tmp_path / "dtype.json")
    assert not (tmp_path / "pwned").exists()
