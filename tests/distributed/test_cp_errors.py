"""Bad input fails with the same clear error on every rank, never a hang; and the pool itself
turns a hang into a fast failure."""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.distributed import IGNORE, PAD, groups, make_batch
from tests.helpers.rank_pool import RankError

from multitoken import ConfigError, LayoutError, next_token_labels
from multitoken.parallel import (
    ParallelDims,
    ShardMismatchError,
    exchange_halo,
    global_normalizer,
    shard_batch,
)

TIMEOUT = 30


def error_of(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except (ValueError, ConfigError, ShardMismatchError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def assert_same_error(messages: list[str], kind: type, fragment: str) -> None:
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith(kind.__name__) and fragment in messages[0], messages[0]


def bad_mesh() -> list[str]:
    world = dist.get_world_size()
    return [
        error_of(ParallelDims.for_world, world, 3),
        error_of(lambda: ParallelDims(dp=3, cp=2).build("cpu")),
        error_of(ParallelDims, 2, 0),
    ]


def test_mesh_sizes(pool4):
    per_rank = pool4.run(bad_mesh, timeout=TIMEOUT)
    for i, fragment in enumerate(
        ["cp=3 does not divide the world size 4", "dp * cp = 3 * 2", ">= 1"]
    ):
        assert_same_error([m[i] for m in per_rank], ConfigError, fragment)


def too_short_without_padding() -> str:
    g = groups(1, dist.get_world_size())
    ids, labels, layout = make_batch(True, rows=[[5, 11]])
    return error_of(shard_batch, ids, labels, layout, g.cp, g.cp_rank, 1, PAD, pad=False)


def test_too_short_without_padding(pool4):
    messages = pool4.run(too_short_without_padding, timeout=TIMEOUT)
    assert_same_error(messages, LayoutError, "5 tokens, not a multiple of 2*cp_size=8")


def mismatched_batches() -> str:
    """Every rank of the CP group shards a different global batch (a data-loader bug)."""
    g = groups(1, dist.get_world_size())
    rows = [[4, 12]] if g.cp_rank == 0 else [[12, 4, 8, 8]]
    ids, labels, layout = make_batch(True, rows=rows)
    shard = shard_batch(ids, labels, layout, g.cp, g.cp_rank, 2, PAD, IGNORE, halo=False)
    return error_of(global_normalizer, shard, g.cp_group)


def test_mismatched_batches_fail_in_the_normaliser(pool2):
    messages = pool2.run(mismatched_batches, timeout=TIMEOUT)
    assert_same_error(messages, ShardMismatchError, "different plans")


def mismatched_plans_same_sizes() -> str:
    """Different plans whose exchange messages have equal sizes: caught by the fingerprints."""
    g = groups(1, 2)
    ids = torch.arange(16)[None] + 1
    _, _, layout = make_batch(True, rows=[[4, 12]] if g.cp_rank == 0 else [[12, 4]])
    labels = next_token_labels(ids, layout)
    shard = shard_batch(ids, labels, layout, 2, g.cp_rank, 1, PAD, IGNORE, halo=False)
    return error_of(exchange_halo, shard, group=g.cp_group)


def test_mismatched_plans_fail_in_the_exchange(pool2):
    messages = pool2.run(mismatched_plans_same_sizes, timeout=TIMEOUT)
    assert_same_error(messages, ShardMismatchError, "plan fingerprints by CP rank")


def wrong_group() -> list[str]:
    g = groups(2, 2)
    ids, labels, layout = make_batch(True, rows=[[8]])
    shard = shard_batch(ids, labels, layout, 2, g.cp_rank, 1, PAD, IGNORE, halo=False)
    return [
        error_of(exchange_halo, shard, group=g.token_group),
        error_of(global_normalizer, shard, g.dp_group),
    ]


def test_wrong_group(pool4):
    per_rank = pool4.run(wrong_group, timeout=TIMEOUT)
    assert_same_error([m[0] for m in per_rank], ValueError, "exchange_halo needs the CP group")
    # The DP group {0, 2} is no CP group: both of its members refuse it (the same for {1, 3}),
    # so none of them is left waiting in the all_reduce.
    messages = [m[1] for m in per_rank]
    assert all(m.startswith("ValueError") and "pass the CP group" in m for m in messages)


def hang_on_rank0():
    if dist.get_rank() != 0:
        dist.all_reduce(torch.ones(1), group=groups(1, 2).cp_group)  # rank 0 never joins


def still_alive() -> int:
    t = torch.ones(1)
    dist.all_reduce(t, group=groups(1, 2).cp_group)
    return int(t)


def test_a_hang_fails_fast_and_the_pool_recovers(pool2):
    assert pool2.run(still_alive) == [2, 2]
    spawns = pool2.spawns
    with pytest.raises(RankError, match="no answer within 3s"):
        pool2.run(hang_on_rank0, timeout=3)
    assert pool2.run(still_alive) == [2, 2]
    assert pool2.spawns == spawns + 1
