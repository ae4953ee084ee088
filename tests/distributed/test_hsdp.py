"""HSDP (``parallel.dp_replicate``): FSDP2 on the 2-D ``(dp_replicate, dp_shard x cp)`` mesh
equals the single process on the global batch, with its collectives counted exactly, and holds
the memory of one shard per replica.

Every rank reads the rows of its ``dp_rank = replicate_rank * dp_shard + shard_rank``, the same
rows it reads without replicas: one data stream for every layout.
"""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests.helpers.distributed import (
    DP_ROWS,
    PAD,
    assert_tp_matches,
    expected_calls,
    fsdp_step_footprint,
    groups,
    make_batch,
    make_model,
    run_tp,
    tp_reference,
)

from multitoken import SequenceLayout, StepBatch, step_loss
from multitoken.parallel import apply_fsdp, global_normalizer
from multitoken.train.checkpoint import load_checkpoint, save_checkpoint

# The comparison gathers the FSDP2 x TP gradients in two steps; torch warns on every call.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

DEPTH = 2


def check_layout(pool, dp: int, cp: int, tp: int, dp_replicate: int, timeout: float = 60.0):
    """One counted step of ``run_tp`` under HSDP: equal to one process, exact collectives,
    and the ranks in the mesh order (world rank = (dp_rank * cp + cp_rank) * tp + tp_rank)."""
    ref = tp_reference(DEPTH, DP_ROWS)
    results = pool.run(
        run_tp, dp, cp, tp, DEPTH, DP_ROWS, fsdp=True, dp_replicate=dp_replicate, timeout=timeout
    )
    coords = [(d, c, t) for d in range(dp) for c in range(cp) for t in range(tp)]
    assert [r["coords"] for r in results] == coords
    what = f"hsdp dp_replicate={dp_replicate} dp={dp} cp={cp} tp={tp}"
    assert_tp_matches(results, ref, what)
    expected = expected_calls(dp, cp, tp, DEPTH, fsdp=True, dp_replicate=dp_replicate)
    for r in results:
        assert r["calls"] == expected, (what, r["coords"], r["calls"], expected)


def test_hsdp_equals_single_process(pool4):
    """dp_replicate = 2 x dp_shard = 2: loss, per-depth losses, every full gradient and the
    gradient norm equal one process (rtol 1e-5). Per step: the normaliser's all-reduce on the
    DP x CP group; each of the 4 resharded units gathered twice and the root once (9) and
    reduce-scattered once each (5), on its replica's dp_shard group; then one all-reduce per
    unit across the replicas (5), a plain sum."""
    check_layout(pool4, dp=4, cp=1, tp=1, dp_replicate=2)
    assert expected_calls(4, 1, 1, DEPTH, fsdp=True, dp_replicate=2) == {
        ("all_reduce", "dp_cp"): 1,
        ("all_gather_single", "dp_shard"): 9,
        ("reduce_scatter_single", "dp_shard"): 5,
        ("all_reduce", "dp_replicate"): 5,
    }


@pytest.mark.parametrize(("cp", "tp"), [(1, 2), (2, 1)], ids=["replicate2-tp2", "replicate2-cp2"])
def test_hsdp_with_tp_or_cp(pool4, cp, tp):
    """dp_replicate = dp = 2 with tp = 2 (one root mesh for DTensor TP and the 2-D FSDP2
    mesh; a one-rank shard dim: no gather, no reduce-scatter, only the replicas' all-reduce)
    or with cp = 2 (the shard dim is the CP group: FSDP2's collectives next to the K/V ones)."""
    check_layout(pool4, dp=2, cp=cp, tp=tp, dp_replicate=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cp", "tp"), [(1, 2), (2, 1)], ids=["replicate2-shard2-tp2", "replicate2-shard2-cp2"]
)
def test_hsdp_with_tp_or_cp_on_8_ranks(rank_pool, cp, tp):
    """dp_replicate = 2 x dp_shard = 2 with tp = 2, or with cp = 2 (the shard dim is then
    dp_shard x cp flattened from the root mesh)."""
    check_layout(rank_pool(8), dp=4, cp=cp, tp=tp, dp_replicate=2, timeout=240)


