"""Pipeline parallelism equals one process: every schedule, pp in {2, 4}, D in {1, 2}, packed
rows of tiny documents, two AdamW steps; the point-to-point messages of a step counted."""

import pytest
import torch
from tests.helpers.batches import packed_batch
from tests.helpers.distributed import ATOL, RTOL
from tests.helpers.pipeline import PP_GPT, PP_ROWS, pp_model, pp_reference, run_pp, run_pp_layout

from multitoken.parallel.pipeline import rank_stages, stage_rank

SCHEDULES = [
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
]
SEQ_LEN, DIM = 24, PP_GPT["dim"]


def expected_p2p(schedule: str, pp: int, rank: int, microbatches: int) -> int:
    """Messages one rank sends per step (and receives): one per microbatch forward to each
    next stage on another rank, one backward to each previous stage on another rank."""
    n_stages = pp * (2 if schedule not in ("GPipe", "1F1B") else 1)
    sends = 0
    for stage in rank_stages(schedule, pp, rank):
        for peer in (stage - 1, stage + 1):
            if 0 <= peer < n_stages and stage_rank(schedule, pp, peer) != rank:
                sends += microbatches
    return sends


def assert_pipeline_matches(results: list[dict], ref: list[dict], what: str) -> None:
    names = set()
    for r in results:
        for step, (got, want) in enumerate(zip(r["records"], ref)):
            label = f"{what} rank {r['rank']} step {step}"
            torch.testing.assert_close(got["loss"], want["loss"], rtol=RTOL, atol=ATOL, msg=label)
            torch.testing.assert_close(got["depth_loss"], want["depth_loss"], rtol=RTOL, atol=ATOL)
            assert torch.equal(got["depth_tokens"], want["depth_tokens"]), label
            for name, grad in got["grads"].items():
                torch.testing.assert_close(
                    grad, want["grads"][name], rtol=RTOL, atol=ATOL, msg=f"{label} {name}"
                )
            names |= set(got["grads"])
    assert names == set(ref[0]["grads"]), what  # every parameter is on some stage


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_equals_single_process(rank_pool, pp, schedule, depth):
    microbatches = 2 * pp  # every schedule's minimum at pp = 4 (ZBV, DualPipeV: 2 pp stages)
    results = rank_pool(pp).run(run_pp, pp, schedule, depth, microbatches, timeout=120)
    what = f"pp={pp} {schedule} D={depth}"
    assert_pipeline_matches(results, pp_reference(depth), what)
    rows = len(PP_ROWS) // microbatches
    holders = [r for r in results if r["embedding"] is not None]
    for r in results:
        sends = expected_p2p(schedule, pp, r["rank"], microbatches)
        assert (r["sends"], r["recvs"]) == (sends, sends), what
        assert r["sent_bytes"] == sends * rows * SEQ_LEN * DIM * 4, what
        shared = len(holders) == 2 and r["embedding"] is not None
        assert r["collectives"] == ["broadcast"] + ["all_reduce"] * shared, what
    # The first stage's embedding and the last stage's copy: equal after every update.
    assert len(holders) in (1, 2)
    assert torch.equal(holders[0]["embedding"], holders[-1]["embedding"]), what


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_untied_head(pool2, schedule):
    """An untied head sits on the last stage; the embedding copy is still shared for D >= 1,
    and not made at all for D = 0 (nothing on the last stage reads it)."""
    for depth in (0, 1):
        results = pool2.run(run_pp, 2, schedule, depth, 4, tie=False, timeout=120)
        assert_pipeline_matches(results, pp_reference(depth, tie=False), f"{schedule} D={depth}")
        holders = [r for r in results if r["embedding"] is not None]
        assert len(holders) == (1 if depth == 0 or schedule == "ZBVZeroBubble" else 2)


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_pipeline_with_fsdp(pool4, schedule):
    """pp 2 x dp 2, FSDP2 over each stage's two DP ranks: the DP ranks' shares add up to the
    one-process loss, every gradient (gathered) and the gradient norm are the one-process
    ones."""
    depth = 2
    results = pool4.run(run_pp_layout, 2, 2, schedule, depth, 2, timeout=120)
    ref = pp_reference(depth)[0]
    whole = pp_model(depth)
    whole.loss(*packed_batch(PP_ROWS, vocab=61)).loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(whole.parameters(), float("inf"))
    assert sorted(r["coords"] for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for pp_rank in (0, 1):
        shares = [r for r in results if r["coords"][0] == pp_rank]
        torch.testing.assert_close(
            sum(r["loss"] for r in shares), ref["loss"], rtol=RTOL, atol=ATOL
        )
        torch.testing.assert_close(
            sum(r["depth_loss"] for r in shares), ref["depth_loss"], rtol=RTOL, atol=ATOL
        )
    for r in results:
        torch.testing.assert_close(r["norm"], ref_norm, rtol=RTOL, atol=ATOL)
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][name], rtol=RTOL, atol=ATOL, msg=name)
