"""Tensor parallelism and HSDP through the real command line: the same losses as one process.

(CP = 2, the fallback exchange and DP = 2 are compared in ``test_train_cli.py``.)
"""

from __future__ import annotations

import json

import pytest
from tests.helpers.cli import (
    HEADS2,
    assert_same_records,
    cli,
    copy_run,
    run_subprocess,
    tiny_args,
    train_ok,
    train_records,
)

DP2 = ["parallel.cp=1", "parallel.dp=2"]
HSDP = [*DP2, "parallel.dp_replicate=2"]  # two replicas of one shard each
TP2 = ["parallel.cp=1", "parallel.tp=2"]


def assert_refused(code: int, err: str, run) -> None:
    """One line on stderr, an ``error:``, and no run folder."""
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_tp2_and_tp2_cp2_log_the_same_losses_as_one_process(run_root, reference_heads2):
    run_subprocess(run_root, *HEADS2, *TP2, "run.name=tp2")
    run_subprocess(run_root, *HEADS2, "parallel.cp=2", "parallel.tp=2", "run.name=tp2cp2")
    one = train_records(reference_heads2)
    assert_same_records(train_records(run_root / "tp2"), one)
    assert_same_records(train_records(run_root / "tp2cp2"), one)


def test_tp_that_does_not_divide_the_heads_is_one_line(run_root):
    code, _, err = cli(*tiny_args(run_root, *TP2, "run.name=bad_tp"))
    assert_refused(code, err, run_root / "bad_tp")
    assert "tp" in err, err


def _reshard(run_root, reference_heads2, cases) -> None:
    """Each case: steps 1-3 saved in one layout, resumed in another; the records equal the
    uninterrupted run's (DCP reshards the DTensor state). A layout's checkpoint is saved once
    and copied for each resume; one-rank resumes run in this process, the others as the
    launcher."""
    whole = train_records(reference_heads2)
    saved_by = {}
    for name, saved, resumed in cases:
        key = tuple(saved)
        if key in saved_by:
            copy_run(saved_by[key], run_root, name)
        else:
            run_subprocess(run_root, *HEADS2, *saved, f"run.name={name}", "train.stop_after=3")
            saved_by[key] = copy_run(run_root / name, run_root, f"{name}_saved")
        assert [r["step"] for r in train_records(run_root / name)] == [1, 2, 3]
        resume = [*HEADS2, f"run.name={name}", "train.resume=true"]
        if resumed == ["parallel.cp=1"]:
            train_ok(run_root, *resume)
        else:
            run_subprocess(run_root, *resumed, *resume)
        assert_same_records(train_records(run_root / name), whole)


def test_checkpoints_reshard_to_one_rank(run_root, reference_heads2):
    """Saved by FSDP2 at dp = 2 and by a sequence-parallel TP run at tp = 2, resumed on one
    rank with the losses of the uninterrupted run."""
    cases = [("dp2_to_one", DP2, ["parallel.cp=1"]), ("tp2_to_one", TP2, ["parallel.cp=1"])]
    _reshard(run_root, reference_heads2, cases)


@pytest.mark.slow
def test_checkpoints_reshard_between_multi_rank_layouts(run_root, reference_heads2):
    """Saved at dp = 2, resumed at tp = 2 and at cp = 2; saved at tp 2 x cp 2 (FSDP2 over
    cp), resumed at tp 2 (the in-pool checks of tests/distributed/test_hsdp.py reshard
    without the command line in make test)."""
    cases = [
        ("dp2_to_tp2", DP2, TP2),
        ("dp2_to_cp2", DP2, ["parallel.cp=2"]),
        ("tp2cp2_to_tp2", ["parallel.cp=2", "parallel.tp=2"], TP2),
    ]
    _reshard(run_root, reference_heads2, cases)


