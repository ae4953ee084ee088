"""The MTP lookahead under CP on real ranks: exact in both ways, and what it costs in messages."""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.batches import random_rows
from tests.helpers.distributed import IGNORE, PAD, cp_step, groups, make_batch, make_model

from multitoken import mtp_inputs
from multitoken.parallel import apply_cp, exchange_halo, shard_batch
from multitoken.parallel.halo import exchange_values
from multitoken.testing.comms import count_comms


def shards_both_ways(rows, depth):
    g = groups(1, dist.get_world_size())
    ids, labels, layout = make_batch(True, seed=len(rows[0]), rows=rows)
    args = (ids, labels, layout, g.cp, g.cp_rank, depth, PAD, IGNORE)
    halo_way = shard_batch(*args)
    exchange_way = exchange_halo(shard_batch(*args, halo=False), group=g.cp_group)
    # A loader that cuts shards without knowing D: the exchange is told D and pad_id.
    no_depth = shard_batch(*args[:5], 0, PAD, IGNORE, halo=False)
    late_depth = exchange_halo(no_depth, depth, g.cp_group, PAD)
    out = {}
    ways = (("halo", halo_way), ("exchange", exchange_way), ("late_depth", late_depth))
    for name, shard in ways:
        plan = shard.plan
        piece, offset = plan.token_pieces(shard.cp_rank)
        out[name] = dict(
            real=(offset < plan.length[piece]).view(plan.batch, -1),
            seq_index=shard.layout.seq_index,
            mtp_input_ids=shard.mtp_input_ids,
            depth_labels=shard.depth_labels,
        )
    return out


@pytest.mark.parametrize("cp", [2, 4])
def test_lookahead_reassembles_to_global(rank_pool, cp):
    for seed, depth in [(0, 1), (1, 2), (2, 3), (3, 4)]:
        rows = random_rows(seed)
        ids, labels, layout = make_batch(True, seed=len(rows[0]), rows=rows)
        ref_ids, ref_labels = mtp_inputs(ids, labels, layout, depth, PAD, IGNORE)
        per_rank = rank_pool(cp).run(shards_both_ways, rows, depth)
        for way in ("halo", "exchange", "late_depth"):
            got_ids = torch.full_like(ref_ids, -1)
            got_labels = torch.full_like(ref_labels, -1)
            seen = torch.zeros(ids.shape, dtype=torch.long)
            for result in per_rank:
                r = result[way]
                real = r["real"]
                b = torch.arange(ids.shape[0])[:, None].expand_as(real)[real]
                t = r["seq_index"][real]
                got_ids[:, b, t] = r["mtp_input_ids"][:, real]
                got_labels[:, b, t] = r["depth_labels"][:, real]
                seen.index_put_((b, t), torch.ones_like(b), accumulate=True)
            assert bool((seen == 1).all()), f"{way}: every token on exactly one rank"
            assert torch.equal(got_ids, ref_ids), f"cp={cp} D={depth} {way} ids"
            assert torch.equal(got_labels, ref_labels), f"cp={cp} D={depth} {way} labels"


def count_lookahead_messages() -> list[dict]:
    g = groups(1, dist.get_world_size())
    table = []
    for docs_per_row in (1, 8, 30):
        seqlen = 60
        rows = [[seqlen // docs_per_row] * (docs_per_row - 1)] * 2
        rows = [r + [seqlen - sum(r)] for r in rows]
        ids, labels, layout = make_batch(True, rows=rows)
        for depth in (1, 2, 3, 4):
            args = (ids, labels, layout, g.cp, g.cp_rank, depth, PAD, IGNORE)
            with count_comms() as halo_log:
                shard_batch(*args)
            bare = shard_batch(*args, halo=False)
            with count_comms() as exchange_log:
                exchange_halo(bare, group=g.cp_group)
            extra = [bare.layout.positions, bare.layout.seq_index, bare.input_ids * 2]
            for n_tensors in (1, 2, 5):
                tensors = [bare.input_ids, bare.labels, *extra][:n_tensors]
                with count_comms() as many_log:
                    exchange_values(
                        tensors, [0] * n_tensors, bare.plan, g.cp_rank, depth, g.cp_group
                    )
                table.append(
                    dict(
                        docs=docs_per_row,
                        depth=depth,
                        tensors=n_tensors,
                        halo=len(halo_log.records),
                        exchange=[r.name for r in exchange_log.records],
                        exchange_group_ok=all(r.group is g.cp_group for r in exchange_log.records),
                        many=[r.name for r in many_log.records],
                    )
                )
    return table


@pytest.mark.parametrize("cp", [2, 4])
def test_message_counts(rank_pool, cp):
    for table in rank_pool(cp).run(count_lookahead_messages):
        for row in table:
            assert row["halo"] == 0, row  # no message at all with the sharding halo
            assert row["exchange"] == ["all_to_all_single"], row  # exactly one collective
            assert row["many"] == ["all_to_all_single"], row
            assert row["exchange_group_ok"], row


def step_messages(way: str) -> dict:
    """A whole DP x CP step under the counter: which collectives, on which groups."""
    g = groups(2, 2)
    depth = 2
    ids, labels, layout = make_batch(True, rows=[[5, 11], [16]])
    model = apply_cp(make_model(depth), g.cp_group)
    shard = shard_batch(ids, labels, layout, 2, g.cp_rank, depth, PAD, IGNORE, halo=way == "halo")
    with count_comms() as log:
        cp_step(shard, model, g, g.token_group, g.token_group)
    model_cfg = model.decoder.config
    kv_bytes = 2 * 2 * model_cfg.kv_heads * shard.plan.local_len * model_cfg.head_dim * 4
    named = {"cp": g.cp_group, "dp_cp": g.token_group, "dp": g.dp_group}
    return dict(
        calls=[
            (r.name, next((k for k, v in named.items() if v is r.group), None)) for r in log.records
        ],
        world=[r.name for r in log.records if r.group is None or r.group is dist.group.WORLD],
        gather_bytes={r.nbytes for r in log.records if r.name.startswith("all_gather")},
        kv_bytes=kv_bytes,
        p2p=log.count("p2p"),
    )


@pytest.mark.parametrize("way", ["halo", "exchange"])
def test_step_collectives_use_their_groups(pool4, way):
    layers = 2 + 2  # main layers + MTP depths, each gathers K and V together
    for r in pool4.run(step_messages, way):
        assert r["world"] == [] and r["p2p"] == 0
        calls = r["calls"]
        assert calls[0] == ("all_reduce", "dp_cp")  # the normaliser (and plan check) first
        assert calls[-1] == ("all_reduce", "dp_cp")  # the flattened gradient sum last
        middle = calls[1:-1]
        if way == "exchange":
            assert middle[0] == ("all_to_all_single", "cp")
            middle = middle[1:]
        gathers = [c for c in middle if c[0].startswith("all_gather")]
        scatters = [c for c in middle if c[0].startswith("reduce_scatter")]
        assert len(gathers) == len(scatters) == layers
        assert len(gathers) + len(scatters) == len(middle)
        assert {c[1] for c in middle} == {"cp"}
        # Grouped-query attention: only the n_kv_heads heads travel.
        assert r["gather_bytes"] == {r["kv_bytes"]}
