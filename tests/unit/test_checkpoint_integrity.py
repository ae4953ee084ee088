"""A checkpoint is complete and verified or it is not used; resume takes the newest intact one.

Every kind of damage the failure report found (a truncated or missing shard, an empty index, a
truncated state file, 40 flipped bytes in tensor data, a deleted rank file) is detected by
:func:`verify_checkpoint`, named in the warning, and skipped in favour of the older checkpoint.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests.helpers.models import SMALL_GPT, tiny_model

from multitoken.errors import CheckpointError
from multitoken.train.checkpoint import (
    checkpoint_folders,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from multitoken.train.manifest import MANIFEST, hash_files, verify_checkpoint, write_manifest

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def small_model(seed=0):
    return tiny_model(1, seed=seed, **SMALL_GPT)


def step(model, optimizer):
    sum(h.float().pow(2).mean() for h in model(torch.randint(2, 64, (2, 8)))).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def run(tmp_path):
    """A run folder with checkpoints of steps 1 and 2 (and the model of each)."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weights = {}
    for number in (1, 2):
        step(model, optimizer)
        save_checkpoint(tmp_path, number, model, optimizer, {"step": number})
        weights[number] = {k: v.clone() for k, v in model.state_dict().items()}
    return tmp_path, weights


def _shard(folder):
    return next(folder.glob("*.distcp"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_40_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": (lambda f: _truncate(_shard(f)), "bytes,"),
    "missing shard": (lambda f: _shard(f).unlink(), "is missing"),
    "empty index": (lambda f: (f / ".metadata").write_bytes(b""), ".metadata has 0 bytes"),
    "truncated state": (lambda f: _truncate(f / "extra_rank0.json"), "extra_rank0.json has"),
    "flipped bytes": (lambda f: _flip_40_bytes(_shard(f)), "does not match its SHA-256"),
    "no manifest": (lambda f: (f / "manifest.json").unlink(), "save did not finish"),
    "extra file": (lambda f: (f / "planted.distcp").write_bytes(b"x"), "is not listed"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_is_skipped_with_a_warning_naming_it(run, damage):
    run_dir, weights = run
    newest = run_dir / "checkpoints" / "step_000002"
    verify_checkpoint(newest)
    harm, reason = DAMAGE[damage]
    harm(newest)
    with pytest.raises(CheckpointError, match=reason.replace("(", r"\(")):
        verify_checkpoint(newest)
    warnings = []
    found = latest_checkpoint(run_dir, warn=warnings.append)
    assert found.name == "step_000001"
    assert len(warnings) == 1 and "step_000002" in warnings[0] and reason in warnings[0]
    # And the older one loads exactly what was saved at step 1.
    model = small_model(seed=1)
    extra = load_checkpoint(found, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert extra == {"step": 1}
    for key, value in weights[1].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_missing_rank_file_is_named(run):
    run_dir, _ = run
    folder = run_dir / "checkpoints" / "step_000002"
    # A two-rank checkpoint (rank 1's state file copied), then rank 1's file deleted.
    shutil.copy(folder / "extra_rank0.json", folder / "extra_rank1.json")
    write_manifest(folder, 2, 2)
    assert verify_checkpoint(folder).world == 2
    (folder / "extra_rank1.json").unlink()
    with pytest.raises(CheckpointError, match="extra_rank1.json is missing"):
        verify_checkpoint(folder)
    # A manifest that does not list a rank's file at all is named too.
    write_manifest(folder, 2, 2)
    with pytest.raises(CheckpointError, match="does not list extra_rank1.json"):
        verify_checkpoint(folder)


def test_resume_modes(run, tmp_path_factory):
    run_dir, _ = run
    assert resume_checkpoint(run_dir, False) is None
    assert resume_checkpoint(run_dir, True).name == "step_000002"
    assert resume_checkpoint(run_dir, "auto").name == "step_000002"
    empty = tmp_path_factory.mktemp("empty")
    assert resume_checkpoint(empty, "auto") is None  # a first start
    with pytest.raises(CheckpointError, match="train.resume=true but .* has no checkpoint"):
        resume_checkpoint(empty, True)
    # Every checkpoint damaged: starting over would bury them, under auto too.
    for _, folder in checkpoint_folders(run_dir):
        (folder / ".metadata").write_bytes(b"")
    for mode in (True, "auto"):
        with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
            resume_checkpoint(run_dir, mode)


def test_retention_keeps_the_newest(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for number in range(1, 6):
        save_checkpoint(tmp_path, number, model, optimizer, {"step": number}, keep=2)
    assert [n for n, _ in checkpoint_folders(tmp_path)] == [5, 4]
    # Resumed from step 4 after step 5 went bad: the save of step 5 replaces it, and folders of
    # steps past the one saved (what the abandoned future left) are removed.
    (tmp_path / "checkpoints" / "step_000009").mkdir()
    (tmp_path / "checkpoints" / "step_000007.partial").mkdir()
    save_checkpoint(tmp_path, 5, model, optimizer, {"step": 5}, keep=0)
    assert [n for n, _ in checkpoint_folders(tmp_path)] == [5, 4]
    assert not (tmp_path / "checkpoints" / "step_000007.partial").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000005"


def test_the_ranks_hash_disjoint_shares_that_make_the_whole_manifest(run):
    """A save's ranks each hash every world-th file; merged, their shares are the manifest
    one process writes by hashing everything."""
    folder = run[0] / "checkpoints" / "step_000002"
    whole = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).unlink()
    shares = [hash_files(folder, rank, 3) for rank in range(3)]
    names = [name for share in shares for name in share]
    assert len(names) == len(set(names)) == len(whole["files"]) >= 3  # disjoint, complete
    assert all(shares)  # every rank hashed something
    write_manifest(folder, 2, 1, {k: v for share in shares for k, v in share.items()})
    assert json.loads((folder / MANIFEST).read_text()) == whole
    verify_checkpoint(folder)


def test_a_first_wave_checkpoint_is_named_as_such(run):
    """multitoken 0.1 wrote no manifest and pickled its per-rank state: said so, not "damaged
    by an unfinished save", and its pickle is never opened."""
    folder = run[0] / "checkpoints" / "step_000002"
    (folder / MANIFEST).unlink()
    (folder / "extra_rank0.json").rename(folder / "extra_rank0.pt")
    with pytest.raises(CheckpointError, match="written by multitoken 0.1 .* never loaded"):
        verify_checkpoint(folder)