def resume_elsewhere(root, reference, name: str, saved: list[str], resumed: list[str]) -> None:
    """Steps 1-3 in the ``saved`` layout, 4-6 resumed from its checkpoint in ``resumed``: the
    records of both equal the uninterrupted single process's."""
    run_subprocess(root, *saved, f"run.name={name}", "train.stop_after=3")
    run_subprocess(root, *resumed, f"run.name={name}", "train.resume=true")
    assert_same_records(train_records(root / name), train_records(reference))


def test_hsdp_logs_the_same_losses_and_resumes_at_plain_dp(run_root, reference):
    """parallel.dp_replicate=2 at dp = 2 (HSDP) logs the losses of one process, and its
    checkpoint resumes at plain dp = 2 (FSDP2 sharded over both ranks)."""
    resume_elsewhere(run_root, reference, "hsdp_to_dp2", HSDP, DP2)


@pytest.mark.slow
def test_plain_dp_checkpoint_resumes_under_hsdp(run_root, reference):
    """The other way (also checked without the command line in test_hsdp.py)."""
    resume_elsewhere(run_root, reference, "dp2_to_hsdp", DP2, HSDP)


def test_dp_replicate_that_does_not_divide_dp_is_one_line(run_root):
    bad = [*DP2, "parallel.dp_replicate=4", "run.name=bad_replicate"]
    code, _, err = cli(*tiny_args(run_root, *bad))
    assert_refused(code, err, run_root / "bad_replicate")
    assert err.startswith("error: parallel.dp_replicate must divide parallel.dp=2"), err


@pytest.mark.slow
def test_compiled_tp_logs_the_same_losses(run_root, reference_heads2):
    """train.compile=true under sequence-parallel TP x CP through the command line (compiling
    on 4 ranks takes about a minute on 2 cores; the library-level check is in make test)."""
    compiled = ["parallel.cp=2", "parallel.tp=2", "train.compile=true", "run.name=compiled_tp"]
    proc = run_subprocess(run_root, *HEADS2, *compiled)
    assert "training eagerly" not in proc.stdout
    assert_same_records(train_records(run_root / "compiled_tp"), train_records(reference_heads2))


def test_a_vocabulary_tp_does_not_divide_is_padded_by_model_vocab_size(run_root):
    """A tokenizer of 401 tokens (odd: GPT-2's 50,257 is too) under tp 2: refused at once with
    the fix, nothing written; with model.vocab_size=402 (a padding row, never a target) tp 2
    logs the losses of one process with the same 402 rows, and decodes over the 401 tokens."""
    heads = [*HEADS2, "parallel.cp=1"]
    code, _, err = cli(*tiny_args(run_root, *heads, "parallel.tp=2", "data.vocab_size=401",
                                  "run.name=vocab_x"))  # fmt: skip
    assert_refused(code, err, run_root / "vocab_x")
    assert "set data.vocab_size=402" in err, err
    train_ok(run_root, *heads, "data.vocab_size=401", "train.steps=1", "run.name=vocab_tok")
    tokenizer = f"data.tokenizer={run_root / 'vocab_tok' / 'tokenizer.json'}"
    code, _, err = cli(*tiny_args(run_root, *heads, tokenizer, "parallel.tp=2", "run.name=vocab_y"))
    assert code == 2, err
    assert "401 rows are not divisible by parallel.tp=2" in err
    assert "model.vocab_size=402" in err and not (run_root / "vocab_y").exists()
    padded = [*heads, tokenizer, "model.vocab_size=402"]
    train_ok(run_root, *padded, "run.name=vocab_one")
    run_subprocess(run_root, *padded, "parallel.tp=2", "run.name=vocab_tp2")
    assert_same_records(
        train_records(run_root / "vocab_tp2"), train_records(run_root / "vocab_one")
    )
    generate = ["generate", "--run", str(run_root / "vocab_tp2")]
    code, out, err = cli(*generate, "--prompt", "def f(", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["tokens"] == 8
