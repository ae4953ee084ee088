"""One trainer owns a run folder at a time; a run writes and removes only its own files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from multitoken.errors import CheckpointError, ConfigError
from multitoken.train.config import TrainConfig
from multitoken.train.config_io import load_config, to_toml
from multitoken.train.run_dir import RunLock, check_run_dir, clear_run_dir


def test_a_second_lock_fails_at_once_naming_the_owner(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        assert "pid" in (run / ".lock").read_text()
        with pytest.raises(CheckpointError, match=rf"in use by another .*pid {os.getpid()} host"):
            RunLock(run).acquire()
        # Another process is refused too: a plain flock, as any other tool would take it.
        code = (
            "import fcntl, sys\n"
            f"fd = open({str(run / '.lock')!r}, 'a')\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    # Released: the folder this lock created (and left empty) is gone, and a new lock works.
    assert not run.exists()
    with RunLock(run):
        (run / "config.toml").write_text("x")
    assert (run / "config.toml").exists() and not (run / ".lock").exists()


def test_a_lock_left_by_a_killed_process_is_not_stale(tmp_path):
    # SIGKILL leaves the file but not the lock: the kernel drops a dead process's flock.
    run = tmp_path / "run"
    run.mkdir()
    code = (
        "import fcntl, os, signal\n"
        f"fd = open({str(run / '.lock')!r}, 'w')\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "fd.write(f'pid {os.getpid()} host h since t'); fd.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code])
    assert (run / ".lock").read_text().startswith("pid ")
    with RunLock(run):
        assert f"pid {os.getpid()} " in (run / ".lock").read_text()


def test_held_here_trusts_only_the_recorded_owner(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert not RunLock.held_here(run)
    with RunLock(run):
        assert RunLock.held_here(run)
        monkeypatch.setenv("MULTITOKEN_RUN_LOCK_OWNER", "1")  # not the pid in the file
        assert RunLock.held_here(run)  # this process holds it
    (run).mkdir()
    (run / ".lock").write_text("pid 1 host h since t\n")
    assert RunLock.held_here(run)  # a launched rank: the launcher (pid 1 here) holds it
    monkeypatch.setenv("MULTITOKEN_RUN_LOCK_OWNER", "2")
    assert not RunLock.held_here(run)


@pytest.mark.parametrize("name", ["../../evil", "/tmp/abs", "", ".", "..", "a/b", "a\\b", "a\nb"])
def test_run_name_is_one_plain_folder_name(name):
    with pytest.raises(ConfigError, match="run.name must"):
        load_config(None, [f"run.name={name}"])


def test_run_dir_may_be_any_folder_but_not_empty():
    assert str(load_config(None, ["run.dir=/scratch/me", "run.name=x"]).run_dir) == "/scratch/me/x"
    with pytest.raises(ConfigError, match="run.dir must be a folder"):
        load_config(None, ["run.dir="])


def test_a_foreign_folder_is_never_written_nor_cleared(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text("mine\n")
    (foreign / "todo.txt").write_text("mine\n")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(ConfigError, match="not a multitoken run folder"):
            check_run_dir(foreign, resume, overwrite)
    with pytest.raises(ConfigError, match="not a multitoken run folder"):
        clear_run_dir(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["metrics.jsonl", "todo.txt"]


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(TrainConfig()))
    for name in ("metrics.jsonl", "tokenizer.json", "loss.png", "notes.txt"):
        (run / name).write_text("x")
    check_run_dir(run, resume=False, overwrite=True)
    clear_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_links_where_a_run_writes_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(TrainConfig()))
    (run / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(ConfigError, match="metrics.jsonl is a link"):
        check_run_dir(run, resume=True, overwrite=False)
