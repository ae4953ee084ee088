"""Heads-only MTP training on a frozen HF backbone, and self-distillation targets."""

import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: F401  (make setup installs the [hf] extra; fail loudly without it)
from tests.helpers.batches import DOC_LENGTHS, packed_batch

from multitoken import ConfigError, MTPConfig, MTPModel
from multitoken.batch import StepBatch
from multitoken.hf import HFDecoder, init_mtp_weights
from multitoken.mtp_model import step_loss
from multitoken.testing.tiny_hf import tiny_model


def build(freeze_base, depth=2, targets="data", model_type="llama"):
    decoder = HFDecoder(tiny_model(model_type))
    torch.manual_seed(1)
    mtp = MTPConfig(num_depths=depth, freeze_base=freeze_base, targets=targets)
    model = MTPModel(decoder, mtp, pad_id=0)
    init_mtp_weights(model)
    return model


def batch(depth=2, seed=0):
    ids, labels, layout = packed_batch(DOC_LENGTHS, seed=seed, vocab=97, low=2)
    return StepBatch.build(ids, labels, layout, depth)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_heads_only_backbone_gets_no_gradient_and_stays_bit_identical():
    model = build(freeze_base=True)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1)
    mtp_before = [p.clone() for p in model.mtp.parameters()]
    for step in range(3):
        step_loss(model, batch(seed=step), 0.3).loss.backward()
        for name, p in model.decoder.named_parameters():
            assert p.grad is None, name
        assert all(p.grad is not None for p in model.mtp.parameters())
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in model.decoder.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(not torch.equal(a, b) for a, b in zip(mtp_before, model.mtp.parameters()))
    # Only MTP parameters are trainable (what the optimiser and the checkpoint hold).
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("mtp.") for n in names)


def test_heads_only_gradients_equal_the_full_models_mtp_gradients():
    # Freezing changes what is trained, not the heads' gradient: an independent reference.
    frozen, full = build(freeze_base=True), build(freeze_base=False)
    full.load_state_dict(frozen.state_dict())
    b = batch()
    step_loss(frozen, b, 0.3).loss.backward()
    step_loss(full, b, 0.3).loss.backward()
    for (name, p), q in zip(frozen.mtp.named_parameters(), full.mtp.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def saved_for_backward_bytes(model, step_batch):
    """Bytes autograd keeps for the backward, plus the gradients it then writes."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(model, step_batch, 0.3).loss
    loss.backward()
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    return sum(saved) + grads


def test_heads_only_step_holds_less_memory_than_the_full_step():
    b = batch()
    heads = saved_for_backward_bytes(build(freeze_base=True), b)
    full = saved_for_backward_bytes(build(freeze_base=False), b)
    assert heads < 0.75 * full, (heads, full)


def test_freeze_base_needs_a_depth():
    with pytest.raises(ConfigError, match="freeze_base"):
        MTPConfig(num_depths=0, freeze_base=True)
    with pytest.raises(ConfigError, match="targets"):
        MTPConfig(num_depths=1, targets="teacher")


@pytest.mark.parametrize("depth", [1, 2])
def test_base_targets_are_the_backbones_greedy_tokens(depth):
    model = build(freeze_base=True, depth=depth, targets="base")
    b = batch(depth)
    out = step_loss(model, b, 0.3)
    # Reference: the HF model's own logits, document by document, and a plain cross-entropy.
    hf = model.decoder.model
    hidden = model(b.input_ids, b.layout, mtp_input_ids=b.mtp_input_ids)
    for k in range(1, depth + 1):
        losses, count = [], 0
        for row, lengths in enumerate(DOC_LENGTHS):
            start = 0
            for length in lengths:
                with torch.no_grad():
                    greedy = hf(b.input_ids[row : row + 1, start : start + length]).logits.argmax(
                        -1
                    )
                for i in range(length - k - 1):  # position i has a depth-k target
                    logits = hidden[k][row, start + i] @ model.head_weight.t()
                    losses.append(F.cross_entropy(logits, greedy[0, i + k]))
                count += max(length - k - 1, 0)
                start += length
        expected = torch.stack(losses).sum() / count
        torch.testing.assert_close(out.depth_loss[k], expected, rtol=1e-5, atol=1e-6)
    # The main loss keeps the data's labels.
    data = step_loss(build(freeze_base=True, depth=depth), b, 0.3)
    torch.testing.assert_close(out.depth_loss[0], data.depth_loss[0])
