"""One namespace of the launcher's store per attempt (torchrun --max-restarts keeps the store).

Ranks are threads over one in-process store, which outlives the attempts as torchrun's does.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from multitoken.parallel.rendezvous import CURRENT, attempt_store

TIMEOUT = timedelta(seconds=20)


def _attempt(store: dist.Store, world: int, rank0_delay: float = 0.0, work=None) -> list:
    """Every rank of one attempt, rank 0 started ``rank0_delay`` s after the others; each
    rank's ``work(namespace, rank)`` (default: the namespace, where the rank wrote ``rank<r>``)."""
    results: list = [None] * world

    def mark(namespace: dist.Store, r: int) -> dist.Store:
        namespace.set(f"rank{r}", "here")
        return namespace

    def rank(r: int) -> None:
        try:
            if r == 0:
                time.sleep(rank0_delay)
            results[r] = (work or mark)(attempt_store(store, r, world, TIMEOUT), r)
        except Exception as err:  # reported below, in the test's thread
            results[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return results


def _one_namespace(namespaces: list) -> bool:
    """Whether every rank wrote into the namespace every other rank got."""
    keys = [f"rank{r}" for r in range(len(namespaces))]
    return all(namespace.check(keys) for namespace in namespaces)


def test_every_rank_of_an_attempt_shares_one_namespace_and_each_attempt_has_its_own():
    store = dist.HashStore()
    first = _attempt(store, 4)
    assert _one_namespace(first)
    first[0].delete_key("rank3")
    second = _attempt(store, 4)
    assert _one_namespace(second)
    assert not first[0].check(["rank3"])  # the second attempt wrote elsewhere


def test_restarted_ranks_that_read_the_store_before_rank_0_wait_for_its_new_namespace():
    # The failing order under torchrun: the previous attempt's id (and its acknowledgements)
    # are still in the store when ranks 1..3 of the restart read it.
    store = dist.HashStore()
    first = _attempt(store, 4)
    first[0].delete_key("rank3")
    second = _attempt(store, 4, rank0_delay=0.5)
    assert _one_namespace(second)
    assert not first[0].check(["rank3"])


def test_an_attempt_whose_rank_0_died_before_acknowledging_is_skipped():
    store = dist.HashStore()
    store.set(CURRENT, "abandoned")  # rank 0 wrote its id, then was killed
    assert _one_namespace(_attempt(store, 3, rank0_delay=0.3))


def test_a_rank_without_rank_0_times_out_with_a_clear_error():
    store = dist.HashStore()
    store.set(CURRENT, "abandoned")
    with pytest.raises(TimeoutError, match="no rank 0 acknowledged"):
        attempt_store(store, 1, 2, timedelta(seconds=0.3))


def test_gloo_groups_connect_after_a_restart_whatever_rank_comes_first(monkeypatch):
    # Without per-attempt namespaces the restarted rank 1 reads the first attempt's address of
    # rank 0 and fails in connectFullMesh (or hangs): the keys have the same names.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = dist.HashStore()

    def all_reduce(namespace: dist.Store, r: int) -> float:
        group = dist.ProcessGroupGloo(namespace, r, 2, TIMEOUT)
        value = torch.ones(1)
        group.allreduce([value]).wait()
        return value.item()

    assert _attempt(store, 2, work=all_reduce) == [2.0, 2.0]
    assert _attempt(store, 2, rank0_delay=0.5, work=all_reduce) == [2.0, 2.0]
