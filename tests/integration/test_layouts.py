"""Tensor parallelism through the real command line: the same losses as one process.

(CP = 2, the fallback exchange and DP = 2 are compared in ``test_train_cli.py``.)
"""

from __future__ import annotations

import os

from test_train_cli import assert_same_records, run_cli, train_records


def test_tp2_and_tp2_cp2_log_the_same_losses_as_one_process(tmp_path):
    os.chdir(tmp_path)
    heads = ["model.n_heads=2", "model.n_kv_heads=2"]  # tp must divide the KV heads
    run_cli(tmp_path, *heads, "parallel.cp=1", "run.name=one")
    run_cli(tmp_path, *heads, "parallel.cp=1", "parallel.tp=2", "run.name=tp2")
    run_cli(tmp_path, *heads, "parallel.cp=2", "parallel.tp=2", "run.name=tp2cp2")
    one = train_records(tmp_path / "one")
    assert_same_records(train_records(tmp_path / "tp2"), one)
    assert_same_records(train_records(tmp_path / "tp2cp2"), one)


def test_tp_that_does_not_divide_the_heads_is_one_line(tmp_path):
    os.chdir(tmp_path)
    proc = run_cli(tmp_path, "parallel.cp=1", "parallel.tp=2", "run.name=bad", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "tp" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_checkpoints_reshard_to_any_layout(tmp_path):
    """Saved by FSDP2 at dp = 2, resumed at tp = 2, at cp = 2 and on one rank: each run
    continues with the losses of the uninterrupted run (DCP reshards the DTensor state)."""
    os.chdir(tmp_path)
    heads = ["model.n_heads=2", "model.n_kv_heads=2"]
    run_cli(tmp_path, *heads, "parallel.cp=1", "run.name=whole")
    whole = train_records(tmp_path / "whole")
    for name, layout in (
        ("to_tp2", ["parallel.cp=1", "parallel.tp=2"]),
        ("to_cp2", ["parallel.cp=2"]),
        ("to_one", ["parallel.cp=1"]),
    ):
        run_cli(tmp_path, *heads, "parallel.cp=1", "parallel.dp=2", f"run.name={name}",
                "train.stop_after=3")  # fmt: skip
        run_cli(tmp_path, *heads, *layout, f"run.name={name}", "train.resume=true")
        assert_same_records(train_records(tmp_path / name), whole)
