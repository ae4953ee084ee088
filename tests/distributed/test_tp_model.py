"""Tensor parallelism (alone, with CP, with FSDP2) equals the single process on the global
batch, with the expected collectives on the expected groups; bad sizes fail before any."""

import logging

import pytest
import torch
import torch.distributed as dist
from cp_cases import IGNORE, PACKED_ROWS, PAD, make_batch
from test_cp_model import DP_ROWS
from tp_cases import N_LAYERS, TP_VOCAB, make_tp_model, run_tp, tp_groups, tp_reference

from multitoken import ConfigError, InputError, MTPConfig, MTPModel, SequenceLayout
from multitoken.models import GPTConfig
from multitoken.models.parallelize import apply_tp
from multitoken.parallel import exchange_halo, global_normalizer, shard_batch
from multitoken.testing.comms import count_comms

RTOL, ATOL = 1e-5, 1e-6
# (tp, cp): every layout of the grid.
GRID = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]

# FSDP2's 2-D gradients are gathered for the comparison (outside the counted step) in two
# steps; torch warns about that on every call.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def expected_calls(
    dp: int,
    cp: int,
    tp: int,
    depth: int,
    fsdp: bool = False,
    sp: bool = True,
    dp_replicate: int = 1,
) -> dict:
    """Collectives of one step by (name, group role); n transformer layers, main and MTP.
    Roles as :func:`tp_cases.group_roles` names them."""
    n = N_LAYERS + depth
    calls = {}
    if tp > 1 and sp:
        # Forward: the embedding (main + each depth) all-reduced; per layer the attention's
        # and the feed-forward's input all-gathered from sequence shards and wo's and w2's
        # output reduce-scattered to them; each eh_proj's output reduce-scattered; the final
        # norm of the decoder and of each depth gathered. Backward: the mirror image (an
        # all-gather for each reduce-scatter and back; the first layer's and each depth's
        # entry slices gathered, each eh_proj's feature-split input gathered), one
        # all-reduce per norm weight (two per layer, one per final norm) and the loss's
        # hidden gradient per depth.
        calls[("all_reduce", "tp")] = (1 + depth) + 2 * n + (1 + depth) + (depth + 1)
        calls[("all_gather_into_tensor", "tp")] = (2 * n + 1 + depth) + (2 * n + 1 + 2 * depth)
        calls[("reduce_scatter_tensor", "tp")] = (2 * n + depth) + 2 * n
        calls[("all_gather_single", "tp")] = depth + 1  # the loss statistics
    elif tp > 1:
        # Forward: the embedding (main + each depth), wo and w2 of every layer. Backward: the
        # attention's and feed-forward's input gradient of every layer, each eh_proj's input
        # gradient, the loss's hidden gradient per depth.
        calls[("all_reduce", "tp")] = (1 + depth) + 2 * n + 2 * n + depth + (depth + 1)
        if depth:
            calls[("all_gather_into_tensor", "tp")] = depth  # eh_proj's output
        calls[("all_gather_single", "tp")] = depth + 1  # the loss statistics
    if cp > 1:
        calls[("all_gather_single", "cp")] = n  # K/V forward
        calls[("reduce_scatter_single", "cp")] = n  # their gradient backward
    if dp * cp > 1:
        # With dp = 1 the DP x CP ranks are the CP ranks (see tp_cases.group_roles).
        role = "cp" if dp == 1 else "dp_cp"
        calls[("all_reduce", role)] = 1 if fsdp else 2  # normaliser (+ gradient sum)
        if fsdp and dp_replicate == 1:
            # Every layer gathered forward and backward, the root once; one RS each.
            calls[("all_gather_single", role)] = 2 * n + 1
            calls[("reduce_scatter_single", role)] = n + 1
        elif fsdp:
            # HSDP: the same gathers and reduce-scatters on the shard dim (dp_shard x cp), none
            # when it has one rank; then one all-reduce per unit across the replicas.
            dp_shard = dp // dp_replicate
            if dp_shard * cp > 1:
                shard = "dp_shard" if cp == 1 else "cp" if dp_shard == 1 else "dp_shard_cp"
                for name, count in (
                    ("all_gather_single", 2 * n + 1),
                    ("reduce_scatter_single", n + 1),
                ):
                    calls[(name, shard)] = calls.get((name, shard), 0) + count
            calls[("all_reduce", "dp_replicate")] = n + 1
    return calls


