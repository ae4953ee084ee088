"""Joining the process group (:func:`init_distributed`): one fresh namespace of the launcher's
store per attempt.

``torchrun`` hosts the store its ranks meet in (``TORCHELASTIC_USE_AGENT_STORE=True``: the agent
of node 0 owns it, at ``MASTER_ADDR:MASTER_PORT``) and keeps that one store, with every key in
it, when ``--max-restarts`` restarts the ranks (torch 2.13: the store server is made once, at
the first rendezvous). The keys a process group writes have the same names in every attempt:
gloo's listening address of each rank (``default_pg/0//cpu//0/<rank>``), NCCL's unique id. A
restarted rank that reads its peer's key before the peer has rewritten it gets the previous
attempt's address, of a process that is gone: ``Gloo connectFullMesh failed ... Connection
refused``, or a hang in ``Pair::connect``; on a second try, rank 0 may simply have come first.

So every attempt joins in a namespace of its own, which rank 0 picks (a random id) and every
other rank confirms: ``TORCHELASTIC_RESTART_COUNT`` cannot name it, as it is counted per node
(an agent whose ranks are healthy restarts them for another node's failure or a new node
without counting: torch issues 108158 and 135712). A rank cannot tell the current id from the
previous attempt's, which is still in the store, by reading it; it writes a nonce of its own
under the id it read, and rank 0 acknowledges exactly the nonces written under the id it
picked. A previous attempt's rank 0 never acknowledges a nonce of this attempt (it is dead:
the agents stop every rank of an attempt before they start the next), so a rank that read a
stale id waits for rank 0 to write the new one and joins that.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from multitoken.errors import ConfigError

__all__ = ["attempt_store", "init_distributed", "local_device"]

ROOT = "multitoken/attempt"
CURRENT = f"{ROOT}/current"  # the id of the newest attempt, written by its rank 0


def attempt_store(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta = default_pg_timeout
) -> dist.PrefixStore:
    """A namespace of ``store`` that the ranks of this attempt, and only they, share.

    Every rank calls it once per attempt (rank 0 among them); it returns when every rank has
    joined the attempt's namespace.

    Args:
        store: the store every rank of every attempt reaches (torchrun's).
        rank: this process's global rank.
        world_size: ranks in the attempt.
        timeout: how long a rank waits for the others (rank 0 for all; the others for rank 0).

    Raises:
        TimeoutError: a rank other than 0 saw no rank 0 acknowledge it in ``timeout``.
    """
    if rank == 0:
        attempt = uuid.uuid4().hex
        store.set(CURRENT, attempt)
        joined = [f"{ROOT}/{attempt}/joined/{peer}" for peer in range(1, world_size)]
        if joined:
            store.wait(joined, timeout)
            acks = [f"{ROOT}/{attempt}/ack/{peer}" for peer in range(1, world_size)]
            store.multi_set(acks, store.multi_get(joined))
        return dist.PrefixStore(f"{ROOT}/{attempt}", store)
    nonce = uuid.uuid4().hex
    deadline = time.monotonic() + timeout.total_seconds()
    store.wait([CURRENT], timeout)
    joined, pause = None, 0.005
    while True:
        attempt = store.get(CURRENT).decode()
        if attempt != joined:  # rank 0's id, of this attempt or (not yet rewritten) the last
            store.set(f"{ROOT}/{attempt}/joined/{rank}", nonce)
            joined, pause = attempt, 0.005
        ack = f"{ROOT}/{attempt}/ack/{rank}"
        if store.check([ack]) and store.get(ack).decode() == nonce:
            return dist.PrefixStore(f"{ROOT}/{attempt}", store)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: no rank 0 acknowledged this rank in {timeout} (attempt {attempt} "
                "of the launcher's store): did rank 0 start?"
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.2)


def local_device() -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` (made current) when CUDA is available, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, devices = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= devices:  # before set_device, whose error names no fix
        raise ConfigError(
            f"local rank {local_rank} needs cuda:{local_rank} but this machine has {devices} "
            "CUDA device(s): start at most one rank per GPU on each node (parallel.dp * "
            "parallel.cp * parallel.tp, or torchrun --nproc-per-node)"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def init_distributed(
    backend: str | None = None, timeout: timedelta = default_pg_timeout
) -> torch.device:
    """Join the process group described by ``torchrun``'s environment; idempotent.

    Without ``torchrun`` (no ``WORLD_SIZE``) it starts a one-rank group, so single-process
    runs go through the same code. Under a launcher, every attempt (each restart of
    ``torchrun --max-restarts``) joins in a namespace of the launcher's store of its own
    (:func:`attempt_store`). The backend is NCCL when CUDA
    is available, gloo otherwise.

    Args:
        backend: "nccl" or "gloo"; None = NCCL when CUDA is available.
        timeout: how long a collective (and the rendezvous) waits for the slowest rank before
            it fails: long enough for rank 0 to prepare the data or hash a checkpoint while
            the others wait in a broadcast or a barrier (NCCL's own default is 10 minutes).

    Returns:
        This rank's device (``cuda:<LOCAL_RANK>`` or ``cpu``).
    """
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    device = local_device() if use_cuda else torch.device("cpu")
    if dist.is_initialized():
        return device
    backend = backend or ("nccl" if use_cuda else "gloo")
    if "WORLD_SIZE" in os.environ:
        # torch's own env:// store (a client of the agent's under torchrun, else hosted by
        # rank 0), joined in a namespace of this attempt's own (see .rendezvous): torchrun
        # --max-restarts restarts the ranks on a store that holds the last attempt's keys.
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size))
        store.set_timeout(timeout)
        dist.init_process_group(
            backend,
            store=attempt_store(store, rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            device_id=device if use_cuda else None,
            timeout=timeout,
        )
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="multitoken-store-"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return device
