"""A pool of gloo ranks that lives for the whole pytest session.

Spawning ranks costs seconds (each imports torch and joins a process group); a test costs
milliseconds. So each world size is spawned once, the ranks rendezvous through a ``FileStore``,
and every test submits a module-level function that runs on all ranks at once::

    results = pool.run(fn, arg, timeout=30)   # [fn(arg) on rank 0, on rank 1, ...]

Inside ``fn``, ``torch.distributed`` is initialised (gloo, one thread per rank) and
``dist.get_rank()`` is the rank. A rank that raises, a rank that dies and a call that outlives
its timeout all fail the test with every rank's traceback, and the pool is killed and
respawned on next use, so one hang costs one timeout and never poisons the tests after it.

Functions must be importable by name (module-level in a test module or in ``tests.helpers``,
no lambdas): the ranks' forkserver starts with the pytest process's ``sys.path``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

__all__ = ["RankPool", "RankError"]

# Long enough for any test, short enough that a hang fails the test quickly.
DEFAULT_TIMEOUT = 60.0
# Gloo's own timeout: a collective left hanging raises after this on the ranks still alive.
GLOO_TIMEOUT = timedelta(seconds=90)
# After the first rank fails, how long the others get to report before the pool is killed.
GRACE = 3.0


class RankError(RuntimeError):
    """Some rank raised, died or timed out; the message holds every rank's report."""


def _serve(rank: int, world: int, store_path: str, conn) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=GLOO_TIMEOUT)
    conn.send(("ready", rank))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        fn, args, kwargs = job
        try:
            reply = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the driver
            reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable result
            conn.send(("error", f"cannot send the result back: {exc!r}"))
    dist.destroy_process_group()


def _context():
    """A forkserver that imported torch once: each rank is then a fork (~0.1 s) rather than a
    fresh interpreter importing torch (seconds each, on a 2-core machine)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "multitoken", __name__])
    return ctx


class RankPool:
    """``world`` gloo ranks serving function calls; started lazily, restarted after failures."""

    def __init__(self, world: int):
        self.world = world
        self.procs: list[mp.Process] = []
        self.conns = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.spawns = 0

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def start(self, timeout: float = 120.0) -> None:
        ctx = _context()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"rank-pool-{self.world}-")
        store_path = os.path.join(self._tmp.name, "store")
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(rank, self.world, store_path, child), daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.spawns += 1
        replies = self._collect(timeout, "starting the pool")
        bad = [r for r in replies if r is None or r[0] != "ready"]
        if bad:
            self.kill()
            raise RankError(f"the {self.world}-rank pool did not start: {replies}")

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=10)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=5)
        self.kill()

    def _collect(self, timeout: float, what: str) -> list:
        """One reply per rank (None where none came before the deadline or the rank died)."""
        replies: list = [None] * self.world
        pending = dict(zip(self.conns, range(self.world)))
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending), timeout=remaining):
                rank = pending.pop(conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    replies[rank] = ("died", f"rank {rank} died while {what}")
                if replies[rank][0] != "ok" and replies[rank][0] != "ready":
                    # One rank failed: the others may be stuck in a collective with it.
                    deadline = min(deadline, time.monotonic() + GRACE)
        return replies

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        Raises:
            RankError: a rank raised, died, or did not answer within ``timeout`` seconds (the
                pool is then killed and respawned on next use).
        """
        if not self.alive:
            self.kill()
            self.start()
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        replies = self._collect(timeout, f"running {fn.__name__}")
        if all(r is not None and r[0] == "ok" for r in replies):
            return [r[1] for r in replies]
        self.kill()
        report = []
        for rank, reply in enumerate(replies):
            if reply is None:
                report.append(f"--- rank {rank}: no answer within {timeout:.0f}s (hang?)")
            elif reply[0] != "ok":
                report.append(f"--- rank {rank}: {reply[1]}")
        raise RankError(f"{fn.__name__} failed on {self.world} ranks:\n" + "\n".join(report))
