"""A run with an acceptance-aware loss logs the same losses and acceptance metrics at cp = 2
and tp = 2 as in one process (the trainer's path: the CP teacher rows from the peers, the
vocabulary-parallel distillation and acceptance)."""

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
    for name in ("cp2", "tp2"):
        other = train_records(tmp_path / name)
        assert_same_records(one, other)
        for a, b in zip(one, other):  # the acceptance metrics are logged in every layout
            for key in ("agree_mtp", "accept_mtp"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (name, key)
