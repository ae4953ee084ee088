"""Acceptance measured while training: per depth, greedy agreement with the backbone and the
expected speculative acceptance ``sum_v min(p_v, q_v)`` at temperature 1.

Both equal a full-logits reference over the valid targets of packed documents, for several
chunk sizes; a depth that copies the backbone agrees and is accepted everywhere; the measure
leaves the losses bit-identical; a tiny CLI run writes ``agree_mtp`` and ``accept_mtp`` on its
logged train steps and its val records, and ``multitoken plot`` draws them.
"""

import json

import pytest
import torch
from tests.helpers import batches
from tests.helpers.batches import DOC_LENGTHS
from tests.helpers.cli import train_cli
from tests.helpers.models import tiny_model

from multitoken import MTPConfig, StepBatch
from multitoken.distill import acceptance_sums, teacher_hidden
from multitoken.mtp import DepthLosses
from multitoken.mtp_model import measure_acceptance, step_loss
from multitoken.parallel import MetricSums
from multitoken.train.plot import plot_runs

VOCAB = 64


def reference(hidden_states, weight, depth_labels):
    """Per depth ``(agreements, acceptance sum)`` from full ``[B, T, V]`` logits, float64."""
    w = weight.detach().double()
    p_all = torch.softmax(hidden_states[0].detach().double() @ w.t(), dim=-1)  # (B, T, V)
    out = []
    for k in range(1, len(hidden_states)):
        q = torch.softmax(hidden_states[k].detach().double() @ w.t(), dim=-1)
        p = torch.zeros_like(q)
        p[:, : q.shape[1] - k] = p_all[:, k:]  # the backbone at i + k
        valid = depth_labels[k] != -100
        agree = (q.argmax(-1) == p.argmax(-1)) & valid
        accept = torch.minimum(p, q).sum(-1)[valid].sum()
        out.append((int(agree.sum()), float(accept)))
    return out


def _model_and_batch(depth=2, seed=0):
    model = tiny_model(depth, seed=seed)
    ids, labels, layout = batches.packed_batch(DOC_LENGTHS, seed=seed, vocab=VOCAB)
    batch = StepBatch.build(ids, labels, layout, depth, model.pad_id)
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.layout, mtp_input_ids=batch.mtp_input_ids)
    return model, batch, hidden


@pytest.mark.parametrize("chunk_elements", [1, 5 * VOCAB, 1 << 23])
def test_both_equal_the_full_logits_reference_on_packed_documents(chunk_elements):
    model, batch, hidden = _model_and_batch()
    agree, accept = measure_acceptance(
        hidden, model.head_weight, batch.depth_labels, chunk_elements=chunk_elements
    )
    want = reference(hidden, model.head_weight, batch.depth_labels)
    assert agree.tolist() == [a for a, _ in want]
    torch.testing.assert_close(
        accept, torch.tensor([s for _, s in want], dtype=torch.float64), rtol=1e-6, atol=1e-6
    )
    # The document bound matters: a row's end and every document's end leave rows out.
    valid = (batch.depth_labels[1:] != -100).sum((1, 2))
    assert (valid < batch.input_ids.numel()).all() and (valid > 0).all()


def test_the_document_bound_is_the_valid_mask():
    """Rows past a document's end count nothing, whatever their hidden states."""
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 24, 8, generator=gen), torch.randn(2, 24, 8, generator=gen)
    weight = torch.randn(VOCAB, 8, generator=gen)
    valid = torch.rand(2, 24, generator=gen) < 0.5
    agree, accept = acceptance_sums(student, teacher, weight, valid, chunk_elements=3 * VOCAB)
    p = torch.softmax(teacher.double() @ weight.double().t(), -1)[valid]
    q = torch.softmax(student.double() @ weight.double().t(), -1)[valid]
    assert int(agree) == int((p.argmax(-1) == q.argmax(-1)).sum())
    assert float(accept) == pytest.approx(float(torch.minimum(p, q).sum()), rel=1e-6)
    none = acceptance_sums(student, teacher, weight, torch.zeros_like(valid))
    assert int(none[0]) == 0 and float(none[1]) == 0.0


@pytest.mark.parametrize("chunk_elements", [1, 1 << 23])
def test_a_depth_that_copies_the_backbone_agrees_and_is_accepted(chunk_elements):
    model, batch, hidden = _model_and_batch()
    h0 = hidden[0]
    copies = [h0, *(teacher_hidden(h0, k) for k in range(1, len(hidden)))]
    agree, accept = measure_acceptance(
        copies, model.head_weight, batch.depth_labels, chunk_elements=chunk_elements
    )
    valid = (batch.depth_labels[1:] != -100).sum((1, 2))
    assert agree.tolist() == valid.tolist()
    torch.testing.assert_close(accept, valid.double(), rtol=1e-6, atol=0.0)


def test_measuring_leaves_the_losses_bit_identical_and_is_reduced_sum_over_sum():
    model, batch, _ = _model_and_batch()
    plain = step_loss(model, batch, 0.3)
    measured = step_loss(model, batch, 0.3, acceptance=True)
    assert plain.agree is None and plain.accept is None
    for field in ("loss", "depth_loss", "depth_tokens", "depth_correct", "loss_sum"):
        assert torch.equal(getattr(plain, field), getattr(measured, field)), field
    sums = MetricSums(2)
    sums.add(plain)
    assert sums.reduce_all(None).agree is None  # not measured: no keys
    sums.add(plain)
    sums.add(measured)  # two steps' losses, one step's acceptance
    out = sums.reduce_all(None)
    tokens = measured.depth_tokens[1:].double()
    assert out.agree == pytest.approx((measured.agree / tokens).tolist())
    assert out.accept == pytest.approx((measured.accept / tokens).tolist())
    assert out.tokens == pytest.approx((2 * measured.depth_tokens).tolist())


def test_no_depths_measures_nothing():
    model = tiny_model(0)
    ids, labels, layout = batches.packed_batch(DOC_LENGTHS, vocab=VOCAB)
    batch = StepBatch.build(ids, labels, layout, 0, model.pad_id)
    losses = step_loss(model, batch, 0.3, acceptance=True)
    assert isinstance(losses, DepthLosses) and losses.agree is None
    assert MTPConfig(num_depths=0).num_depths == 0


def test_tiny_run_writes_the_keys_and_plots_them(tmp_path):
    code, _, err = train_cli(tmp_path, "run.name=acc", "train.log_every=2")
    assert code == 0, err
    run = tmp_path / "acc"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split", "train") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in val] == [3, 6]
    for r in train + val:
        for key in ("agree_mtp", "accept_mtp"):
            assert len(r[key]) == 2 and all(0.0 <= x <= 1.0 for x in r[key]), (r["step"], key)
    assert "agree [" in err and "accept [" in err
    paths = plot_runs([run])
    assert {p.name for p in paths} == {"loss.png", "accuracy.png", "acceptance.png"}
