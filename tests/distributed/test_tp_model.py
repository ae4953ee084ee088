"""Tensor parallelism (alone, with CP, with FSDP2) equals the single process on the global
batch, with the expected collectives on the expected groups; bad sizes fail before any."""

import logging

import pytest
import torch
import torch.distributed as dist
from tests.helpers.distributed import (
    DP_ROWS,
    IGNORE,
    PACKED_ROWS,
    PAD,
    TP_VOCAB,
    assert_tp_matches,
    expected_calls,
    groups,
    make_batch,
    make_tp_model,
    run_tp,
    tp_reference,
)

from multitoken import ConfigError, InputError, SequenceLayout
from multitoken.models.parallelize import apply_tp
from multitoken.parallel import exchange_halo, global_normalizer, shard_batch
from multitoken.testing.comms import count_comms

# (tp, cp): every layout of the grid.
GRID = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]

# FSDP2's 2-D gradients are gathered for the comparison (outside the counted step) in two
# steps; torch warns about that on every call.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


@pytest.mark.parametrize(("tp", "cp"), GRID, ids=[f"tp{tp}-cp{cp}" for tp, cp in GRID])
def test_tp_cp_grid_equals_single_process(rank_pool, tp, cp):
    pool = rank_pool(tp * cp)
    for depth in (1, 2):
        ref = tp_reference(depth, PACKED_ROWS)
        results = pool.run(run_tp, 1, cp, tp, depth, PACKED_ROWS)
        what = f"tp={tp} cp={cp} D={depth}"
        assert_tp_matches(results, ref, what)
        expected = expected_calls(1, cp, tp, depth)
        for r in results:
            assert r["calls"] == expected, (what, r["coords"], r["calls"], expected)


@pytest.mark.parametrize(("tp", "cp"), [(2, 1), (2, 2)], ids=["tp2-cp1", "tp2-cp2"])
def test_without_sequence_parallelism(rank_pool, tp, cp):
    """parallel.sequence_parallel=false: replicated norms and activations, all-reduces only."""
    pool = rank_pool(tp * cp)
    depth = 2
    ref = tp_reference(depth, PACKED_ROWS)
    results = pool.run(run_tp, 1, cp, tp, depth, PACKED_ROWS, sp=False)
    assert_tp_matches(results, ref, f"tp={tp} cp={cp} without SP")
    expected = expected_calls(1, cp, tp, depth, sp=False)
    for r in results:
        assert r["calls"] == expected, (r["coords"], r["calls"], expected)


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no-sp"])
def test_compiled_layers_under_tp(pool2, sp):
    """train.compile's per-layer torch.compile on a TP model: the same loss and gradients."""
    depth = 2
    ref = tp_reference(depth, PACKED_ROWS)
    results = pool2.run(run_tp, 1, 1, 2, depth, PACKED_ROWS, sp=sp, compiled=True)
    assert_tp_matches(results, ref, f"compiled tp=2 sp={sp}")
    for r in results:  # compiling moves no collective
        assert r["calls"] == expected_calls(1, 1, 2, depth, sp=sp), r["calls"]


def frozen_base_under_tp() -> tuple[list[str], list[str], list[str]]:
    """mtp.freeze_base under sequence-parallel TP: SequenceParallel re-registers the norms'
    weights (as parameters that require grad); the frozen ones must stay frozen."""
    g = groups(1, 1, dist.get_world_size())
    model = make_tp_model(1, mtp=dict(freeze_base=True))
    before = [name for name, p in model.named_parameters() if p.requires_grad]
    cross_entropy = apply_tp(model, g.tp_mesh)
    after = [name for name, p in model.named_parameters() if p.requires_grad]
    ids = torch.randint(1, TP_VOCAB, (2, 16))
    layout = SequenceLayout.from_lengths([[16], [16]])
    model.loss(ids, ids, layout, cross_entropy=cross_entropy).loss.backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    return before, after, with_grad


def test_frozen_base_stays_frozen_under_sequence_parallelism(pool2):
    for before, after, with_grad in pool2.run(frozen_base_under_tp):
        assert after == before and with_grad == before, (before, after, with_grad)
        assert before and not any(name.startswith("decoder.") for name in before), before


