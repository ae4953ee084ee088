"""What the launcher says when ranks fail (torch elastic's failure records, built here)."""

from __future__ import annotations

import json

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from multitoken.errors import ConfigError
from multitoken.train.launch import RankFailed, _rank_failure


def _failures(*failures: ProcessFailure) -> ChildFailedError:
    return ChildFailedError("multitoken", {f.local_rank: f for f in failures})


def _failure(tmp_path, rank: int, exitcode: int, message: str | None = None) -> ProcessFailure:
    error_file = tmp_path / f"error{rank}.json"
    if message is not None:
        record = {"message": {"message": message, "extraInfo": {"timestamp": "1"}}}
        error_file.write_text(json.dumps(record))
    return ProcessFailure(rank, 1000 + rank, exitcode, str(error_file))


def test_a_rank_killed_by_a_signal_is_the_cause(tmp_path):
    err = _failures(
        _failure(tmp_path, 0, 1, "RuntimeError: Connection reset by peer"),
        _failure(tmp_path, 1, -9),
    )
    failure = _rank_failure(err)
    assert isinstance(failure, RankFailed)
    assert str(failure).startswith("rank 1 (pid 1001) was killed by SIGKILL (out of memory?")


def test_a_lost_peer_is_said_when_the_killed_rank_is_not_reported(tmp_path):
    err = _failures(_failure(tmp_path, 0, 1, "RuntimeError: Connection reset by peer"))
    assert "another rank ended first" in str(_rank_failure(err))


def test_a_user_error_of_a_rank_is_the_launchers_error(tmp_path):
    err = _failures(_failure(tmp_path, 1, 2, "ConfigError: data.seq_len must be > 0"))
    failure = _rank_failure(err)
    assert isinstance(failure, ConfigError) and str(failure) == "data.seq_len must be > 0"