def test_hsdp_memory(pool4):
    """dp_replicate = 2 x dp_shard = 2 holds half of the parameter, gradient and optimiser
    bytes of one process (each replica one FSDP2 copy sharded over 2 ranks), within the
    rounding of dim-0 shards; the step's collectives are those of the shard and replica
    groups only."""
    model = make_model(DEPTH)
    full = 4 * 4 * sum(p.numel() for p in model.parameters())  # param + grad + 2 AdamW, fp32
    slack = 4 * 4 * 3 * len(list(model.parameters()))
    results = pool4.run(fsdp_step_footprint, 4, 2)
    for r in results:
        assert abs(r["bytes"] - full / 2) <= slack, (r["bytes"], full)
    units = 2 + 2  # main layers and MTP depths, resharded after forward; the root once
    for r in results:
        assert r["calls"] == {
            ("all_reduce", "dp_cp"): 1,  # the loss normaliser
            ("all_gather_single", "dp_shard"): 2 * units + 1,
            ("reduce_scatter_single", "dp_shard"): units + 1,
            ("all_reduce", "dp_replicate"): units + 1,
        }, r["calls"]


def _train_step(model, optimizer, g) -> torch.Tensor:
    """One AdamW step on this rank's rows of DP_ROWS (dp = 4, one row each)."""
    ids, labels, _ = make_batch(packed=True, rows=DP_ROWS)
    per_rank = len(DP_ROWS) // g.dp
    rows = slice(per_rank * g.dp_rank, per_rank * (g.dp_rank + 1))
    layout = SequenceLayout.from_lengths(DP_ROWS[rows])
    batch = StepBatch.build(ids[rows], labels[rows], layout, DEPTH, PAD)
    batch = replace(batch, normalizer=global_normalizer(batch.depth_labels, g.token_group))
    loss = step_loss(model, batch, 0.3).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _full_state(model, optimizer) -> list[torch.Tensor]:
    """Every parameter and AdamW moment, unsharded (collective)."""
    out = []
    for param in model.parameters():
        out.append(param.full_tensor())
        state = optimizer.state[param]
        out += [state[key].full_tensor() for key in ("exp_avg", "exp_avg_sq")]
    return out


def checkpoint_across(run_dir: str, saved_replicate: int, loaded_replicate: int) -> dict:
    """A step at dp = 4 with ``saved_replicate`` replicas, saved; loaded into a model built with
    other weights at ``loaded_replicate``; then one more step on both."""
    saved_g = groups(4, 1, dp_replicate=saved_replicate)
    loaded_g = groups(4, 1, dp_replicate=loaded_replicate)
    model = apply_fsdp(make_model(DEPTH), saved_g.fsdp_mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, optimizer, saved_g)
    path = save_checkpoint(Path(run_dir), 1, model, optimizer, {"step": 1}, saved_g.world_group)
    other = apply_fsdp(make_model(DEPTH, seed=1), loaded_g.fsdp_mesh)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
    extra = load_checkpoint(path, other, other_optimizer, loaded_g.world_group)
    same = all(
        torch.equal(a, b)
        for a, b in zip(_full_state(model, optimizer), _full_state(other, other_optimizer))
    )
    losses = (_train_step(model, optimizer, saved_g), _train_step(other, other_optimizer, loaded_g))
    return dict(same=same, extra=extra, losses=losses)


@pytest.mark.parametrize(
    ("saved", "loaded"), [(2, 1), (1, 2)], ids=["hsdp-to-fsdp", "fsdp-to-hsdp"]
)
def test_checkpoint_reshards_between_hsdp_and_fsdp(pool4, tmp_path, saved, loaded):
    """DCP checkpoints of the distributed state-dict API: an HSDP (2 x 2) checkpoint loads at
    plain FSDP2 over 4 ranks and back, parameters and AdamW moments equal, and the next step
    has the same loss."""
    results = pool4.run(checkpoint_across, str(tmp_path / "run"), saved, loaded)
    for r in results:
        assert r["same"] and r["extra"] == {"step": 1}, r
        torch.testing.assert_close(r["losses"][0], r["losses"][1], rtol=1e-5, atol=1e-6)
