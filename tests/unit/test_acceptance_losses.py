"""Acceptance-aware MTP losses (mtp.loss = kl / tv / lk) and mtp.detach_heads.

Each chunked loss equals its full-logits reference (value and gradient, fp32, rtol 1e-5); its
largest allocation stays within the cross-entropy's bound; packed documents equal the same
documents one by one; detach_heads leaves the backbone's gradient that of the D = 0 model.
"""

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import batches
from tests.helpers.allocation import LargestAllocation
from tests.helpers.batches import DOC_LENGTHS
from tests.helpers.models import tiny_model

from multitoken import (
    ConfigError,
    InputError,
    MTPConfig,
    StepBatch,
    linear_cross_entropy,
    next_token_labels,
)
from multitoken.distill import linear_distillation, teacher_hidden

KINDS = ["kl", "tv", "lk"]
VOCAB = 97


def reference(student, teacher, weight, targets, kind, alpha=0.5, tau=1.0):
    """The loss from full [N, V] logits, autograd for the gradient."""
    log_q = F.log_softmax(student @ weight.t() / tau, dim=-1)
    log_p = F.log_softmax(teacher.detach() @ weight.detach().t() / tau, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    tv = 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1)
    row = {"kl": kl, "tv": tv, "lk": alpha * kl + (1 - alpha) * tv}[kind]
    return row[targets != -100].sum()


def _inputs(n=37, h=16, v=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, h, generator=gen).requires_grad_()
    teacher = torch.randn(n, h, generator=gen)
    weight = (0.3 * torch.randn(v, h, generator=gen)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = -100
    return student, teacher, weight, targets


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 1 << 23])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_each_loss_equals_its_full_logits_reference(kind, chunk_elements, tau):
    student, teacher, weight, targets = _inputs()
    stats = linear_distillation(
        student, teacher, weight, targets, kind, alpha=0.3, temperature=tau,
        chunk_elements=chunk_elements,
    )  # fmt: skip
    (2.5 * stats.loss_sum).backward()
    # The reference in float64: the fp32 one is itself ~3e-7 of the gradient's scale off.
    s64, w64 = (x.detach().double().requires_grad_() for x in (student, weight))
    ref = reference(s64, teacher.double(), w64, targets, kind, alpha=0.3, tau=tau)
    (2.5 * ref).backward()
    torch.testing.assert_close(stats.loss_sum.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in ((student.grad, s64.grad), (weight.grad, w64.grad)):
        # rtol 1e-5, and an atol of 1e-6 of the largest gradient for the near-zero entries.
        atol = 1e-6 * float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=atol)
    valid = targets != -100
    assert int(stats.num_valid) == int(valid.sum())
    hits = ((student @ weight.t()).argmax(-1) == targets) & valid
    assert int(stats.num_correct) == int(hits.sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_elements", [1, 7 * 50])
def test_a_frozen_head_gets_the_student_gradient_in_the_forward(kind, chunk_elements):
    """Heads-only runs (frozen head): d loss / d student comes from the forward's chunks, no
    head matmul runs in the backward, and the values are the full-logits reference's."""
    student, teacher, weight, targets = _inputs()
    weight.requires_grad_(False)
    stats = linear_distillation(student, teacher, weight, targets, kind, alpha=0.3,
                                temperature=0.7, chunk_elements=chunk_elements)  # fmt: skip
    with torch.profiler.profile() as prof:
        (2.5 * stats.loss_sum).backward()
    assert not [e for e in prof.events() if e.name in ("aten::mm", "aten::matmul")]
    s64 = student.detach().double().requires_grad_()
    ref = reference(s64, teacher.double(), weight.double(), targets, kind, alpha=0.3, tau=0.7)
    (2.5 * ref).backward()
    torch.testing.assert_close(stats.loss_sum.double(), ref, rtol=1e-5, atol=1e-6)
    atol = 1e-6 * float(s64.grad.abs().max())
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-5, atol=atol)


def test_equal_distributions_give_zero_and_lk_interpolates():
    student, _, weight, targets = _inputs(seed=1)
    for kind in KINDS:
        same = linear_distillation(student, student.detach(), weight, targets, kind)
        assert abs(float(same.loss_sum.detach())) < 1e-5
    teacher = torch.randn_like(student)
    kl, tv = (float(linear_distillation(student, teacher, weight, targets, k).loss_sum.detach())
              for k in ("kl", "tv"))  # fmt: skip
    lk = linear_distillation(student, teacher, weight, targets, "lk", alpha=0.25).loss_sum
    assert float(lk.detach()) == pytest.approx(0.25 * kl + 0.75 * tv, rel=1e-5)


def test_no_valid_row_gives_zero_and_errors_name_the_problem():
    student, teacher, weight, _ = _inputs()
    stats = linear_distillation(student, teacher, weight, torch.full((37,), -100), "tv")
    stats.loss_sum.backward()
    assert float(stats.loss_sum.detach()) == 0 and torch.count_nonzero(student.grad) == 0
    with pytest.raises(InputError, match="kind must be one of"):
        linear_distillation(student, teacher, weight, torch.zeros(37, dtype=torch.long), "js")
    with pytest.raises(InputError, match="disagree"):
        linear_distillation(student, teacher[:5], weight, torch.zeros(37, dtype=torch.long))


