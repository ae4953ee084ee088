"""Tensor parallelism and HSDP through the real command line: the same losses as one process.

(CP = 2, the fallback exchange and DP = 2 are compared in ``test_train_cli.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
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
    """Saved by FSDP2 at dp = 2, resumed at tp = 2, at cp = 2 and on one rank; saved by a
    sequence-parallel TP run (tp 2, and tp 2 x cp 2 with FSDP2 over cp), resumed on one rank
    and at tp 2: each run continues with the losses of the uninterrupted run (DCP reshards
    the DTensor state)."""
    os.chdir(tmp_path)
    heads = ["model.n_heads=2", "model.n_kv_heads=2"]
    run_cli(tmp_path, *heads, "parallel.cp=1", "run.name=whole")
    whole = train_records(tmp_path / "whole")
    dp2 = ["parallel.cp=1", "parallel.dp=2"]
    tp2 = ["parallel.cp=1", "parallel.tp=2"]
    for name, saved, resumed in (
        ("dp2_to_tp2", dp2, tp2),
        ("dp2_to_cp2", dp2, ["parallel.cp=2"]),
        ("dp2_to_one", dp2, ["parallel.cp=1"]),
        ("tp2_to_one", tp2, ["parallel.cp=1"]),
        ("tp2cp2_to_tp2", ["parallel.cp=2", "parallel.tp=2"], tp2),
    ):
        run_cli(tmp_path, *heads, *saved, f"run.name={name}", "train.stop_after=3")
        run_cli(tmp_path, *heads, *resumed, f"run.name={name}", "train.resume=true")
        assert_same_records(train_records(tmp_path / name), whole)


DP2 = ["parallel.cp=1", "parallel.dp=2"]
HSDP = [*DP2, "parallel.dp_replicate=2"]  # two replicas of one shard each


def resume_elsewhere(tmp_path, name: str, saved: list[str], resumed: list[str]) -> None:
    """Steps 1-3 in the ``saved`` layout, 4-6 resumed from its checkpoint in ``resumed``: the
    records of both equal the uninterrupted single process's."""
    os.chdir(tmp_path)
    run_cli(tmp_path, "parallel.cp=1", "run.name=whole")
    run_cli(tmp_path, *saved, f"run.name={name}", "train.stop_after=3")
    run_cli(tmp_path, *resumed, f"run.name={name}", "train.resume=true")
    assert_same_records(train_records(tmp_path / name), train_records(tmp_path / "whole"))


def test_hsdp_logs_the_same_losses_and_resumes_at_plain_dp(tmp_path):
    """parallel.dp_replicate=2 at dp = 2 (HSDP) logs the losses of one process, and its
    checkpoint resumes at plain dp = 2 (FSDP2 sharded over both ranks)."""
    resume_elsewhere(tmp_path, "hsdp_to_dp2", HSDP, DP2)


@pytest.mark.slow
def test_plain_dp_checkpoint_resumes_under_hsdp(tmp_path):
    """The other way (also checked without the command line in test_hsdp.py)."""
    resume_elsewhere(tmp_path, "dp2_to_hsdp", DP2, HSDP)


def test_dp_replicate_that_does_not_divide_dp_is_one_line(tmp_path):
    os.chdir(tmp_path)
    bad = ["parallel.cp=1", "parallel.dp=2", "parallel.dp_replicate=4", "run.name=bad"]
    proc = run_cli(tmp_path, *bad, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: parallel.dp_replicate must divide parallel.dp=2")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_compiled_tp_logs_the_same_losses(tmp_path):
    """train.compile=true under sequence-parallel TP x CP through the command line (compiling
    on 4 ranks takes about a minute on 2 cores; the library-level check is in make test)."""
    os.chdir(tmp_path)
    heads = ["model.n_heads=2", "model.n_kv_heads=2"]
    run_cli(tmp_path, *heads, "parallel.cp=1", "run.name=one")
    compiled = ["parallel.cp=2", "parallel.tp=2", "train.compile=true", "run.name=compiled"]
    proc = run_cli(tmp_path, *heads, *compiled)
    assert "training eagerly" not in proc.stdout
    assert_same_records(train_records(tmp_path / "compiled"), train_records(tmp_path / "one"))


def test_a_vocabulary_tp_does_not_divide_is_padded_by_model_vocab_size(tmp_path):
    """A tokenizer of 401 tokens (odd: GPT-2's 50,257 is too) under tp 2: refused at once with
    the fix, nothing written; with model.vocab_size=402 (a padding row, never a target) tp 2
    logs the losses of one process with the same 402 rows, and decodes over the 401 tokens."""
    os.chdir(tmp_path)
    heads = ["model.n_heads=2", "model.n_kv_heads=2", "parallel.cp=1"]
    refused = run_cli(tmp_path, *heads, "parallel.tp=2", "data.vocab_size=401", "run.name=x",
                      check=False)  # fmt: skip
    assert refused.returncode == 2 and "set data.vocab_size=402" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    run_cli(tmp_path, *heads, "data.vocab_size=401", "train.steps=1", "run.name=tok")
    tokenizer = f"data.tokenizer={tmp_path / 'tok' / 'tokenizer.json'}"
    refused = run_cli(tmp_path, *heads, tokenizer, "parallel.tp=2", "run.name=y", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "401 rows are not divisible by parallel.tp=2" in refused.stderr
    assert "model.vocab_size=402" in refused.stderr and not (tmp_path / "y").exists()
    padded = [*heads, tokenizer, "model.vocab_size=402"]
    run_cli(tmp_path, *padded, "run.name=one")
    run_cli(tmp_path, *padded, "parallel.tp=2", "run.name=tp2")
    assert_same_records(train_records(tmp_path / "tp2"), train_records(tmp_path / "one"))
    generate = [sys.executable, "-m", "multitoken", "generate", "--run", str(tmp_path / "tp2")]
    proc = subprocess.run([*generate, "--prompt", "def f(", "--max-new-tokens", "8", "--json"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens"] == 8
