"""`multitoken train` end to end, through the real command line, on a small stdlib corpus.

Runs with several ranks are their own process (the CLI launches its ranks for parallel.cp/dp >
1), so these tests exercise exactly what a user runs: config parsing, data preparation, the
elastic launcher, the loop, checkpoints and metrics. One-rank runs and bad input go through the
same ``main()`` in this process (``tests.helpers.cli``). Every run shares one data cache, and
the uninterrupted one-process run is the session's ``reference`` (conftest.py).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from tests.helpers.cli import (
    assert_one_error,
    assert_same_records,
    cli,
    run_subprocess,
    tiny_args,
    train_cli,
    train_ok,
    train_records,
    tree,
)


def test_reference_run_records(reference):
    records = train_records(reference)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in (
        "step",
        "tokens",
        "loss",
        "loss_main",
        "loss_mtp",
        "acc_main",
        "acc_mtp",
        "lr",
        "tokens_per_s",
    ):
        assert key in records[0], key
    assert len(records[0]["loss_mtp"]) == 2 and len(records[0]["acc_mtp"]) == 2
    val = [
        json.loads(x)
        for x in (reference / "metrics.jsonl").read_text().splitlines()
        if '"split": "val"' in x
    ]
    assert [v["step"] for v in val] == [3, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (reference / "config.toml").is_file() and (reference / "tokenizer.json").is_file()
    assert (reference / "checkpoints" / "step_000006" / ".metadata").is_file()


def test_cp2_logs_the_same_losses_as_cp1(run_root, reference):
    run_subprocess(run_root, "parallel.cp=2", "run.name=cp2")
    assert_same_records(train_records(run_root / "cp2"), train_records(reference))


def test_cp2_fallback_exchange_logs_the_same_losses(run_root, reference):
    run_subprocess(run_root, "parallel.cp=2", "parallel.halo_fill=exchange", "run.name=cp2x")
    assert_same_records(train_records(run_root / "cp2x"), train_records(reference))


def test_dp2_equals_dp1_with_the_same_global_batch(run_root, reference):
    run_subprocess(run_root, "parallel.cp=1", "parallel.dp=2", "run.name=dp2")
    dp2, dp1 = train_records(run_root / "dp2"), train_records(reference)
    assert_same_records(dp2, dp1)
    for a, b in zip(dp2, dp1):  # acceptance too is summed over the DP ranks sum / sum
        for key in ("agree_mtp", "accept_mtp"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_stop_and_resume_logs_the_same_steps(run_root, reference):
    train_ok(run_root, "run.name=resumed", "train.stop_after=3")
    assert [r["step"] for r in train_records(run_root / "resumed")] == [1, 2, 3]
    train_ok(run_root, "run.name=resumed", "train.resume=true")
    assert_same_records(train_records(run_root / "resumed"), train_records(reference), rtol=1e-6)
    again = train_ok(run_root, "run.name=resumed", "train.resume=true")
    assert "nothing to train: step 6 reaches train.steps=6" in again, again


def test_resume_with_other_model_settings_is_an_error(run_root):
    # Other model settings: one error line, and the run's config.toml is left as it was.
    # (Another parallel layout is fine: see test_layouts.py, checkpoints reshard.)
    train_ok(run_root, "run.name=otherworld", "train.stop_after=3")
    config = (run_root / "otherworld" / "config.toml").read_text()
    resume = ("run.name=otherworld", "train.resume=true")
    code, _, err = train_cli(run_root, *resume, "model.dim=64")
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: train.resume with model.dim=64"), err
    assert (run_root / "otherworld" / "config.toml").read_text() == config
    code, _, err = train_cli(
        run_root, "run.name=otherworld", "train.resume=true", "data.seq_len=32"
    )
    assert code == 2 and "data.seq_len=32" in err, err


def assert_blames_a_killed_rank(stderr: str, rank: int) -> None:
    """Torch elastic reports the killed rank, or the peer that lost its connection to it
    first (timing): the launcher's line names the kill, or says that a peer ended first."""
    error = [line for line in stderr.splitlines() if line.startswith("error: ")][-1]
    assert (
        f"error: rank {rank} " in error
        and "was killed by SIGKILL" in error
        or ("another rank ended first" in error and "out of memory?" in error)
    ), error


