"""``features.mode=offline`` through the command line: ``multitoken features`` builds them, a
heads-only run on float32 features logs the online run's losses, and damaged features or
features of another backbone end the run with one error line before any step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.helpers.cli import (
    TINY,
    assert_one_error,
    assert_same_records,
    cli,
    run_subprocess,
    train_cli,
    train_ok,
    train_records,
)

HEADS = ["mtp.freeze_base=true", "mtp.loss=tv", "train.eval_every=3"]
OFFLINE = ["features.mode=offline", "features.dtype=float32"]


def features_cli(root: Path, *args: str) -> tuple[int, str, str]:
    cache = f"data.cache_dir={root}/cache"
    return cli("features", *TINY, "parallel.cp=1", cache, *HEADS, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    code, out, err = features_cli(root, *OFFLINE)
    assert code == 0, err
    folder = Path(out.split("features in ")[1].split(":")[0])
    train_ok(root, *HEADS, "run.name=online")
    train_ok(root, *HEADS, *OFFLINE, "run.name=offline")
    return root, folder


def val_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"split": "val"' in line]


def test_a_run_on_float32_features_logs_the_online_losses(runs):
    root, folder = runs
    assert (folder / "index.json").is_file()
    assert_same_records(train_records(root / "online"), train_records(root / "offline"))
    assert_same_records(val_records(root / "online"), val_records(root / "offline"))
    online, offline = train_records(root / "online")[-1], train_records(root / "offline")[-1]
    assert offline["accept_mtp"] == pytest.approx(online["accept_mtp"], rel=1e-5)


def test_a_run_on_features_stopped_and_resumed_logs_the_same_steps(runs):
    root, _ = runs
    train_ok(root, *HEADS, *OFFLINE, "run.name=resumed", "train.stop_after=3")
    train_ok(root, *HEADS, *OFFLINE, "run.name=resumed", "train.resume=true")
    assert_same_records(train_records(root / "offline"), train_records(root / "resumed"))


def test_damaged_features_end_the_run_with_one_line(runs, tmp_path):
    root, folder = runs
    index = json.loads((folder / "index.json").read_text())
    path = folder / index["splits"]["train"]["parts"][0]["files"]["hidden"]["file"]
    saved = path.read_bytes()
    try:
        path.write_bytes(saved[:8] + bytes([saved[8] ^ 1]) + saved[9:])
        code, _, err = train_cli(root, *HEADS, *OFFLINE, "run.name=damaged")
        assert_one_error(code, err, f"{path.name} does not match its checksum")
        assert "remove" in err
    finally:
        path.write_bytes(saved)


def test_features_of_another_backbone_end_the_run_with_one_line(runs):
    root, folder = runs
    code, _, err = train_cli(
        root, *HEADS, *OFFLINE, f"features.path={folder}", "model.n_layers=2", "run.name=other"
    )
    assert_one_error(code, err, "were built for another backbone")


def test_offline_features_need_a_frozen_decoder_and_one_rank_per_row(tmp_path):
    code, _, err = train_cli(tmp_path, *OFFLINE)
    assert_one_error(code, err, "features.mode=offline reads a frozen decoder's outputs")
    frozen = "mtp.freeze_base=true"
    code, _, err = cli("train", *TINY, frozen, *OFFLINE, "parallel.cp=2", f"run.dir={tmp_path}")
    assert_one_error(code, err, "use parallel.cp=1 and parallel.tp=1")


@pytest.mark.slow
def test_data_parallel_ranks_read_the_features_the_launcher_built(tmp_path):
    """dp = 2: the launcher builds the features, each rank finds them by its own hash of the
    (FSDP2-sharded) backbone and reads its rows; the losses are the online run's."""
    layout = ["parallel.dp=2", "parallel.cp=1", *HEADS]
    run_subprocess(tmp_path, *layout, "run.name=online")
    run_subprocess(tmp_path, *layout, *OFFLINE, "run.name=offline")
    assert_same_records(train_records(tmp_path / "online"), train_records(tmp_path / "offline"))
