"""Session-wide pools of gloo ranks (see ``tests/helpers/rank_pool.py``): ``pool2``, ``pool4``, or
``rank_pool(world)`` for any size. One spawn per world size per session."""

import pytest
from tests.helpers.rank_pool import RankPool

_POOLS: dict[int, RankPool] = {}


def get_pool(world: int) -> RankPool:
    if world not in _POOLS:
        _POOLS[world] = RankPool(world)
    return _POOLS[world]


@pytest.fixture(scope="session")
def rank_pool():
    yield get_pool
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@pytest.fixture(scope="session")
def pool2(rank_pool):
    return rank_pool(2)


@pytest.fixture(scope="session")
def pool4(rank_pool):
    return rank_pool(4)
