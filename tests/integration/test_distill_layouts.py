"""A run with an acceptance-aware loss logs the same losses at cp = 2 and tp = 2 as in one
process (the trainer's path: the CP teacher rows from the peers, the vocabulary-parallel
distillation)."""

from __future__ import annotations

import pytest
from tests.helpers.cli import HEADS2, assert_same_records, run_subprocess, train_ok, train_records

LOSS = ["mtp.loss=lk", "mtp.lk_alpha=0.3", "train.eval_every=0", "train.save_every=0"]


@pytest.mark.slow
def test_cp2_and_tp2_runs_log_the_one_process_losses(tmp_path):
    train_ok(tmp_path, *LOSS, *HEADS2, "run.name=one")
    run_subprocess(tmp_path, *LOSS, *HEADS2, "parallel.cp=2", "run.name=cp2")
    run_subprocess(tmp_path, *LOSS, *HEADS2, "parallel.cp=1", "parallel.tp=2", "run.name=tp2")
    one = train_records(tmp_path / "one")
    assert_same_records(one, train_records(tmp_path / "cp2"))
    assert_same_records(one, train_records(tmp_path / "tp2"))
