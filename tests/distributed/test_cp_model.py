"""CP (and DP x CP) training steps equal the single-process run on the global batch."""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.distributed import (
    DP_ROWS,
    IGNORE,
    PAD,
    RTOL,
    assert_matches,
    cp_step,
    groups,
    make_batch,
    make_model,
    reference,
    reference_step,
    run_cp,
)

from multitoken import SequenceLayout
from multitoken.parallel import MetricSums, apply_cp, shard_batch


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_equals_single_process(rank_pool, cp, packed):
    pool = rank_pool(cp)
    for depth in (1, 2, 3):
        ref = reference(depth, packed)
        for way in ("halo", "exchange"):
            results = pool.run(run_cp, depth, packed, way)
            assert_matches(results, ref, f"cp={cp} D={depth} {way}")


@pytest.mark.parametrize("way", ["halo", "exchange"])
def test_row_causal_attention(pool2, way):
    """The "causal" mode attends across documents by row index: the gathered keys carry the
    unsharded row index, and padding never joins in."""
    ref = reference(2, True, attention="causal")
    results = pool2.run(run_cp, 2, True, way, attention="causal")
    assert_matches(results, ref, f"causal {way}")


def test_ranks_without_targets_contribute_zero(pool4):
    """Documents of 2 and 3 tokens over 4 ranks: some rank has no valid target at some depth
    (its share of the loss is 0 / N, never 0 / 0), and depth 3 has none anywhere."""
    rows = [[3, 2, 3], [2, 2, 2, 2]]
    ref = reference(3, True, rows=rows)
    assert int(ref["depth_tokens"][3]) == 0 and int(ref["depth_tokens"][1]) > 0
    for way in ("halo", "exchange"):
        results = pool4.run(run_cp, 3, True, way, rows=rows)
        tokens = torch.stack([r["depth_tokens"] for r in results])  # (ranks, D + 1)
        assert bool(((tokens == 0) & (tokens.sum(0) > 0)).any()), tokens  # the case occurs
        for r in results:
            assert bool(torch.isfinite(r["depth_loss"]).all()) and bool(torch.isfinite(r["loss"]))
        assert_matches(results, ref, f"no targets {way}")


def run_dp_cp(depth: int, way: str) -> dict:
    """DP x CP = 2 x 2: each DP replica takes half of the rows, each CP rank a shard of them."""
    g = groups(2, 2)
    ids, labels, layout = make_batch(packed=True, rows=DP_ROWS)
    rows = slice(2 * g.dp_rank, 2 * g.dp_rank + 2)
    local_layout = SequenceLayout.from_lengths(DP_ROWS[rows])
    model = apply_cp(make_model(depth), g.cp_group)
    shard = shard_batch(
        ids[rows], labels[rows], local_layout, 2, g.cp_rank, depth, PAD, IGNORE, halo=way == "halo"
    )
    result = cp_step(shard, model, g, g.token_group, g.token_group)
    sums = MetricSums(depth)
    sums.add(result.pop("out"))
    losses, accuracies, tokens = sums.reduce(g.token_group)
    result["metrics"] = dict(losses=losses, accuracies=accuracies, tokens=tokens)
    result["ranks"] = (dist.get_rank(), g.dp_rank, g.cp_rank)
    return result


@pytest.mark.parametrize("way", ["halo", "exchange"])
def test_dp_cp_equals_single_process(pool4, way):
    depth = 2
    ref = reference_step(make_model(depth), *make_batch(packed=True, rows=DP_ROWS))
    results = pool4.run(run_dp_cp, depth, way)
    assert [r["ranks"] for r in results] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert_matches(results, ref, f"dp x cp = 2 x 2 {way}")
    for r in results:  # the logged numbers are global, the same on every rank
        metrics = r["metrics"]
        assert metrics == results[0]["metrics"]
        assert metrics["losses"] == pytest.approx(ref["depth_loss"].tolist(), rel=RTOL)
        assert metrics["tokens"] == ref["depth_tokens"].double().tolist()
