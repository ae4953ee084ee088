"""A stop signal while offline features are being built stops the build at its next batch, in
``multitoken train`` and in ``multitoken features``: exit 128 + signal, one line saying so, no
finished feature folder; the same command then finishes."""

from __future__ import annotations

import os
import signal

import pytest
from tests.helpers.cli import TINY, cli, train_cli

import multitoken.train.features as features

HEADS = ["mtp.freeze_base=true", "features.mode=offline", "features.batch_rows=1"]


@pytest.fixture
def sigterm_in_first_batch(monkeypatch):
    """SIGTERM to this process during the build's first backbone batch (the handler the run
    installed only records it)."""
    calls, outputs = [], features.backbone_outputs

    def first_batch_signals(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return outputs(*args, **kwargs)

    monkeypatch.setattr(features, "backbone_outputs", first_batch_signals)
    return calls


def feature_folders(root) -> set[str]:
    """ "partial" and/or "finished" feature folders under the run's cache."""
    kinds = {".partial": "partial", "": "finished", ".lock": "lock"}
    return {kinds[p.suffix] for p in (root / "cache").glob("features-*")}


def test_train_stops_while_building_features(tmp_path, sigterm_in_first_batch, monkeypatch):
    code, _, err = train_cli(tmp_path, *HEADS, "run.name=stopped")
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and len(sigterm_in_first_batch) == 1
    assert feature_folders(tmp_path) == {"partial", "lock"}
    monkeypatch.undo()
    code, _, err = train_cli(tmp_path, *HEADS, "run.name=stopped", "train.resume=auto")
    assert code == 0, err
    assert "finished" in feature_folders(tmp_path)


def test_features_command_stops_while_building(tmp_path, sigterm_in_first_batch, monkeypatch):
    argv = ["features", *TINY, "parallel.cp=1", f"data.cache_dir={tmp_path}/cache", *HEADS]
    code, out, err = cli(*argv)
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM while building features")
    monkeypatch.undo()
    code, out, err = cli(*argv)
    assert code == 0 and "features in " in out, err
