"""The reference GPT with MTP: packing exactness, D = 0, recompute, bad input."""

import pytest
import torch
import torch.nn.functional as F

from multitoken import LayoutError, MTPConfig, SequenceLayout, next_token_labels
from multitoken.models import GPT, GPTConfig


def make_model(depth, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg, mtp=MTPConfig(depth=depth, loss_weight=0.3)))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


DOC_LENGTHS = [[5, 1, 9, 2, 7], [3, 13, 1, 1, 6]]  # two rows of 24 tokens


def packed_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (2, 24), generator=gen)
    flat = [0]
    for row in DOC_LENGTHS:
        for length in row:
            flat.append(flat[-1] + length)
    layout = SequenceLayout.from_cu_seqlens(torch.tensor(flat), shape=(2, 24))
    return ids, layout


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_packed_equals_documents_run_one_by_one(depth):
    model = make_model(depth)
    ids, layout = packed_batch()
    labels = next_token_labels(ids, layout)
    out = model(ids, labels=labels, layout=layout)
    out.loss.backward()
    packed_grads = grads(model)
    model.zero_grad()

    # The same documents, each alone in a batch of one row (no layout needed).
    docs = []
    for row, lengths in enumerate(DOC_LENGTHS):
        start = 0
        for length in lengths:
            docs.append(ids[row : row + 1, start : start + length])
            start += length
    per_doc = []
    for doc in docs:
        per_doc.append(model(doc, labels=next_token_labels(doc)))
    tokens = torch.stack([o.depth_tokens for o in per_doc])  # (docs, D+1)
    assert torch.equal(tokens.sum(0), out.depth_tokens)
    # Combined by token counts: sum_doc loss_doc * n_doc / sum_doc n_doc, per depth.
    combined = (torch.stack([o.depth_loss for o in per_doc]) * tokens).sum(0) / tokens.sum(0)
    torch.testing.assert_close(out.depth_loss, combined, rtol=1e-5, atol=1e-6)
    total = combined[0] + (0.3 / depth * combined[1:].sum() if depth else 0)
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    correct = torch.stack([o.depth_correct for o in per_doc]).sum(0)
    assert torch.equal(correct, out.depth_correct)

    # Gradients: each document normalised by the batch's counts, then summed.
    for doc in docs:
        model(doc, labels=next_token_labels(doc), loss_normalizer=out.depth_tokens).loss.backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert set(packed_grads) == {n for n, _ in model.named_parameters()}


def test_depth_zero_is_the_plain_next_token_model():
    model = make_model(0)
    assert model.mtp is None
    ids, layout = packed_batch(1)
    labels = next_token_labels(ids, layout)
    out = model(ids, labels=labels, layout=layout)
    assert out.depth_loss.shape == (1,)
    out.loss.backward()
    got = grads(model)
    model.zero_grad()
    # Reference: full logits and F.cross_entropy, no MTP machinery at all.
    hidden = model(ids, layout=layout).hidden_states[0]
    ref = F.cross_entropy((hidden @ model.head_weight.t()).view(-1, 97), labels.view(-1))
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_mtp_does_not_touch_the_main_path():
    ids, layout = packed_batch(2)
    labels = next_token_labels(ids, layout)
    plain, with_mtp = make_model(0), make_model(2)
    missing = with_mtp.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("mtp.") for k in missing)
    a = plain(ids, labels=labels, layout=layout)
    b = with_mtp(ids, labels=labels, layout=layout)
    torch.testing.assert_close(a.depth_loss[0], b.depth_loss[0], rtol=1e-6, atol=1e-6)