def test_killed_rank_leaves_the_last_complete_checkpoint_loadable(run_root):
    from multitoken.train.checkpoint import latest_checkpoint, load_for_inference

    # Rank 1 is SIGKILLed while saving step 6: step 6 stays partial, step 3 is the newest.
    proc = run_subprocess(
        run_root,
        "parallel.cp=2",
        "run.name=killed",
        env={"MULTITOKEN_FAULT": "save6:1"},
        check=False,
    )
    assert proc.returncode != 0
    assert_blames_a_killed_rank(proc.stderr, 1)
    run = run_root / "killed"
    assert (run / "checkpoints" / "step_000006.partial").is_dir()
    assert latest_checkpoint(run).name == "step_000003"
    model, tokenizer = load_for_inference(run)
    assert model.num_depths == 2 and tokenizer.vocab_size <= 400
    # A rank killed mid-step (not saving) also leaves step 3 as the newest checkpoint.
    proc = run_subprocess(
        run_root,
        "parallel.cp=2",
        "run.name=killed2",
        env={"MULTITOKEN_FAULT": "step5:0"},
        check=False,
    )
    assert proc.returncode != 0
    assert_blames_a_killed_rank(proc.stderr, 0)
    assert latest_checkpoint(run_root / "killed2").name == "step_000003"
    # And the run resumes from it to the end.
    run_subprocess(run_root, "parallel.cp=2", "run.name=killed2", "train.resume=true")
    assert [r["step"] for r in train_records(run_root / "killed2")] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_run_refuses_to_overwrite_an_earlier_one(run_root, reference):
    before = tree(reference)
    code, _, err = train_cli(run_root, f"run.name={reference.name}")
    assert code == 2 and "already holds a run" in err and "Traceback" not in err, err
    assert tree(reference) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent/corpus"], "data path '/nonexistent/corpus' does not exist"),
        (["model.dimm=3"], "unknown config key 'model.dimm'"),
        (["train.steps=many"], "train.steps must be int"),
        (["data.seq_len=66", "parallel.cp=2"], "not compatible with parallel.cp=2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_root, args, message):
    code, _, err = cli(*tiny_args(run_root, *args))
    assert_one_error(code, err, message)


def test_empty_corpus_is_a_clear_error(run_root):
    empty = run_root / "empty"
    empty.mkdir()
    code, _, err = cli(*tiny_args(run_root, "--data", str(empty)))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error:") and "empty" in err.lower(), err


def test_own_text_folder_and_plain_next_token_run(run_root):
    """--data on a folder of text files, with mtp.num_depths=0 (the plain next-token model)."""
    corpus = run_root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(stdlib.glob("*.py"))[:24]:
        (corpus / (source.stem + ".txt")).write_text(source.read_text(encoding="utf-8"))
    train_ok(run_root, "mtp.num_depths=0", "run.name=plain", "--data", str(corpus))
    records = train_records(run_root / "plain")
    assert records[-1]["loss_mtp"] == [] and records[-1]["loss"] == records[-1]["loss_main"]


def test_generate_command_line(reference):
    cmd = ["generate", "--run", str(reference)]
    prompt = ["--prompt", "def parse(", "--max-new-tokens", "12"]
    code, out, err = cli(*cmd, *prompt, "--speculative", "--json")
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    for key in ("text", "tokens", "forwards", "tokens_per_forward", "acceptance", "tokens_per_s"):
        assert key in record, key
    assert record["tokens"] == 12 and len(record["acceptance"]) == 2
    code, out, err = cli(*cmd, *prompt, "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["text"] == record["text"]


def test_generate_refuses_speculative_without_mtp_heads(run_root):
    plain = run_root / "plain"
    if not plain.exists():
        train_ok(run_root, "mtp.num_depths=0", "run.name=plain", "train.steps=3")
    code, out, err = cli("generate", "--run", str(plain), "--speculative")
    assert code == 2 and "Traceback" not in err
    assert "without MTP heads" in err and "drop --speculative" in err
