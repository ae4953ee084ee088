"""Hostile use of a run's outputs (issue 21): ``export`` is atomic (a failed or killed export
leaves no target), locked (of two exports into one folder one is refused) and never lands
inside a run folder; ``generate`` on a run whose checkpoints a trainer rotates away meanwhile
uses the newest intact one, with no traceback and no "damaged" warning.

Everything runs through ``main()`` in this process on one tiny reference-GPT run (checkpoints
at steps 2 and 4), except the SIGKILL, which needs a process of its own.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from multitoken.cli import main
from multitoken.train import manifest
from multitoken.train.safe_load import SafeFileSystemReader

TINY = [
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.max_seq_len=128",
    "mtp.num_depths=1",
    "data.max_files=8",
    "data.vocab_size=300",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.val_fraction=0.1",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=2",
    "train.keep_checkpoints=0",
    "parallel.cp=1",
]
COMPLETE = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_error(code: int, err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and message in lines[0], err[-3000:]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_exports")
    code, _, err = cli(
        "train", *TINY, f"run.dir={root}", "run.name=ref", f"data.cache_dir={root / 'cache'}"
    )
    assert code == 0, err[-3000:]
    assert {p.name for p in (root / "ref" / "checkpoints").iterdir()} >= {
        "step_000002",
        "step_000004",
    }
    return root / "ref"


@pytest.fixture
def out_root(tmp_path):
    return tmp_path / "exports"


def test_a_failed_export_leaves_no_folder_and_the_next_one_succeeds(run, out_root, monkeypatch):
    out = out_root / "hf"

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # the tokenizer, written after the weights, fails
        patch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
        with pytest.raises(OSError, match="No space left"):
            cli("export", str(out), "--run", str(run))
    assert not out.exists() and listing(out_root) == []  # no half folder, no leftovers
    code, _, err = cli("export", str(out), "--run", str(run))
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= COMPLETE
    assert [p.name for p in out_root.iterdir()] == ["hf"]


KILLED = """
import os, signal, sys
from transformers import PreTrainedTokenizerFast
def killed(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
PreTrainedTokenizerFast.save_pretrained = killed
from multitoken.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_export_leaves_no_folder_and_the_next_one_succeeds(run, out_root):
    """SIGKILL after the weights and before the tokenizer: a half folder (weights, no
    tokenizer) that the next export refused, before."""
    out = out_root / "hf"
    out_root.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILLED, "export", str(out), "--run", str(run)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not out.exists()
    code, _, err = cli("export", str(out), "--run", str(run))
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= COMPLETE
    assert [p.name for p in out_root.iterdir()] == ["hf"]  # the killed one's leftovers cleared


def test_two_exports_into_one_folder_cannot_both_succeed(run, out_root, monkeypatch):
    out = out_root / "hf"
    second = []
    original = PreTrainedModel.save_pretrained

    def save_and_race(self, *args, **kwargs):
        if not second:  # the first export is about to write: a second one starts now
            second.append(None)
            second[0] = cli("export", str(out), "--run", str(run))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_and_race)
    code, _, err = cli("export", str(out), "--run", str(run))
    assert code == 0, err
    code2, _, err2 = second[0]
    one_error(code2, err2, "another export into")
    assert {p.name for p in out.iterdir()} >= COMPLETE
    assert [p.name for p in out_root.iterdir()] == ["hf"]


@pytest.mark.parametrize("inside", ["checkpoints/hf", "hf", "."])
def test_an_export_inside_a_run_folder_is_refused(run, inside):
    """An export into a run's checkpoints/ was accepted, and deleted at the next rotation."""
    before = listing(run)
    code, _, err = cli("export", str(run / inside), "--run", str(run))
    one_error(code, err, "is inside the run folder")
    assert listing(run) == before


def test_an_export_under_a_file_or_onto_a_link_is_one_line(run, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("export", str(tmp_path / "afile" / "hf"), "--run", str(run))
    one_error(code, err, "is not a writable folder")
    (tmp_path / "link").symlink_to(tmp_path)
    code, _, err = cli("export", str(tmp_path / "link"), "--run", str(run))
    one_error(code, err, "is a link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link"]


@pytest.fixture
def racing_run(run, tmp_path):
    """A copy of the run whose step 4 the "trainer" has not written yet (hidden)."""
    copy = shutil.copytree(run, tmp_path / "racing")
    checkpoints = copy / "checkpoints"
    (checkpoints / "step_000004").rename(checkpoints / "hidden_000004")
    (checkpoints / "latest").write_text("step_000002")
    return copy


def test_generate_uses_the_newest_checkpoint_when_the_one_it_reads_is_rotated_away(
    racing_run, monkeypatch, capfd
):
    """While generate reads step 2, the trainer saves step 4 and rotation removes step 2."""
    checkpoints = racing_run / "checkpoints"
    original = SafeFileSystemReader.read_data

    def rotate_then_read(self, *args, **kwargs):
        if (checkpoints / "hidden_000004").exists():
            (checkpoints / "hidden_000004").rename(checkpoints / "step_000004")
            shutil.rmtree(checkpoints / "step_000002")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SafeFileSystemReader, "read_data", rotate_then_read)
    code, out, err = cli(
        "generate", "--run", str(racing_run), "--prompt", "def ", "--max-new-tokens", "8", "--json"
    )
    captured = capfd.readouterr()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err + captured.err and "damaged" not in err + captured.err
    assert out.strip().startswith("{")


def test_a_checkpoint_removed_while_it_is_verified_is_not_called_damaged(
    run, tmp_path, monkeypatch, capfd
):
    """Rotation removes step 4 while generate hashes its files: step 2 is used, silently."""
    copy = shutil.copytree(run, tmp_path / "verifying")
    newest = copy / "checkpoints" / "step_000004"
    original = manifest._sha256

    def remove_then_hash(path):
        if newest.exists() and newest in Path(path).parents:
            shutil.rmtree(newest)
        return original(path)

    monkeypatch.setattr(manifest, "_sha256", remove_then_hash)
    code, out, err = cli(
        "generate", "--run", str(copy), "--prompt", "def ", "--max-new-tokens", "8", "--json"
    )
    captured = capfd.readouterr()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err + captured.err and "damaged" not in err + captured.err
    assert out.strip().startswith("{")