def uneven_sequence() -> str:
    """A row length tp = 4 ranks cannot split: refused before the first collective."""
    model = make_tp_model(1)
    cross_entropy = apply_tp(model, groups(1, 1, dist.get_world_size()).tp_mesh)
    ids = torch.randint(1, TP_VOCAB, (1, 10))
    with count_comms() as log:
        try:
            layout = SequenceLayout.from_lengths([[10]])
            model.loss(ids, ids, layout, cross_entropy=cross_entropy)
            message = "no error"
        except InputError as exc:
            message = str(exc)
    assert not log.records, log.records
    return message


def test_sequence_tp_cannot_split(pool4):
    for message in pool4.run(uneven_sequence):
        assert "10 positions over tp=4" in message, message
        assert "parallel.sequence_parallel=false" in message, message


def test_untied_head(pool2):
    """A separate output head is sharded by vocabulary rows like the embedding."""
    ref = tp_reference(1, PACKED_ROWS, tie=False)
    results = pool2.run(run_tp, 1, 1, 2, 1, PACKED_ROWS, tie=False)
    assert "decoder.output.weight" in ref["grads"]
    assert_tp_matches(results, ref, "untied tp=2")


def test_fsdp_with_tp(pool4):
    """FSDP2 over dp_shard = 2 on top of tp = 2: one root mesh, plain norms and DTensor
    weights in the same units; gradients summed over the DP x CP group only."""
    depth = 2
    ref = tp_reference(depth, DP_ROWS)
    results = pool4.run(run_tp, 2, 1, 2, depth, DP_ROWS, fsdp=True)
    assert [r["coords"] for r in results] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert_tp_matches(results, ref, "fsdp dp=2 x tp=2")
    expected = expected_calls(2, 1, 2, depth, fsdp=True)
    for r in results:
        assert r["calls"] == expected, (r["coords"], r["calls"], expected)


def bad_sizes() -> list[str]:
    """Sizes that tp = world cannot split: each refused before any collective."""
    g = groups(1, 1, dist.get_world_size())
    messages = []
    for overrides in (dict(vocab_size=63), dict(n_heads=2, n_kv_heads=1), dict(ffn_dim=65)):
        model = make_tp_model(1, **overrides)
        with count_comms() as log:
            try:
                apply_tp(model, g.tp_mesh)
                messages.append("no error")
            except ConfigError as exc:
                messages.append(str(exc))
        assert not log.records, log.records
    return messages


def test_sizes_tp_cannot_split(pool2):
    per_rank = pool2.run(bad_sizes)
    assert all(m == per_rank[0] for m in per_rank)
    fragments = ["63 rows", "model.n_kv_heads=1", "model.ffn_dim=65"]
    for message, fragment in zip(per_rank[0], fragments):
        assert fragment in message and "parallel.tp=2" in message, message


def cp_group_checks() -> list[str]:
    """On (dp, cp, tp) = (1, 2, 2) the CP peers are two world ranks apart."""
    g = groups(1, 2, 2)
    ids, labels, layout = make_batch(True, rows=PACKED_ROWS)
    shard = shard_batch(ids, labels, layout, 2, g.cp_rank, 1, PAD, IGNORE, halo=False)
    out = []
    for call in (
        lambda: global_normalizer(shard, g.tp_group, tp_size=2),  # the TP group: refused
        lambda: global_normalizer(shard, g.cp_group),  # without the TP size: refused
        lambda: global_normalizer(shard, g.token_group, tp_size=2),
        lambda: exchange_halo(shard, group=g.cp_group, tp_size=2),
    ):
        try:
            result = call()
            out.append("ok" if result is not None else "none")
        except ValueError as exc:
            out.append(f"ValueError: {exc}")
    return out


def test_cp_group_check_on_mesh_coordinates(pool4):
    per_rank = pool4.run(cp_group_checks)
    for messages in per_rank:
        assert "pass the CP group" in messages[0] and "pass the CP group" in messages[1]
        assert messages[2:] == ["ok", "ok"], messages