@pytest.mark.parametrize("kind", ["lk"])  # lk runs both the KL and the TV code
def test_largest_allocation_with_the_teacher_is_bounded_by_the_chunk(kind):
    # Vocab 16k, 2k tokens in 2 rows: full logits would be 2048 * 16384 = 33.5M floats.
    rows, length, hidden_size, vocab, chunk = 2, 1024, 32, 16384, 1 << 20
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(rows, length, hidden_size, generator=gen)
    student = torch.randn(rows, length, hidden_size, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(vocab, hidden_size, generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab, (rows, length), generator=gen)
    targets[:, -2:] = -100
    with LargestAllocation() as mode:
        stats = linear_distillation(student, teacher_hidden(h0, 2), weight, targets, kind,
                                    chunk_elements=chunk)  # fmt: skip
        stats.loss_sum.backward()
    tokens = rows * length
    bound = max(chunk, vocab * hidden_size, tokens * hidden_size)
    assert mode.largest <= bound, (mode.largest, bound)
    assert mode.largest * 32 <= tokens * vocab


def _model(depth, loss, seed=0, **mtp):
    return tiny_model(depth, seed=seed, vocab_size=VOCAB, mtp=dict(loss=loss, **mtp))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_teacher_of_depth_k_at_i_is_the_backbone_at_i_plus_k():
    # Through the model: each depth's loss is the reference on h^0's full logits shifted by k.
    model = _model(2, "kl", teacher_temperature=0.8)
    ids, _, layout = batches.packed_batch(DOC_LENGTHS, seed=3, vocab=VOCAB)
    labels = next_token_labels(ids, layout)
    out = model.loss(ids, labels, layout)
    hidden = model(ids, layout)
    depth_labels = StepBatch.build(ids, labels, layout, 2, 0, -100).depth_labels
    for k in (1, 2):
        teacher = torch.zeros_like(hidden[0])
        teacher[:, :-k] = hidden[0][:, k:]
        ref = reference(hidden[k].reshape(-1, 32), teacher.reshape(-1, 32), model.head_weight,
                        depth_labels[k].reshape(-1), "kl", tau=0.8)  # fmt: skip
        torch.testing.assert_close(out.loss_sum[k], ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_documents_one_by_one(kind):
    model = _model(2, kind, lk_alpha=0.4)
    ids, _, layout = batches.packed_batch(DOC_LENGTHS, seed=0, vocab=VOCAB)
    out = model.loss(ids, next_token_labels(ids, layout), layout)
    out.loss.backward()
    packed = _grads(model)
    model.zero_grad()
    docs = batches.documents(ids, DOC_LENGTHS)
    per_doc = [model.loss(doc, next_token_labels(doc), normalizer=out.depth_tokens) for doc in docs]
    torch.testing.assert_close(sum(o.loss_sum for o in per_doc), out.loss_sum, rtol=1e-5, atol=1e-6)
    assert torch.equal(sum(o.depth_tokens for o in per_doc), out.depth_tokens)
    sum(o.loss for o in per_doc).backward()
    assert set(packed) == set(_grads(model)) == {n for n, _ in model.named_parameters()}
    for name, grad in _grads(model).items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_detach_heads_leaves_the_backbone_grads_of_the_d0_model(loss):
    ids, _, layout = batches.packed_batch(DOC_LENGTHS, seed=4, vocab=VOCAB)
    labels = next_token_labels(ids, layout)
    plain = _model(0, "ce")
    plain.loss(ids, labels, layout).loss.backward()
    joint = _model(2, loss, detach_heads=True)
    joint.load_state_dict(plain.state_dict(), strict=False)
    joint.loss(ids, labels, layout).loss.backward()
    got = _grads(joint)
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    depth_grads = [g for n, g in got.items() if n.startswith("mtp.")]
    assert depth_grads and all(torch.count_nonzero(g) for g in depth_grads)
    # Without the option the MTP loss does reach the backbone.
    attached = _model(2, loss)
    attached.load_state_dict(plain.state_dict(), strict=False)
    attached.loss(ids, labels, layout).loss.backward()
    name = next(n for n in _grads(plain) if n.startswith("decoder.layers.0"))
    assert not torch.allclose(_grads(attached)[name], _grads(plain)[name])


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="loss must be one of"):
        MTPConfig(loss="js")
    with pytest.raises(ConfigError, match="lk_alpha must be in"):
        MTPConfig(loss="lk", lk_alpha=1.5)
    with pytest.raises(ConfigError, match="teacher_temperature must be"):
        MTPConfig(loss="kl", teacher_temperature=0.0)
    MTPConfig(loss="kl").check_layout(tp=1, cp=2)  # tests/distributed/test_cp_distill.py
    MTPConfig(loss="tv").check_layout(tp=2, cp=1)  # tests/distributed/test_tp_distill.py
    MTPConfig(loss="ce").check_layout(tp=2, cp=2)


def test_the_library_refuses_another_head_loss():
    # A parallelize_* that returns its own cross-entropy without a distillation (the
    # vocabulary-parallel one has VocabParallelCrossEntropy.distillation).
    def sharded(*args):
        return linear_cross_entropy(*args)

    model = _model(1, "tv")
    ids, _, layout = batches.packed_batch(DOC_LENGTHS, seed=0, vocab=VOCAB)
    with pytest.raises(InputError, match="a head loss that offers it"):
        model.loss(ids, next_token_labels(ids, layout), layout, cross_entropy=sharded)


def test_a_tiny_run_trains_with_each_loss(tmp_path):
    # Under CP and TP: tests/integration/test_distill_layouts.py.
    from tests.helpers.cli import train_cli

    for loss in KINDS:
        code, out, err = train_cli(tmp_path, f"mtp.loss={loss}", "mtp.detach_heads=true",
                                   "train.steps=2", "train.eval_every=0", "train.save_every=0",
                                   f"run.name={loss}")  # fmt: skip
        assert code == 0, err
        assert "final: train" in out
        assert len((tmp_path / loss / "metrics.jsonl").read_text().splitlines()) >= 2
