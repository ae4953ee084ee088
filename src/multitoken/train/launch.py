"""Launching ``nproc`` local ranks for ``multitoken train`` (PyTorch's elastic launcher).

Each rank runs :func:`~multitoken.train.trainer.train`; the launcher turns what the ranks end
with into one outcome: the result of rank 0, ``{"stopped_by": signum}`` for a run stopped by a
signal (its checkpoint written), the rank's own :class:`~multitoken.errors.UserError` for bad
input, or :class:`RankFailed` (with the rank's traceback printed) for a crash. The ranks die
with the launcher (:func:`~multitoken.train.lifecycle.die_with_parent`) and hold the run's
lock on its behalf.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import uuid

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, get_error_handler
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from multitoken import errors
from multitoken.errors import UserError
from multitoken.train.data import DATA_CHECKED_ENV
from multitoken.train.lifecycle import STOP_SIGNALS, die_with_parent, exit_code, forward_sigusr1
from multitoken.train.run_dir import OWNER_ENV
from multitoken.train.trainer import train

__all__ = ["launch", "RankFailed", "USAGE_ERROR", "LAUNCHER_PID_ENV"]

USAGE_ERROR = 2  # the exit code of bad input (one ``error:`` line)
# The launcher's pid, for the ranks (they die with it; a test's SIGTERM fault targets it).
LAUNCHER_PID_ENV = "MULTITOKEN_LAUNCHER_PID"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(cfg):
    """What every launched rank runs (module level so that spawn can pickle it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forkserver's SIG_IGN (see below)
    die_with_parent(int(os.environ[LAUNCHER_PID_ENV]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    try:
        last = train(cfg)
    except UserError as err:
        # The launcher prints it as its one error line (from the error file torch elastic
        # reads back); exiting without a traceback keeps the rank's own output quiet.
        get_error_handler().record_exception(err)
        sys.exit(USAGE_ERROR)
    if "stopped_by" in last:
        # Stopped by a signal with its checkpoint written. Returning would wait for the
        # launcher to collect the result, which a launcher that is shutting down never does.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code(last["stopped_by"]))
    return last


class RankFailed(Exception):
    """A launched rank crashed (not bad input): the launch stops with its error."""


def _message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):  # the error file's structured form
        message = message.get("message", "")
    return str(message)


def _rank_failure(err: ChildFailedError) -> Exception:
    """The launcher's error for a failed launch: the rank's own UserError when it raised one
    (the lowest rank's), else :class:`RankFailed` naming a rank killed by a signal, or else the
    first rank that failed."""
    for _rank, failure in sorted(err.failures.items()):
        name, _, text = _message(failure).partition(": ")
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, UserError) and text:
            return kind(text)
    killed = sorted(rank for rank, failure in err.failures.items() if failure.exitcode < 0)
    if killed:  # the cause: the others then fail on its closed connections, sometimes first
        rank, failure = killed[0], err.failures[killed[0]]
        why = " (out of memory? see `dmesg`)" if failure.exitcode == -signal.SIGKILL else ""
        return RankFailed(
            f"rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}{why}; "
            "the other ranks stopped after it"
        )
    rank, failure = min(err.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    if isinstance(failure.message, dict):  # a bug keeps its traceback: the rank's, here
        stack = failure.message.get("extraInfo", {}).get("py_callstack")
        if stack:
            print(f"rank {rank} traceback:\n{stack}", file=sys.stderr, end="", flush=True)
    message = _message(failure)
    if "closed by peer" in message or "reset by peer" in message:
        # Torch elastic reports one failed rank, often the one that saw a peer vanish rather
        # than the peer (a rank SIGKILLed, out of memory: its own exit is not reported then).
        message += (
            " [another rank ended first and this one lost its connection to it: if no other "
            "rank printed an error, it was killed (out of memory? see `dmesg`)]"
        )
    return RankFailed(f"rank {rank} (pid {failure.pid}) failed: {message}")


def launch(cfg, nproc: int) -> dict:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The ranks' lock owner and watchdog target: this process.
    os.environ[OWNER_ENV] = os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    os.environ[DATA_CHECKED_ENV] = "1"  # prepare_data ran here: the ranks need not hash it again
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="static",
        rdzv_configs={"rank": 0},
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="forkserver",  # measured: ~4 s faster to start than spawn
    )
    forward_sigusr1()
    # Before the forkserver starts: it then survives a SIGTERM to the whole process group
    # (see multitoken.train.forkserver_signals), and so does the launcher's view of its ranks.
    multiprocessing.set_forkserver_preload(["multitoken.train.forkserver_signals"])
    # Its log of a failed rank is a traceback of the agent's own polling; the launcher prints
    # the rank's error instead (and a crashed rank has printed its traceback itself).
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        return elastic_launch(launch, _rank_entry)(cfg)[0]
    except SignalException as err:  # the agent has stopped the ranks with this signal
        return {"stopped_by": int(err.sigval)}
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if codes <= {exit_code(signum) for signum in STOP_SIGNALS}:  # a rank was signalled
            return {"stopped_by": codes.pop() - 128}
        raise _rank_failure(err) from None
    finally:
        for name in (OWNER_ENV, LAUNCHER_PID_ENV, DATA_CHECKED_ENV):
            os.environ.pop(name, None)
