"""Named points of a run where a test may act, and nothing else.

The trainer calls :func:`hit` at a few points: ``step<N>`` before step N, ``nan<N>`` when the
loss of step N is known (a True answer makes it non-finite), ``save<N>`` while step N is being
saved. The library never installs an action: unless a test did (:mod:`multitoken.testing.faults`,
which the library never imports), every call is one ``is None`` test.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["hit", "install"]

_action: Callable[[str], bool] | None = None


def install(action: Callable[[str], bool] | None) -> None:
    """Run ``action(point)`` at every probe point from now on (None: nothing again)."""
    global _action
    _action = action


def hit(point: str) -> bool:
    """Whether the installed action asks for a fault at ``point`` (False when none is)."""
    return _action is not None and _action(point)