def assert_matches(results: list[dict], ref: dict, what: str) -> None:
    """TP peers hold the same tokens: the loss is summed over one TP rank per token shard."""
    firsts = [r for r in results if r["coords"][2] == 0]
    for r in results:  # every TP peer computed the same loss as its TP rank 0
        peer = next(f for f in firsts if f["coords"][:2] == r["coords"][:2])
        assert torch.equal(r["loss"], peer["loss"]), what
    total = sum(r["loss"] for r in firsts)
    torch.testing.assert_close(total, ref["loss"], rtol=RTOL, atol=ATOL, msg=what)
    depth_loss = sum(r["depth_loss"] for r in firsts)
    torch.testing.assert_close(depth_loss, ref["depth_loss"], rtol=RTOL, atol=ATOL, msg=what)
    assert torch.equal(sum(r["depth_tokens"] for r in firsts), ref["depth_tokens"]), what
    for r in results:
        torch.testing.assert_close(r["grad_norm"], ref["grad_norm"], rtol=RTOL, atol=ATOL)
        assert r["grads"].keys() == ref["grads"].keys(), what
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(
                r["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=f"{what} {r['coords']} {name}"
            )


@pytest.mark.parametrize(("tp", "cp"), GRID, ids=[f"tp{tp}-cp{cp}" for tp, cp in GRID])
def test_tp_cp_grid_equals_single_process(rank_pool, tp, cp):
    pool = rank_pool(tp * cp)
    for depth in (1, 2):
        ref = tp_reference(depth, PACKED_ROWS)
        results = pool.run(run_tp, 1, cp, tp, depth, PACKED_ROWS)
        what = f"tp={tp} cp={cp} D={depth}"
        assert_matches(results, ref, what)
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
    assert_matches(results, ref, f"tp={tp} cp={cp} without SP")
    expected = expected_calls(1, cp, tp, depth, sp=False)
    for r in results:
        assert r["calls"] == expected, (r["coords"], r["calls"], expected)


@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no-sp"])
def test_compiled_layers_under_tp(pool2, sp):
    """train.compile's per-layer torch.compile on a TP model: the same loss and gradients."""
    depth = 2
    ref = tp_reference(depth, PACKED_ROWS)
    results = pool2.run(run_tp, 1, 1, 2, depth, PACKED_ROWS, sp=sp, compiled=True)
    assert_matches(results, ref, f"compiled tp=2 sp={sp}")
    for r in results:  # compiling moves no collective
        assert r["calls"] == expected_calls(1, 1, 2, depth, sp=sp), r["calls"]


def frozen_base_under_tp() -> tuple[list[str], list[str], list[str]]:
    """mtp.freeze_base under sequence-parallel TP: SequenceParallel re-registers the norms'
    weights (as parameters that require grad); the frozen ones must stay frozen."""
    g = tp_groups(1, 1, dist.get_world_size())
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=TP_VOCAB, dim=32, n_layers=N_LAYERS, n_heads=8, n_kv_heads=4)
    model = MTPModel.from_config(config, MTPConfig(num_depths=1, freeze_base=True), pad_id=PAD)
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
    cross_entropy = apply_tp(model, tp_groups(1, 1, dist.get_world_size()).tp_mesh)
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
    assert_matches(results, ref, "untied tp=2")


def test_fsdp_with_tp(pool4):
    """FSDP2 over dp_shard = 2 on top of tp = 2: one root mesh, plain norms and DTensor
    weights in the same units; gradients summed over the DP x CP group only."""
    depth = 2
    ref = tp_reference(depth, DP_ROWS)
    results = pool4.run(run_tp, 2, 1, 2, depth, DP_ROWS, fsdp=True)
    assert [r["coords"] for r in results] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert_matches(results, ref, "fsdp dp=2 x tp=2")
    expected = expected_calls(2, 1, 2, depth, fsdp=True)
    for r in results:
        assert r["calls"] == expected, (r["coords"], r["calls"], expected)


def bad_sizes() -> list[str]:
    """Sizes that tp = world cannot split: each refused before any collective."""
    g = tp_groups(1, 1, dist.get_world_size())
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
    g = tp_groups(1, 2, 2)
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
