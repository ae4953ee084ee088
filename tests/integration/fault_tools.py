"""Shared by the failure tests: the tiny run, running the command line (in this process or as
a subprocess), and comparing logged losses."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

from test_train_cli import TINY  # the same tiny run: checkpoints at steps 3 and 6

from multitoken.cli import main


def cli(*argv: str) -> tuple[int, str, str]:
    """``multitoken <argv>`` in this process: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def train_cli(root: Path, *args: str) -> tuple[int, str, str]:
    """A tiny single-process run under ``root`` (runs in ``root``, cache in ``root/cache``)."""
    return cli(
        "train", *TINY, "parallel.cp=1", f"run.dir={root}", f"data.cache_dir={root}/cache", *args
    )


def run_subprocess(root: Path, *args: str, env: dict | None = None, check: bool = True, **kw):
    """A tiny run as its own process (the launcher starts the ranks for parallel.cp > 1)."""
    cmd = [sys.executable, "-m", "multitoken", "train", *TINY, f"run.dir={root}"]
    cmd += [f"data.cache_dir={root}/cache", *args]
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
