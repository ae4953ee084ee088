"""The acceptance-aware losses (mtp.loss = kl|tv|lk) through a vocabulary-parallel head equal
the full-logits reference (alone) and one process (a whole TP model step), value and
gradients at rtol 1e-5, with every collective on the TP group."""

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.distributed import (
    PACKED_ROWS,
    PAD,
    groups,
    make_batch,
    make_tp_model,
    reference_step,
    step_record,
)

from multitoken import StepBatch
from multitoken.distill import acceptance_sums
from multitoken.models.parallelize import apply_tp
from multitoken.mtp_model import step_loss
from multitoken.parallel.vocab_distill import (
    vocab_parallel_acceptance,
    vocab_parallel_distillation,
)
from multitoken.testing.comms import count_comms

RTOL, ATOL = 1e-5, 1e-6
TOKENS, HIDDEN, VOCAB, TAU, ALPHA = 29, 8, 96, 1.5, 0.3
KINDS = ["kl", "tv", "lk"]


def make_case(seed: int = 0):
    """``(student, teacher, weight, targets)``; the second half of the vocabulary repeats the
    first, so every row's maximum is tied across two shards (top-1 = the first maximum)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(TOKENS, HIDDEN, generator=gen)
    teacher = student + 0.5 * torch.randn(TOKENS, HIDDEN, generator=gen)  # a near teacher
    half = torch.randn(VOCAB // 2, HIDDEN, generator=gen)
    weight = torch.cat([half, half])
    first = (student @ weight.t()).argmax(-1)
    targets = torch.where(torch.arange(TOKENS) % 2 == 0, first, first + VOCAB // 2)
    targets[::4] = -100
    return student, teacher, weight, targets


def reference(student, teacher, weight, targets, kind):
    log_q = F.log_softmax(student @ weight.t() / TAU, dim=-1)
    log_p = F.log_softmax(teacher @ weight.detach().t() / TAU, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    tv = 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1)
    row = {"kl": kl, "tv": tv, "lk": ALPHA * kl + (1 - ALPHA) * tv}[kind]
    valid = targets != -100
    correct = ((log_q.argmax(-1) == targets) & valid).sum()
    return row[valid].sum(), correct


def run_loss(kind: str, chunk_elements: int) -> dict:
    g = groups(1, 1, torch.distributed.get_world_size())
    student, teacher, weight, targets = make_case()
    student.requires_grad_()
    shard = weight.chunk(g.tp)[g.tp_rank].clone().requires_grad_()
    with count_comms() as log:
        stats = vocab_parallel_distillation(
            student, teacher, shard, targets, kind, g.tp_group, alpha=ALPHA, temperature=TAU,
            chunk_elements=chunk_elements,
        )  # fmt: skip
        (0.7 * stats.loss_sum).backward()
    return dict(
        loss=stats.loss_sum.detach(), correct=stats.num_correct, grad_student=student.grad,
        grad_shard=shard.grad, groups=[r.group is g.tp_group for r in log.records],
        names=[r.name for r in log.records],
    )  # fmt: skip


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_vocab_parallel_distillation_equals_full_logits(rank_pool, tp, kind):
    student, teacher, weight, targets = make_case()
    student.requires_grad_()
    weight.requires_grad_()
    ref, ref_correct = reference(student, teacher, weight, targets, kind)
    (0.7 * ref).backward()
    assert 0 < int(ref_correct) < int((targets != -100).sum())  # ties: the first maximum
    chunk_elements = 4 * VOCAB // tp  # 4 rows per chunk: several chunks, a short last one
    chunks = -(-TOKENS // 4)
    for rank, r in enumerate(rank_pool(tp).run(run_loss, kind, chunk_elements)):
        torch.testing.assert_close(r["loss"], ref.detach(), rtol=RTOL, atol=ATOL)
        assert int(r["correct"]) == int(ref_correct)
        torch.testing.assert_close(r["grad_student"], student.grad, rtol=RTOL, atol=ATOL)
        rows = weight.grad.chunk(tp)[rank]
        torch.testing.assert_close(r["grad_shard"], rows, rtol=RTOL, atol=ATOL)
        # Forward: one all-gather per chunk, one all-reduce of the loss; backward: TV's
        # <s, q> per chunk, then the hidden gradient. All on the TP group.
        per_chunk = 1 if kind in ("tv", "lk") else 0
        expected = ["all_gather_single"] * chunks + ["all_reduce"] * (1 + per_chunk * chunks + 1)
        assert sorted(r["names"]) == sorted(expected), r["names"]
        assert all(r["groups"])


def run_acceptance(chunk_elements: int) -> dict:
    g = groups(1, 1, torch.distributed.get_world_size())
    student, teacher, weight, targets = make_case()
    shard = weight.chunk(g.tp)[g.tp_rank]
    with count_comms() as log:
        agree, accept = vocab_parallel_acceptance(
            student, teacher, shard, targets != -100, g.tp_group, chunk_elements
        )
    return dict(agree=agree, accept=accept, groups=[r.group is g.tp_group for r in log.records])


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_acceptance_equals_one_rank(rank_pool, tp):
    """Greedy agreement (the first maximum, tied across shards here) and sum_v min(p, q)."""
    student, teacher, weight, targets = make_case()
    agree, accept = acceptance_sums(student, teacher, weight, targets != -100)
    assert 0 < int(agree) < int((targets != -100).sum())
    for r in rank_pool(tp).run(run_acceptance, 4 * VOCAB // tp):
        assert torch.equal(r["agree"], agree)
        torch.testing.assert_close(r["accept"], accept, rtol=RTOL, atol=ATOL)
        assert r["groups"] and all(r["groups"])


def run_tp_step(kind: str, depth: int) -> dict:
    g = groups(1, 1, torch.distributed.get_world_size())
    model = make_tp_model(depth, mtp=dict(loss=kind, lk_alpha=ALPHA, teacher_temperature=TAU))
    cross_entropy = apply_tp(model, g.tp_mesh, sequence_parallel=True)
    ids, labels, layout = make_batch(True, rows=PACKED_ROWS)
    batch = StepBatch.build(ids, labels, layout, depth, PAD)
    out = step_loss(
        model, batch, model.config.loss_weight, cross_entropy=cross_entropy, acceptance=True
    )
    out.loss.backward()
    return {**step_record(model, out), "agree": out.agree, "accept": out.accept}


def one_process_acceptance(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels, layout = make_batch(True, rows=PACKED_ROWS)
    batch = StepBatch.build(ids, labels, layout, model.num_depths, PAD)
    with torch.no_grad():
        out = step_loss(model, batch, model.config.loss_weight, acceptance=True)
    return out.agree, out.accept


@pytest.mark.parametrize("kind", KINDS)
def test_a_tp2_step_with_each_loss_equals_one_process(pool2, kind):
    depth = 2
    model = make_tp_model(depth, mtp=dict(loss=kind, lk_alpha=ALPHA, teacher_temperature=TAU))
    agree, accept = one_process_acceptance(model)
    ref = reference_step(model, *make_batch(True, rows=PACKED_ROWS))
    for r in pool2.run(run_tp_step, kind, depth):
        # The logged acceptance metrics too, through the vocabulary-parallel head.
        assert torch.equal(r["agree"], agree)
        torch.testing.assert_close(r["accept"], accept, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["depth_loss"], ref["depth_loss"], rtol=RTOL, atol=ATOL)
        assert torch.equal(r["depth_tokens"], ref["depth_tokens"])
        assert r["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=name)