def test_recompute_gives_identical_loss_and_gradients():
    ids, layout = packed_batch(3)
    labels = next_token_labels(ids, layout)
    results = []
    for recompute in (False, True):
        model = make_model(2)
        model.config.mtp.recompute = recompute
        out = model(ids, labels=labels, layout=layout)
        out.loss.backward()
        results.append((out.depth_loss.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-6, atol=1e-7, msg=name)


def test_causal_mode_attends_across_documents():
    ids, layout = packed_batch(4)
    labels = next_token_labels(ids, layout)
    doc = make_model(1, attention="document")(ids, labels=labels, layout=layout)
    causal = make_model(1, attention="causal")(ids, labels=labels, layout=layout)
    # Same weights, same targets; only the first document of each row is seen identically.
    assert torch.equal(doc.depth_tokens, causal.depth_tokens)
    assert not torch.allclose(doc.depth_loss, causal.depth_loss)
    row_docs = make_model(1, attention="causal")(ids, labels=next_token_labels(ids))
    same = make_model(1, attention="document")(ids, labels=next_token_labels(ids))
    torch.testing.assert_close(row_docs.depth_loss, same.depth_loss, rtol=1e-6, atol=1e-6)


def test_untied_head_and_no_valid_target():
    model = make_model(2, tie_embeddings=False)
    ids = torch.randint(1, 97, (1, 6))
    out = model(ids, labels=torch.full((1, 6), -100))
    out.loss.backward()
    assert out.loss.item() == 0.0 and not torch.isnan(out.depth_loss).any()
    assert all(torch.count_nonzero(g) == 0 for g in grads(model).values())


def test_bad_input_errors():
    model = make_model(1)
    ids = torch.randint(1, 97, (2, 8))
    with pytest.raises(LayoutError, match="input id 97 is outside the vocabulary"):
        model(torch.full((2, 8), 97))
    with pytest.raises(LayoutError, match="input id -1 is outside"):
        model(torch.full((2, 8), -1))
    with pytest.raises(LayoutError, match="int32 or int64 token ids"):
        model(ids.float())
    with pytest.raises(LayoutError, match="must be a \\[B, T\\] tensor"):
        model(ids[0])
    with pytest.raises(LayoutError, match="labels has shape"):
        model(ids, labels=ids[:, :7])
    with pytest.raises(LayoutError, match="labels must be int32 or int64"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids, labels=torch.full((2, 8), 500))
    with pytest.raises(LayoutError, match="max_seq_len is 64"):
        model(torch.randint(1, 97, (1, 65)))
    with pytest.raises(ValueError, match="attention must be one of"):
        make_model(1, attention="sliding")
    with pytest.raises(ValueError, match="need n_layers >= 1"):
        make_model(1, n_layers=0)
    with pytest.raises(ValueError, match="mtp depth must be an int >= 0"):
        MTPConfig(depth=-1)


@pytest.mark.parametrize("depth", [0, 2])
def test_padding_tokens_never_carry_a_target(depth):
    # A -1 token with a (wrong) real label must not count, at D = 0 as at D > 0.
    layout = SequenceLayout.from_doc_ids(torch.tensor([[0, 0, 0, -1, -1, 1, 1, 1]]))
    ids = torch.randint(1, 97, (1, 8))
    labels = next_token_labels(ids, layout)
    labels[0, 3] = 5
    out = make_model(depth)(ids, labels=labels, layout=layout)
    assert int(out.depth_tokens[0]) == 4


def test_bf16_autocast_training_step_runs_and_matches_fp32():
    # train.bf16 runs the forward under bf16 autocast with fp32 weights: the MTP depths'
    # hidden states come out bf16 while the shared head stays fp32, and the backward (which
    # runs outside autocast) must cope. CPU autocast exercises the same code as CUDA's.
    ids, layout = packed_batch()
    labels = next_token_labels(ids, layout)
    ref = make_model(2)(ids, labels=labels, layout=layout)
    model = make_model(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels, layout=layout)
    assert any(h.dtype == torch.bfloat16 for h in out.hidden_states)
    out.loss.backward()
    got = grads(model)
    assert len(got) == len(list(model.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got.values())
    torch.testing.assert_close(out.depth_loss, ref.depth_loss.detach(), rtol=2e-2, atol=2e-2)
