"""Careless and hostile input to ``multitoken train`` / ``generate`` / ``plot``: one ``error:``
line and exit 2, with nothing written outside the run folder and nothing destroyed before
everything was checked. In-process runs of the command line (one rank)."""

from __future__ import annotations

import json
import shutil

import pytest
from tests.helpers.cli import (
    TINY,
    assert_one_error,
    cli,
    copy_run,
    train_cli,
    train_records,
    tree,
)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../../evil", "run.name must be a plain folder name"),
        ("/tmp/multitoken-abs", "run.name must be a plain folder name"),
        ("", "run.name must be a plain folder name"),
        ("..", "run.name must be a plain folder name"),
        ("a\nb", "run.name must not contain control characters"),
    ],
)
def test_run_name_outside_its_folder_is_refused_with_nothing_written(tmp_path, name, message):
    runs = tmp_path / "a" / "b" / "runs"
    runs.mkdir(parents=True)
    before = tree(tmp_path)
    code, _, err = cli("train", *TINY, f"run.dir={runs}", f"run.name={name}")
    assert_one_error(code, err, message)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.init_std=-1"], "model.init_std must be > 0"),
        (["--data", "/nonexistent/corpus"], "data path '/nonexistent/corpus' does not exist"),
        (["data.cache_dir=/dev/null"], "data.cache_dir='/dev/null': /dev/null exists and is not"),
    ],
)
def test_overwrite_destroys_nothing_before_everything_is_checked(
    reference, run_root, args, message
):
    run = copy_run(reference, run_root, "keep")
    before = tree(run)
    code, _, err = train_cli(run_root, "run.name=keep", "run.overwrite=true", *args)
    assert_one_error(code, err, message)
    assert tree(run) == before


def test_a_foreign_folder_is_never_written_nor_cleared(run_root):
    parent = run_root / "home"
    foreign = parent / "project"
    foreign.mkdir(parents=True, exist_ok=True)
    (foreign / "metrics.jsonl").write_text("not a run\n")
    (foreign / "notes.txt").write_text("mine\n")
    before = tree(parent)
    code, _, err = cli(
        "train", *TINY, "parallel.cp=1", f"run.dir={parent}", "run.name=project",
        "run.overwrite=true", f"data.cache_dir={run_root}/cache",
    )  # fmt: skip
    assert_one_error(code, err, "is not a multitoken run folder")
    assert tree(parent) == before


def test_resume_with_another_seed_keeps_the_tokenizer(reference, run_root):
    run = copy_run(reference, run_root, "seeded")
    before = tree(run)
    code, _, err = train_cli(run_root, "run.name=seeded", "train.resume=true", "train.seed=1")
    assert_one_error(code, err, "these data settings give another tokenizer")
    assert tree(run) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.dim=65536", "model.n_heads=2"], "needs at least"),
        (["model.max_seq_len=1000000000000"], "rotary table"),
        (["train.seed=1e23"], "train.seed must be int"),
        (["train.seed=100000000000000000000000"], "train.seed must be in [0, 2**63)"),
        (["data.path=/tmp/a\nb"], "data.path must not contain control characters"),
        (["train.resume=sometimes"], 'train.resume must be true, false or "auto"'),
        (["train.keep_checkpoints=-1"], "train.keep_checkpoints must be >= 0"),
        (["train.resume=true", "run.overwrite=true"], "run.overwrite=true removes the run"),
        (["train.resume=true", "run.name=never_trained"], "has no checkpoint"),
    ],
)
def test_bad_values_are_one_error_line(run_root, args, message):
    code, _, err = train_cli(run_root, *args)
    assert_one_error(code, err, message)


def test_binary_config_file_is_one_error_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_bytes(bytes(range(256)))
    code, _, err = cli("train", str(config))
    assert_one_error(code, err, "is not valid TOML")


def test_garbage_in_metrics_is_skipped_with_a_warning(reference, run_root):
    run = copy_run(reference, run_root, "garbage")
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": \n\x00\xff garbage\n[1, 2]\n')
    code, out, err = cli("plot", str(run))
    assert code == 0 and "skipped 3 unreadable line(s)" in err, err
    # Resuming keeps the good records up to the checkpoint and continues after it.
    shutil.rmtree(run / "checkpoints" / "step_000006")
    code, _, err = train_cli(run_root, "run.name=garbage", "train.resume=true")
    assert code == 0 and "Traceback" not in err, err
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4, 5, 6]
    code, _, err = cli("plot", str(run_root / "no_such_run"))
    assert_one_error(code, err, "does not exist")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "nan"], "temperature must be a finite number"),
        (["--max-new-tokens", "-1"], "max_new_tokens must be >= 0"),
    ],
)
def test_generate_bad_arguments(reference, args, message):
    code, _, err = cli("generate", "--run", str(reference), *args)
    assert_one_error(code, err, message)


def test_generate_nothing_from_a_one_token_prompt(reference):
    code, out, err = cli(
        "generate", "--run", str(reference), "--prompt", "x", "--max-new-tokens", "0", "--json"
    )
    assert code == 0 and "Traceback" not in err, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["tokens"] == 0 and record["token_ids"] == [] and record["text"] == ""


def test_nproc_zero_is_refused():
    code, _, err = cli("train", *TINY, "--nproc", "0")
    assert_one_error(code, err, "--nproc 0")
