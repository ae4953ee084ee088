"""`multitoken train` end to end, through the real command line, on a small stdlib corpus.

Each run is a subprocess (the CLI launches its own ranks for parallel.cp/dp > 1), so these
tests exercise exactly what a user runs: config parsing, data preparation, the elastic
launcher, the loop, checkpoints and metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.max_seq_len=128",
    "mtp.num_depths=2",
    "data.max_files=24",
    "data.vocab_size=400",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.val_fraction=0.1",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.save_every=3",
]


def run_cli(tmp: Path, *args: str, env: dict | None = None, check: bool = True):
    cmd = [sys.executable, "-m", "multitoken", "train", *TINY, f"run.dir={tmp}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"split": "val"' not in line]


def assert_same_records(a: list[dict], b: list[dict], rtol: float = 1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_main"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol), (ra["step"], key)
        assert ra["loss_mtp"] == pytest.approx(rb["loss_mtp"], rel=rtol), ra["step"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder (and one tokenizer cache) for every run of this module."""
    root = tmp_path_factory.mktemp("train")
    cwd = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(cwd)


@pytest.fixture(scope="module")
def reference(workdir):
    """Single process, CP = DP = 1, six steps."""
    run_cli(workdir, "parallel.cp=1", "run.name=ref")
    return workdir / "ref"


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


def test_cp2_logs_the_same_losses_as_cp1(workdir, reference):
    run_cli(workdir, "parallel.cp=2", "run.name=cp2")
    assert_same_records(train_records(workdir / "cp2"), train_records(reference))


def test_cp2_fallback_exchange_logs_the_same_losses(workdir, reference):
    run_cli(workdir, "parallel.cp=2", "parallel.halo_fill=exchange", "run.name=cp2x")
    assert_same_records(train_records(workdir / "cp2x"), train_records(reference))


def test_dp2_equals_dp1_with_the_same_global_batch(workdir, reference):
    run_cli(workdir, "parallel.cp=1", "parallel.dp=2", "run.name=dp2")
    assert_same_records(train_records(workdir / "dp2"), train_records(reference))


def test_stop_and_resume_logs_the_same_steps(workdir, reference):
    run_cli(workdir, "parallel.cp=1", "run.name=resumed", "train.stop_after=3")
    assert [r["step"] for r in train_records(workdir / "resumed")] == [1, 2, 3]
    run_cli(workdir, "parallel.cp=1", "run.name=resumed", "train.resume=true")
    assert_same_records(train_records(workdir / "resumed"), train_records(reference), rtol=1e-6)
    again = run_cli(workdir, "parallel.cp=1", "run.name=resumed", "train.resume=true")
    assert "nothing to train: step 6 reaches train.steps=6" in again.stdout, again.stdout


