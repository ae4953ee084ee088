"""Pipeline parallelism without ranks: the stage split, the one-line errors, the layout with a
pp dim, the stages of a pruned model run in a row equal the whole model, and checkpoints of
the format before the flat optimiser state still load."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.batches import packed_batch
from tests.helpers.models import tiny_model

import multitoken.train.checkpoint as checkpoint
from multitoken import StepBatch
from multitoken.errors import ConfigError
from multitoken.models.pipeline import GPTStage, prune_model, stage_layers
from multitoken.parallel import ParallelDims
from multitoken.parallel.pipeline import check_pipeline, rank_stages, split_layers, stage_rank


def test_split_layers():
    assert split_layers(8, 4) == [2, 2, 2, 2]
    assert split_layers(3, 2, (3, 0)) == [3, 0]  # the depths on a stage of their own
    with pytest.raises(ConfigError, match='n_layers=3 does not split evenly .* "2,1"'):
        split_layers(3, 2)
    for bad in ((1, 1), (0, 3), (2, 1, 0)):
        with pytest.raises(ConfigError, match="pp_layers must give 2 layer counts"):
            split_layers(3, 2, bad)
    assert [stage_layers([2, 1, 0], s) for s in range(3)] == [[0, 1], [2], []]


def test_stage_placement():
    assert [rank_stages("1F1B", 4, r) for r in range(4)] == [[0], [1], [2], [3]]
    assert rank_stages("Interleaved1F1B", 2, 1) == [1, 3]
    assert rank_stages("ZBVZeroBubble", 2, 0) == [0, 3]  # V: first and last on rank 0
    assert stage_rank("DualPipeV", 4, 7) == 0 and stage_rank("InterleavedZeroBubble", 4, 7) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2, "1F1B", 3, 8, 4), "pp_microbatches=3 does not divide the 8 rows"),
        ((4, "1F1B", 2, 8, 4), "needs at least one microbatch per stage \\(4\\)"),
        ((2, "ZBVZeroBubble", 2, 8, 4), "needs at least one microbatch per stage \\(4\\)"),
        ((2, "Interleaved1F1B", 7, 14, 4), "pp_microbatches=7 does not fill: .* multiple of"),
        ((2, "GPipe", 2, 8, 3), "n_layers=3 does not split evenly over 2"),
    ],
)
def test_check_pipeline_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        check_pipeline(*args)


def test_parallel_dims_pp_is_outermost():
    dims = ParallelDims(pp=2, dp=2, tp=2, cp=1)
    assert dims.world_size == 8 and dims.shape == (2, 1, 2, 1, 2)
    dims._rank = 6  # (pp 1, dp 1, tp 0)
    assert (dims.pp_rank, dims.dp_rank, dims.cp_rank, dims.tp_rank) == (1, 1, 0, 0)
    with pytest.raises(ConfigError, match="pp \\* dp \\* cp \\* tp = 2 \\* 2 \\* 1 \\* 2 = 8"):
        dims.check_world(4)
    assert ParallelDims.for_world(8, pp=2, tp=2).dp == 2
    with pytest.raises(ConfigError, match="pp=3 does not divide the world size 8"):
        ParallelDims.for_world(8, pp=3)


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("tie", [True, False])
def test_stages_in_a_row_are_the_model(depth, tie):
    """Three pruned copies, one per stage, chained by hand: h^0 .. h^D of the whole model
    (the stages hold the whole model's modules, under its names)."""
    ids, labels, layout = packed_batch([[3, 1, 8, 4], [16]], vocab=64)
    whole = tiny_model(depth, n_layers=3, tie_embeddings=tie)
    want = whole(ids, layout)
    counts = [1, 2, 0]
    batch = StepBatch.build(ids, labels, layout, depth)
    kwargs = dict(doc_ids=layout.doc_ids, positions=layout.positions, seq_index=layout.seq_index)
    x = ids
    for stage in range(3):
        model = tiny_model(depth, n_layers=3, tie_embeddings=tie)
        prune_model(model, [stage], counts)
        module = GPTStage(model, stage, 3, counts)
        extra = {"mtp_input_ids": batch.mtp_input_ids.transpose(0, 1)} if depth else {}
        x = module(x, **kwargs, **extra)
        names = {n for n, _ in model.named_parameters()}
        assert names <= {n for n, _ in whole.named_parameters()}
    assert len(x) == depth + 1
    for got, ref in zip(x, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_with_optimiser_groups_by_index_still_loads(tmp_path, monkeypatch):
    """Checkpoints saved before the flat optimiser state (groups by index) load as saved."""
    model = tiny_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels, layout = packed_batch(vocab=64)
    model.loss(ids, labels, layout).loss.backward()
    optimizer.step()
    old = checkpoint.StateDictOptions(ignore_frozen_params=True)
    monkeypatch.setattr(checkpoint, "_TRAINABLE", old)
    path = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1})
    monkeypatch.undo()
    assert not checkpoint._flat_optimizer(path)
    fresh = tiny_model(1, seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    checkpoint.load_checkpoint(path, fresh, fresh_opt)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(optimizer.state[a]["exp_avg"], fresh_opt.state[b]["exp_avg"]), name
    new = checkpoint.save_checkpoint(tmp_path, 2, model, optimizer, {"step": 2})
    assert checkpoint._flat_optimizer(new)
