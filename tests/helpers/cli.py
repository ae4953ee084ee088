"""The command line in the integration tests: the tiny run, running ``multitoken`` in this
process (config errors, one-rank runs) or as its own process (the launcher and its ranks,
signals), and comparing what runs logged."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multitoken.cli import main

# The tiny run: checkpoints at steps 3 and 6, a validation pass at each.
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
# Two key/value heads, so that tp = 2 divides them.
HEADS2 = ["model.n_heads=2", "model.n_kv_heads=2"]


def cli(*argv: str) -> tuple[int, str, str]:
    """``multitoken <argv>`` in this process: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cli_ok(*argv: str) -> str:
    """``multitoken <argv>`` in this process, which must succeed; its stdout."""
    code, out, err = cli(*argv)
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out


# A two-step heads-or-full run of a tiny Hugging Face model folder (add model.hf=...).
HF_TINY_RUN = [
    "mtp.num_depths=1",
    "data.max_files=8",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.val_fraction=0.1",
    "train.steps=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.save_every=0",
    "parallel.cp=1",
]


def tiny_args(root: Path, *args: str) -> list[str]:
    """``train`` arguments of the tiny run under ``root`` (runs and data cache there)."""
    return ["train", *TINY, f"run.dir={root}", f"data.cache_dir={root}/cache", *args]


def train_cli(root: Path, *args: str) -> tuple[int, str, str]:
    """A tiny single-process run under ``root``, in this process."""
    return cli(*tiny_args(root, "parallel.cp=1", *args))


def train_ok(root: Path, *args: str) -> str:
    """``train_cli`` that must succeed; its stdout."""
    code, out, err = train_cli(root, *args)
    assert code == 0, f"exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    return out


def run_subprocess(root: Path, *args: str, env: dict | None = None, check: bool = True, **kw):
    """A tiny run as its own process (the launcher starts the ranks for parallel.cp > 1)."""
    cmd = [sys.executable, "-m", "multitoken", *tiny_args(root, *args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error(code: int, stderr: str, message: str) -> None:
    """Bad input: exit 2, no traceback, exactly one ``error:`` line containing ``message``."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and message in lines[0], stderr


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its content (folders: "dir")."""
    listing = {}
    for path in sorted(Path(root).rglob("*")):
        key = str(path.relative_to(root))
        if path.is_dir() and not path.is_symlink():
            listing[key] = "dir"
        else:
            listing[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return listing


def copy_run(run: Path, root: Path, name: str) -> Path:
    """A fresh copy of ``run`` as ``root/name`` (for tests that change or resume a run)."""
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target)
    return target


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"split": "val"' not in line]


def assert_same_records(a: list[dict], b: list[dict], rtol: float = 1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_main"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol), (ra["step"], key)
        assert ra["loss_mtp"] == pytest.approx(rb["loss_mtp"], rel=rtol), ra["step"]
