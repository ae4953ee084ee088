"""The vocabulary-parallel chunked cross-entropy alone equals F.cross_entropy on full logits."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tests.helpers.allocation import LargestAllocation
from tests.helpers.distributed import groups

from multitoken.parallel import VocabParallelCrossEntropy
from multitoken.testing.comms import count_comms

RTOL, ATOL = 1e-5, 1e-6
TOKENS, HIDDEN, VOCAB = 37, 8, 256
LOSS_SCALE = 0.7  # a non-unit upstream gradient


def make_case(seed: int = 0):
    """``(hidden, weight, targets)``: the second half of the vocabulary repeats the first, so
    every row's maximum is tied between two shards; half of the targets are the first copy
    (top-1 hits), the other half the second copy (equal logit, but not the first maximum)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    half = torch.randn(VOCAB // 2, HIDDEN, generator=gen)
    weight = torch.cat([half, half])
    first = (hidden @ weight.t()).argmax(-1)
    targets = torch.where(torch.arange(TOKENS) % 2 == 0, first, first + VOCAB // 2)
    targets[::5] = -100
    targets[3] = 1  # an ordinary miss
    return hidden, weight, targets


def run_vocab_loss(chunk_elements: int) -> dict:
    tp = dist.get_world_size()
    g = groups(1, 1, tp)
    hidden, weight, targets = make_case()
    hidden.requires_grad_()
    shard = weight.chunk(tp)[g.tp_rank].clone().requires_grad_()  # (V / tp, H)
    loss = VocabParallelCrossEntropy(g.tp_group)
    with count_comms() as log, LargestAllocation() as mode:
        stats = loss(hidden, shard, targets, -100, chunk_elements)
        (stats.loss_sum * LOSS_SCALE).backward()
    return dict(
        loss=stats.loss_sum.detach(),
        valid=stats.num_valid,
        correct=stats.num_correct,
        grad_hidden=hidden.grad,
        grad_shard=shard.grad,
        calls=[(r.name, r.group is g.tp_group) for r in log.records],
        largest=mode.largest,
    )


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy(rank_pool, tp):
    hidden, weight, targets = make_case()
    hidden.requires_grad_()
    weight.requires_grad_()
    logits = hidden @ weight.t()
    ref = F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)
    (ref * LOSS_SCALE).backward()
    valid = targets != -100
    ref_correct = ((logits.argmax(-1) == targets) & valid).sum()
    assert 0 < int(ref_correct) < int(valid.sum())  # ties decided by the first maximum
    # Three rows of the shard per chunk: several chunks and a short last one.
    chunk_elements = 3 * VOCAB // tp
    results = rank_pool(tp).run(run_vocab_loss, chunk_elements)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["loss"], ref.detach(), rtol=RTOL, atol=ATOL)
        assert int(r["valid"]) == int(valid.sum())
        assert int(r["correct"]) == int(ref_correct), (r["correct"], ref_correct)
        torch.testing.assert_close(r["grad_hidden"], hidden.grad, rtol=RTOL, atol=ATOL)
        rows = weight.grad.chunk(tp)[rank]
        torch.testing.assert_close(r["grad_shard"], rows, rtol=RTOL, atol=ATOL)
        # One all-gather of the per-token statistics forward, one all-reduce of the hidden
        # gradient backward, both on the TP group.
        assert r["calls"] == [("all_gather_single", True), ("all_reduce", True)], r["calls"]
        # Never [tokens, V / tp] logits: the largest tensor is a chunk, the hidden states,
        # the weight shard's gradient or the gathered statistics.
        bound = max(chunk_elements, TOKENS * HIDDEN, VOCAB // tp * HIDDEN, tp * TOKENS * 5)
        assert r["largest"] <= bound, (r["largest"], bound)
        assert r["largest"] < TOKENS * VOCAB // tp
