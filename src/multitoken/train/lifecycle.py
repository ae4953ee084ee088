"""How a run ends: preemption signals, ranks that die with their launcher.

A scheduler preempts with SIGTERM (Slurm, Kubernetes), a user with Ctrl-C (SIGINT), some
clusters warn with SIGUSR1. :class:`StopSignals` turns each into a request that the trainer
honours at the next step boundary: every rank agrees on it in the step's flag all-reduce, so
all ranks stop after the same step, write a checkpoint together and exit with ``128 + signal``.
The launcher forwards what it receives to the ranks (torch elastic does for SIGTERM and SIGINT;
:func:`forward_sigusr1` adds SIGUSR1).

A rank whose launcher is SIGKILLed would keep training and writing checkpoints into a folder
whose lock is gone. :func:`die_with_parent` SIGKILLs the rank when its launcher exits: a thread
waits on a pidfd of the launcher (ours starts ranks from a forkserver, which outlives it; under
torchrun the launcher is the parent), plus ``PR_SET_PDEATHSIG`` for the parent.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from types import FrameType

__all__ = ["StopSignals", "STOP_SIGNALS", "die_with_parent", "forward_sigusr1", "exit_code"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by ``signum``."""
    return 128 + int(signum)


class StopSignals:
    """While active (a ``with`` block in the main thread), SIGTERM, SIGINT and SIGUSR1 set
    :attr:`received` instead of ending the process; the previous handlers come back after."""

    def __init__(self, announce: bool = True):
        self.received: int | None = None
        self.announce = announce
        self._saved: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None and self.announce:
            print(
                f"received {signal.Signals(signum).name}: stopping after this step with a "
                "checkpoint",
                file=sys.stderr,
                flush=True,
            )
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()


def die_with_parent(launcher_pid: int | None = None) -> None:
    """SIGKILL this process when the process that started it exits (a launched rank); a
    SIGTERM (a clean stop) when that is the forkserver of a ``launcher_pid`` still alive.

    Args:
        launcher_pid: also watch this process (our launcher, which is not the parent of a rank
            started from its forkserver: that forkserver outlives a SIGKILLed launcher).
    """
    parent = os.getppid()
    # The parent of a rank our launcher started is its forkserver: a SIGTERM to the whole
    # process group (`timeout`, `kill -TERM -<pgid>`, a scheduler) ends the forkserver at once,
    # and a SIGKILL then would cut the ranks' own SIGTERM stop (finish the step, checkpoint).
    # The launcher itself is watched below and still ends the ranks with a SIGKILL.
    deathsig = signal.SIGTERM if launcher_pid else signal.SIGKILL
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(deathsig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    watched = launcher_pid or parent
    try:
        # A pidfd becomes readable when the process exits: no polling, no pid reuse.
        handle = os.pidfd_open(watched)
    except (AttributeError, OSError):
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while os.getppid() == parent and _alive(watched):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    if not _alive(watched) or os.getppid() != parent:  # it died before we looked
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forward_sigusr1() -> None:
    """In the launcher: SIGUSR1 stops the ranks as SIGTERM and SIGINT do under torch elastic
    (its agent catches the exception, signals every rank and waits for them)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def handle(signum: int, frame: FrameType | None) -> None:
        raise SignalException(f"process {os.getpid()} got {signum}", sigval=signal.SIGUSR1)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, handle)
