"""Processes: one trainer per run folder, ranks that die with their launcher, preemption with
an exact resume, a rank's error shown by the launcher, restarts under ``torchrun``.

Each test runs the real command line as its own process (with the ranks the launcher starts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tests.helpers.cli import (
    assert_one_error,
    assert_same_records,
    run_subprocess,
    tiny_args,
    train_cli,
    train_records,
    tree,
)

from multitoken.train.checkpoint import latest_checkpoint
from multitoken.train.run_dir import RunLock


def _wait_for(condition, timeout=120.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _start(root: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "multitoken", *tiny_args(root, *args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _logged(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and '"step"' in metrics.read_text()


def test_a_second_trainer_on_the_same_run_fails_at_once(run_root, reference):
    first = _start(run_root, "parallel.cp=1", "run.name=owned", "train.steps=30")
    run = run_root / "owned"
    try:
        _wait_for(lambda: (run / ".lock").is_file() and (run / ".lock").read_text(), what="lock")
        first.send_signal(signal.SIGSTOP)  # hold the owner still while the second one tries
        before = tree(run)
        second = run_subprocess(run_root, "parallel.cp=1", "run.name=owned", check=False)
        assert_one_error(second.returncode, second.stderr, "is in use by another")
        resume = run_subprocess(
            run_root, "parallel.cp=1", "run.name=owned", "train.resume=auto", check=False
        )
        assert_one_error(resume.returncode, resume.stderr, "is in use by another")
        assert tree(run) == before
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert [r["step"] for r in train_records(run)] == list(range(1, 31))


def _tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag`` (a launcher, its forkserver, ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"MULTITOKEN_TEST_TAG={tag}".encode() not in (entry / "environ").read_bytes():
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launcher_sigkill_leaves_no_rank_running(run_root, reference):
    tag = uuid.uuid4().hex
    run = run_root / "orphans"
    launcher = _start(
        run_root, "parallel.cp=2", "run.name=orphans", "train.steps=100000",
        env={"MULTITOKEN_TEST_TAG": tag},
    )  # fmt: skip
    try:
        _wait_for(lambda: _logged(run), what="the ranks to train")
        assert len(_tagged_processes(tag)) >= 3  # launcher + two ranks (+ forkserver)
        launcher.kill()
        launcher.wait()
        _wait_for(lambda: not _tagged_processes(tag), timeout=15, what="the ranks to die")
    finally:
        for pid in _tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
    with RunLock(run):  # and the folder is free again
        pass


@pytest.fixture(scope="module")
def preempted(run_root, reference):
    """A two-rank run stopped by a SIGTERM to its launcher during step 3, then resumed."""
    env = {"MULTITOKEN_FAULT": "sigterm3:0"}
    stopped = run_subprocess(run_root, "parallel.cp=2", "run.name=preempted", env=env, check=False)
    run = run_root / "preempted"
    newest = latest_checkpoint(run)
    records = train_records(run)
    resumed = run_subprocess(run_root, "parallel.cp=2", "run.name=preempted", "train.resume=auto")
    return stopped, newest, records, resumed, run


def test_sigterm_stops_with_a_checkpoint_and_resumes_exactly(preempted, reference):
    stopped, newest, records, resumed, run = preempted
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr
    assert "stopped by SIGTERM: newest checkpoint" in stopped.stderr
    assert newest is not None and newest.name == "step_000003"
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "from step 3" in resumed.stdout
    assert_same_records(train_records(run), train_records(reference))


def test_a_sigterm_to_the_whole_process_group_also_stops_with_a_checkpoint(run_root, reference):
    """What `timeout` or `kill -TERM -<pgid>` send: the launcher, its forkserver and every rank
    get the SIGTERM at once. The forkserver used to die of it, the launcher then lost its ranks
    and they were killed before saving (the newest checkpoint was the one before the signal)."""
    env = {"MULTITOKEN_FAULT": "groupterm3:0"}
    stopped = run_subprocess(
        run_root, "parallel.cp=2", "run.name=group_stopped", env=env, check=False,
        start_new_session=True,  # the process group is the run's own
    )  # fmt: skip
    run = run_root / "group_stopped"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM: newest checkpoint" in stopped.stderr
    assert latest_checkpoint(run).name == "step_000003"
    run_subprocess(run_root, "parallel.cp=2", "run.name=group_stopped", "train.resume=auto")
    assert_same_records(train_records(run), train_records(reference))


def test_a_rank_error_is_the_launchers_one_error_line(preempted, run_root):
    # Another seed gives another tokenizer: rank 0 refuses before writing anything, the other
    # rank stops with it, and the launcher prints rank 0's message (not a traceback).
    run = preempted[4]
    before = tree(run)
    proc = run_subprocess(
        run_root, "parallel.cp=2", "run.name=preempted", "train.resume=true", "train.seed=1",
        check=False,
    )  # fmt: skip
    assert_one_error(proc.returncode, proc.stderr, "these data settings give another tokenizer")
    assert tree(run) == before


def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank(run_root, monkeypatch):
    monkeypatch.setenv("MULTITOKEN_FAULT", "nan2:0")
    code, _, err = train_cli(run_root, "run.name=nan_one")
    assert code == 0, err
    two = run_subprocess(
        run_root, "parallel.cp=2", "run.name=nan_two", env={"MULTITOKEN_FAULT": "nan2:1"}
    )
    assert "step 2: non-finite" in two.stdout
    records = train_records(run_root / "nan_two")
    assert records[-1]["skipped"] == 1
    assert_same_records(records, train_records(run_root / "nan_one"))


@pytest.mark.slow
def test_resume_auto_under_torchrun_max_restarts(run_root, reference):
    """Rank 1 is killed at step 5 (first attempt only); torchrun restarts both ranks, which
    resume from step 3 with the same command line and finish with the uninterrupted losses."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=1", "-m", "multitoken",
        *tiny_args(run_root, "parallel.cp=2", "run.name=restarted", "train.resume=auto"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MULTITOKEN_FAULT": "step5:1",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming" in proc.stdout and "from step 3" in proc.stdout, proc.stdout
    assert_same_records(train_records(run_root / "restarted"), train_records(reference))