def test_resume_with_other_model_settings_is_an_error(workdir):
    # Other model settings: one error line, and the run's config.toml is left as it was.
    # (Another parallel layout is fine: see test_layouts.py, checkpoints reshard.)
    run_cli(workdir, "parallel.cp=1", "run.name=otherworld", "train.stop_after=3")
    config = (workdir / "otherworld" / "config.toml").read_text()
    proc = run_cli(
        workdir, "parallel.cp=1", "run.name=otherworld", "train.resume=true", "model.dim=64",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: train.resume with model.dim=64"), proc.stderr
    assert (workdir / "otherworld" / "config.toml").read_text() == config
    proc = run_cli(
        workdir, "parallel.cp=1", "run.name=otherworld", "train.resume=true", "data.seq_len=32",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "data.seq_len=32" in proc.stderr, proc.stderr


def assert_blames_a_killed_rank(stderr: str, rank: int) -> None:
    """Torch elastic reports the killed rank, or the peer that lost its connection to it
    first (timing): the launcher's line names the kill, or says that a peer ended first."""
    error = [line for line in stderr.splitlines() if line.startswith("error: ")][-1]
    assert (
        f"error: rank {rank} " in error
        and "was killed by SIGKILL" in error
        or ("another rank ended first" in error and "out of memory?" in error)
    ), error


def test_killed_rank_leaves_the_last_complete_checkpoint_loadable(workdir):
    from multitoken.train.checkpoint import latest_checkpoint, load_for_inference

    # Rank 1 is SIGKILLed while saving step 6: step 6 stays partial, step 3 is the newest.
    proc = run_cli(
        workdir,
        "parallel.cp=2",
        "run.name=killed",
        env={"MULTITOKEN_FAULT": "save6:1"},
        check=False,
    )
    assert proc.returncode != 0
    assert_blames_a_killed_rank(proc.stderr, 1)
    run = workdir / "killed"
    assert (run / "checkpoints" / "step_000006.partial").is_dir()
    assert latest_checkpoint(run).name == "step_000003"
    model, tokenizer = load_for_inference(run)
    assert model.num_depths == 2 and tokenizer.vocab_size <= 400
    # A rank killed mid-step (not saving) also leaves step 3 as the newest checkpoint.
    proc = run_cli(
        workdir,
        "parallel.cp=2",
        "run.name=killed2",
        env={"MULTITOKEN_FAULT": "step5:0"},
        check=False,
    )
    assert proc.returncode != 0
    assert_blames_a_killed_rank(proc.stderr, 0)
    assert latest_checkpoint(workdir / "killed2").name == "step_000003"
    # And the run resumes from it to the end.
    run_cli(workdir, "parallel.cp=2", "run.name=killed2", "train.resume=true")
    assert [r["step"] for r in train_records(workdir / "killed2")] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_run_refuses_to_overwrite_an_earlier_one(workdir, reference):
    proc = run_cli(workdir, "parallel.cp=1", "run.name=ref", check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent/corpus"], "data path '/nonexistent/corpus' does not exist"),
        (["model.dimm=3"], "unknown config key 'model.dimm'"),
        (["train.steps=many"], "train.steps must be int"),
        (["data.seq_len=66", "parallel.cp=2"], "not compatible with parallel.cp=2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(workdir, args, message):
    proc = run_cli(workdir, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_empty_corpus_is_a_clear_error(workdir):
    empty = workdir / "empty"
    empty.mkdir()
    proc = run_cli(workdir, "--data", str(empty), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "empty" in proc.stderr.lower(), proc.stderr


def test_own_text_folder_and_plain_next_token_run(workdir):
    """--data on a folder of text files, with mtp.num_depths=0 (the plain next-token model)."""
    import sysconfig

    corpus = workdir / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(stdlib.glob("*.py"))[:24]:
        (corpus / (source.stem + ".txt")).write_text(source.read_text(encoding="utf-8"))
    run_cli(workdir, "parallel.cp=1", "mtp.num_depths=0", "run.name=plain", "--data", str(corpus))
    records = train_records(workdir / "plain")
    assert records[-1]["loss_mtp"] == [] and records[-1]["loss"] == records[-1]["loss_main"]


def test_generate_command_line(workdir, reference):
    cmd = [sys.executable, "-m", "multitoken", "generate", "--run", str(reference)]
    prompt = ["--prompt", "def parse(", "--max-new-tokens", "12"]
    proc = subprocess.run(
        [*cmd, *prompt, "--speculative", "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("text", "tokens", "forwards", "tokens_per_forward", "acceptance", "tokens_per_s"):
        assert key in record, key
    assert record["tokens"] == 12 and len(record["acceptance"]) == 2
    plain = subprocess.run([*cmd, *prompt, "--json"], capture_output=True, text=True, timeout=300)
    assert json.loads(plain.stdout.strip().splitlines()[-1])["text"] == record["text"]


def test_generate_refuses_speculative_without_mtp_heads(workdir):
    plain = workdir / "plain"
    if not plain.exists():
        run_cli(workdir, "parallel.cp=1", "mtp.num_depths=0", "run.name=plain", "train.steps=3")
    cmd = [sys.executable, "-m", "multitoken", "generate", "--run", str(plain), "--speculative"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "without MTP heads" in proc.stderr and "drop --speculative" in proc.stderr
