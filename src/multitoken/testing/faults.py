"""Fault injection for the tests: ``MULTITOKEN_FAULT=<point>:<rank>[,<point>:<rank>...]``.

The failure tests run the real command line and need a fault at an exact place: a rank killed
while it saves step 6 (``save6:1``), mid-step (``step5:0``), a non-finite loss at step 4
(``nan4:0``), a SIGTERM to the launcher after step 3 (``sigterm3:0``), or to the launcher's
whole process group (``groupterm3:0``, what ``timeout`` or ``kill -TERM -<pgid>`` do). A fault
fires only on
the first attempt of a run (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a run that
``torchrun --max-restarts`` restarts gets past it.

The library only calls :func:`multitoken.train.probes.hit` at those points; :func:`install`
makes them act. The tests install it in their own process (``tests/conftest.py``) and, through
the ``sitecustomize`` module that ``tests/helpers/site`` puts on ``PYTHONPATH``, in every
process a test starts with ``MULTITOKEN_FAULT`` set.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from multitoken.train import probes
from multitoken.train.launch import LAUNCHER_PID_ENV

__all__ = ["fault_active", "fault_point", "install"]


def fault_active(point: str) -> bool:
    """Whether ``MULTITOKEN_FAULT`` names ``point`` for this rank (first attempt only)."""
    spec = os.environ.get("MULTITOKEN_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    rank = str(dist.get_rank() if dist.is_initialized() else 0)
    return any(item.rsplit(":", 1) == [point, rank] for item in spec.split(","))


def fault_point(point: str) -> None:
    """SIGKILL this rank at ``point`` (``step5``, ``save6``); at ``sigterm<N>``, send the
    launcher (or this process, when it is its own launcher) a SIGTERM."""
    if fault_active(point):
        os.kill(os.getpid(), signal.SIGKILL)
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, os.getpid()))
    if point.startswith("step") and fault_active("sigterm" + point[4:]):
        os.kill(launcher, signal.SIGTERM)
        time.sleep(2)  # the launcher forwards it to every rank meanwhile: all stop together
    if point.startswith("step") and fault_active("groupterm" + point[4:]):
        os.killpg(os.getpgid(launcher), signal.SIGTERM)  # launcher, forkserver, every rank
        time.sleep(2)


def _act(point: str) -> bool:
    if point.startswith("nan"):
        return fault_active(point)
    fault_point(point)
    return False


def install() -> None:
    """Make the library's probe points act on ``MULTITOKEN_FAULT`` (read at every point)."""
    probes.install(_act)
