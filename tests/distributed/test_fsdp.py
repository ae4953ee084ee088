"""FSDP2 data parallelism (alone and with CP) equals the single process on the global batch."""

from dataclasses import replace

import pytest
import torch.distributed as dist
from tests.helpers.distributed import (
    DP_ROWS,
    PAD,
    assert_matches,
    fsdp_step_footprint,
    groups,
    make_batch,
    make_model,
    reference_step,
    step_record,
)

from multitoken import SequenceLayout, StepBatch, step_loss
from multitoken.parallel import apply_cp, apply_fsdp, global_normalizer, shard_batch


def run_fsdp(dp: int, cp: int, depth: int) -> dict:
    g = groups(dp, cp)
    ids, labels, layout = make_batch(packed=True, rows=DP_ROWS)
    rows_per_rank = len(DP_ROWS) // dp
    rows = slice(rows_per_rank * g.dp_rank, rows_per_rank * (g.dp_rank + 1))
    local_layout = SequenceLayout.from_lengths(DP_ROWS[rows])
    model = apply_cp(make_model(depth), g.cp_group)
    apply_fsdp(model, g.token_mesh)
    if cp == 1:
        batch = StepBatch.build(ids[rows], labels[rows], local_layout, depth, PAD)
        normalizer = global_normalizer(batch.depth_labels, g.token_group)
        batch = replace(batch, normalizer=normalizer)
    else:
        shard = shard_batch(ids[rows], labels[rows], local_layout, cp, g.cp_rank, depth, PAD)
        batch = shard.step_batch(global_normalizer(shard, g.token_group))
    out = step_loss(model, batch, model.config.loss_weight)
    out.loss.backward()
    sharded = {n: p.to_local().numel() for n, p in model.named_parameters()}
    return dict(
        **step_record(model, out),
        local_numel=sum(sharded.values()),
        rank=dist.get_rank(),
    )


@pytest.mark.parametrize(("dp", "cp"), [(2, 1), (4, 1), (2, 2)])
def test_fsdp_equals_single_process(rank_pool, dp, cp):
    depth = 2
    model = make_model(depth)
    ref = reference_step(model, *make_batch(packed=True, rows=DP_ROWS))
    results = rank_pool(dp * cp).run(run_fsdp, dp, cp, depth)
    assert_matches(results, ref, f"fsdp dp={dp} cp={cp}")
    # Every rank holds about 1 / world of the parameters (dim-0 shards, rounded up).
    total = sum(p.numel() for p in model.parameters())
    for r in results:
        assert r["local_numel"] <= total / (dp * cp) + 64 * len(ref["grads"]), r["local_numel"]


def test_fsdp_memory_and_collectives(pool4):
    """dp_shard = 4 holds at most a quarter of the parameter, gradient and optimiser bytes
    (plus the rounding of dim-0 shards), and each FSDP unit costs exactly its all-gathers and
    one reduce-scatter per step, all on the DP x CP group."""
    model = make_model(2)
    full = 4 * 4 * sum(p.numel() for p in model.parameters())  # param + grad + 2 AdamW, fp32
    results = pool4.run(fsdp_step_footprint, 4)
    n_params = len(list(model.parameters()))
    for r in results:
        assert r["bytes"] <= full / 4 + 4 * 4 * 3 * n_params, (r["bytes"], full)
    # Units: 2 main layers + 2 MTP depths resharded after forward (gathered again for the
    # backward), the root (embedding, final norm) kept from forward to backward.
    units = 2 + 2
    calls = results[0]["calls"]
    gathers = sum(n for (name, _), n in calls.items() if name.startswith("all_gather"))
    scatters = sum(n for (name, _), n in calls.items() if name.startswith("reduce_scatter"))
    assert gathers == 2 * units + 1 and scatters == units + 1, calls
    assert calls[("all_reduce", "dp_cp")] == 1  # the loss normaliser
    assert {group for _, group in calls} == {"dp_cp"}, calls
