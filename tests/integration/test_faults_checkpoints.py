"""Loading a run folder: planted payloads never run, damage falls back to the previous
checkpoint with an identical continuation, a non-finite update is never applied or saved.

In-process runs of the command line (one rank): the same code path as ``multitoken train``
and ``multitoken generate``, seconds each.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from tests.helpers.cli import (
    assert_one_error,
    assert_same_records,
    cli,
    copy_run,
    train_cli,
    train_records,
)

from multitoken.train.checkpoint import checkpoint_folders, load_for_inference
from multitoken.train.manifest import read_manifest, write_manifest

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def plant(run, relative, marker):
    """Replace a file with a pickle payload; inside a checkpoint, rewrite its manifest to match
    (an attacker who can write the folder can do that too)."""
    path = run / relative
    path.write_bytes(pickle.dumps(Payload(marker)))
    folder = path.parent
    if folder.parent.name == "checkpoints" and path.name != "manifest.json":
        write_manifest(folder, read_manifest(folder).step, read_manifest(folder).world)


PLANTED = [
    "config.toml",
    "tokenizer.json",
    "metrics.jsonl",
    "checkpoints/latest",
    "checkpoints/step_000006/.metadata",
    "checkpoints/step_000006/__0_0.distcp",
    "checkpoints/step_000006/extra_rank0.json",
    "checkpoints/step_000006/manifest.json",
]


@pytest.mark.parametrize("relative", PLANTED)
def test_a_payload_in_any_file_never_runs(reference, run_root, relative):
    run = copy_run(reference, run_root, "planted")
    marker = run_root / "pwned"
    plant(run, relative, marker)
    resumed = train_cli(run_root, "run.name=planted", "train.resume=true")
    generated = cli("generate", "--run", str(run), "--max-new-tokens", "3")
    assert not marker.exists(), f"the payload in {relative} ran"
    for code, _, err in (resumed, generated):
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert len([x for x in err.splitlines() if x.startswith("error:")]) == 1, err


def test_a_payload_in_every_file_never_runs(reference, run_root):
    run = copy_run(reference, run_root, "all_planted")
    marker = run_root / "pwned_all"
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != "manifest.json")
    for path in files:
        plant(run, path.relative_to(run), marker)
    for _, folder in checkpoint_folders(run):
        write_manifest(folder, read_manifest(folder).step, read_manifest(folder).world)
    code, _, err = train_cli(run_root, "run.name=all_planted", "train.resume=true")
    assert_one_error(code, err, "not a multitoken run folder")
    code, _, err = cli("generate", "--run", str(run))
    assert code == 2 and "Traceback" not in err, err
    (run / "config.toml").write_bytes((reference / "config.toml").read_bytes())
    (run / "tokenizer.json").write_bytes((reference / "tokenizer.json").read_bytes())
    code, _, err = cli("generate", "--run", str(run))
    assert_one_error(code, err, "no intact checkpoint")
    assert err.count("warning: skipping damaged checkpoint") == 2, err
    assert not marker.exists()


def _shard(folder):
    return next(folder.glob("*.distcp"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_40_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 40):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": lambda f: _truncate(_shard(f)),
    "missing shard": lambda f: _shard(f).unlink(),
    "empty index": lambda f: (f / ".metadata").write_bytes(b""),
    "truncated state file": lambda f: _truncate(f / "extra_rank0.json"),
    "40 flipped bytes": lambda f: _flip_40_bytes(_shard(f)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_resumes_from_the_previous_identically(reference, run_root, damage):
    run = copy_run(reference, run_root, "damaged")
    DAMAGE[damage](run / "checkpoints" / "step_000006")
    code, out, err = train_cli(run_root, "run.name=damaged", "train.resume=true")
    assert code == 0 and "Traceback" not in err, err
    assert "warning: skipping damaged checkpoint" in err and "step_000006" in err, err
    assert "from step 3" in out, out
    assert_same_records(train_records(run), train_records(reference), rtol=1e-6)


def test_generate_falls_back_to_the_newest_intact_checkpoint(reference, run_root):
    run = copy_run(reference, run_root, "damaged_generate")
    _flip_40_bytes(_shard(run / "checkpoints" / "step_000006"))
    code, _, err = cli("generate", "--run", str(run), "--max-new-tokens", "2")
    assert code == 0 and "skipping damaged checkpoint" in err and "SHA-256" in err, err


def _weights(run, step):
    model, _ = load_for_inference(run, step)
    return model.state_dict()


def test_non_finite_updates_are_skipped_counted_and_never_saved(run_root, monkeypatch):
    monkeypatch.setenv("MULTITOKEN_FAULT", "nan2:0,nan3:0")
    args = ("run.name=nan", "train.steps=4", "train.save_every=1", "train.keep_checkpoints=0")
    code, _, err = train_cli(run_root, *args)
    assert code == 0, err
    run = run_root / "nan"
    assert [r["skipped"] for r in train_records(run)] == [0, 1, 2, 2]
    # Steps 2 and 3 changed nothing; step 4 updated again; every checkpoint is finite.
    after_1, after_3, after_4 = (_weights(run, s) for s in (1, 3, 4))
    assert all(torch.equal(after_1[k], after_3[k]) for k in after_1)
    assert any(not torch.equal(after_3[k], after_4[k]) for k in after_1)
    assert all(torch.isfinite(v).all() for v in after_4.values())


def test_too_many_non_finite_steps_stop_the_run_naming_them(run_root, monkeypatch):
    monkeypatch.setenv("MULTITOKEN_FAULT", "nan2:0,nan3:0,nan4:0")
    args = ("run.name=nan_stop", "train.save_every=1", "train.keep_checkpoints=0")
    code, _, err = train_cli(run_root, *args, "train.max_skipped_steps=2")
    assert_one_error(code, err, "non-finite loss or gradient norm at step 2 through 4")
    run = run_root / "nan_stop"
    assert [n for n, _ in checkpoint_folders(run)] == [3, 2, 1]
    for number in (1, 2, 3):
        assert all(torch.isfinite(v).all() for v in _weights(run, number).values())
