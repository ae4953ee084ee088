"""The reference GPT with MTP: packing exactness, D = 0, recompute, bad input."""

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import batches
from tests.helpers.batches import DOC_LENGTHS
from tests.helpers.models import tiny_model

from multitoken import (
    ConfigError,
    Decoder,
    InputError,
    LayoutError,
    MTPConfig,
    MTPModel,
    SequenceLayout,
    StepBatch,
    next_token_labels,
)
from multitoken.models import GPT, GPTConfig

VOCAB = 97


def make_model(depth, seed=0, recompute=False, recompute_main=False, **overrides):
    mtp = dict(recompute=recompute)
    return tiny_model(depth, seed=seed, vocab_size=VOCAB, recompute=recompute_main, mtp=mtp,
                      **overrides)  # fmt: skip


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_batch(seed=0):
    """Two rows of 24 tokens (``DOC_LENGTHS``): ``(ids, layout)``."""
    ids, _, layout = batches.packed_batch(DOC_LENGTHS, seed=seed, vocab=VOCAB)
    return ids, layout


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_packed_equals_documents_run_one_by_one(depth):
    model = make_model(depth)
    ids, layout = packed_batch()
    labels = next_token_labels(ids, layout)
    out = model.loss(ids, labels, layout)
    out.loss.backward()
    packed_grads = grads(model)
    model.zero_grad()

    # The same documents, each alone in a batch of one row (no layout needed).
    docs = batches.documents(ids, DOC_LENGTHS)
    per_doc = []
    for doc in docs:
        per_doc.append(model.loss(doc, next_token_labels(doc)))
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
        model.loss(doc, next_token_labels(doc), normalizer=out.depth_tokens).loss.backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert set(packed_grads) == {n for n, _ in model.named_parameters()}


def test_depth_zero_is_the_plain_next_token_model():
    model = make_model(0)
    assert model.mtp is None
    ids, layout = packed_batch(1)
    labels = next_token_labels(ids, layout)
    out = model.loss(ids, labels, layout)
    assert out.depth_loss.shape == (1,)
    out.loss.backward()
    got = grads(model)
    model.zero_grad()
    # Reference: full logits and F.cross_entropy, no MTP machinery at all.
    ref = F.cross_entropy(model.logits(ids, layout).view(-1, 97), labels.view(-1))
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
    a = plain.loss(ids, labels, layout)
    b = with_mtp.loss(ids, labels, layout)
    torch.testing.assert_close(a.depth_loss[0], b.depth_loss[0], rtol=1e-6, atol=1e-6)


def test_recompute_gives_identical_loss_and_gradients():
    ids, layout = packed_batch(3)
    labels = next_token_labels(ids, layout)
    results = []
    for recompute in (False, True):
        model = make_model(2, recompute=recompute, recompute_main=recompute)
        out = model.loss(ids, labels, layout)
        out.loss.backward()
        results.append((out.depth_loss.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-6, atol=1e-7, msg=name)


def test_causal_mode_attends_across_documents():
    ids, layout = packed_batch(4)
    labels = next_token_labels(ids, layout)
    doc = make_model(1, attention="document").loss(ids, labels, layout)
    causal = make_model(1, attention="causal").loss(ids, labels, layout)
    # Same weights, same targets; only the first document of each row is seen identically.
    assert torch.equal(doc.depth_tokens, causal.depth_tokens)
    assert not torch.allclose(doc.depth_loss, causal.depth_loss)
    row_docs = make_model(1, attention="causal").loss(ids, next_token_labels(ids))
    same = make_model(1, attention="document").loss(ids, next_token_labels(ids))
    torch.testing.assert_close(row_docs.depth_loss, same.depth_loss, rtol=1e-6, atol=1e-6)


def test_untied_head_and_no_valid_target():
    model = make_model(2, tie_embeddings=False)
    ids = torch.randint(1, 97, (1, 6))
    out = model.loss(ids, torch.full((1, 6), -100))
    out.loss.backward()
    assert out.loss.item() == 0.0 and not torch.isnan(out.depth_loss).any()
    assert all(torch.count_nonzero(g) == 0 for g in grads(model).values())


def test_bad_input_errors():
    model = make_model(1)
    ids = torch.randint(1, 97, (2, 8))
    with pytest.raises(InputError, match="input id 97 is outside \\[0, 97\\)"):
        model(torch.full((2, 8), 97))
    with pytest.raises(InputError, match="input id -1 is outside"):
        model(torch.full((2, 8), -1))
    with pytest.raises(InputError, match="input_ids must be int32 or int64"):
        model(ids.float())
    with pytest.raises(InputError, match="must be a \\[B, T\\] tensor"):
        model(ids[0])
    with pytest.raises(InputError, match="labels .* and input_ids .* differ in shape"):
        model.loss(ids, ids[:, :7])
    with pytest.raises(InputError, match="labels must be int32 or int64"):
        model.loss(ids, ids.float())
    with pytest.raises(InputError, match="target id 500 is outside"):
        model.loss(ids, torch.full((2, 8), 500))
    with pytest.raises(InputError, match="a document position 64 is outside \\[0, 64\\)"):
        model(torch.randint(1, 97, (1, 65)))
    with pytest.raises(LayoutError, match="the layout is \\[2, 8\\]"):
        model(ids[:1], SequenceLayout.rows(2, 8))
    with pytest.raises(InputError, match="kv_layout given\\) needs mtp_input_ids"):
        model(ids, kv_layout=SequenceLayout.rows(2, 8))
    with pytest.raises(ConfigError, match="attention must be one of"):
        make_model(1, attention="sliding")
    with pytest.raises(ConfigError, match="n_layers must be >= 1"):
        make_model(1, n_layers=0)
    with pytest.raises(ConfigError, match="vocab_size must be set"):
        GPT(GPTConfig())
    with pytest.raises(InputError, match="does not implement multitoken.decoder.Decoder"):
        MTPModel(torch.nn.Linear(2, 2), MTPConfig(num_depths=1))


def test_value_checks_can_be_turned_off():
    # validation(False) drops the host syncs of the value checks (ids in the vocabulary):
    # shape and dtype checks stay.
    from multitoken import validation

    model = make_model(1)
    with validation(False):
        model(torch.randint(1, 97, (2, 8)))  # still runs
        with pytest.raises(InputError, match="must be a \\[B, T\\] tensor"):
            model(torch.randint(1, 97, (8,)))
        with pytest.raises(IndexError):  # no friendly message: the embedding's own error
            model(torch.full((2, 8), 97))
    with pytest.raises(InputError, match="input id 97"):
        model(torch.full((2, 8), 97))


def test_the_reference_gpt_implements_the_decoder_interface():
    gpt = GPT(GPTConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64))
    assert isinstance(gpt, Decoder)
    ids, layout = packed_batch(5)
    kwargs = gpt.layer_kwargs(layout)
    h0 = gpt.hidden(ids, kwargs)
    torch.testing.assert_close(h0, gpt(ids, layout))
    layer = gpt.make_mtp_layer(1)
    assert type(layer) is type(gpt.layers[0]) and layer(h0, **kwargs).shape == h0.shape
    assert gpt.head_weight.shape == (97, 32) and gpt.embed(ids).shape == (2, 24, 32)


@pytest.mark.parametrize("depth", [0, 2])
def test_padding_tokens_never_carry_a_target(depth):
    # A -1 token with a (wrong) real label must not count, at D = 0 as at D > 0.
    layout = SequenceLayout.from_doc_ids(torch.tensor([[0, 0, 0, -1, -1, 1, 1, 1]]))
    ids = torch.randint(1, 97, (1, 8))
    labels = next_token_labels(ids, layout)
    labels[0, 3] = 5
    out = make_model(depth).loss(ids, labels, layout)
    assert int(out.depth_tokens[0]) == 4


def test_bf16_autocast_training_step_runs_and_matches_fp32():
    # train.bf16 runs the forward under bf16 autocast with fp32 weights: the MTP depths'
    # hidden states come out bf16 while the shared head stays fp32, and the backward (which
    # runs outside autocast) must cope. CPU autocast exercises the same code as CUDA's.
    ids, layout = packed_batch()
    labels = next_token_labels(ids, layout)
    ref = make_model(2).loss(ids, labels, layout)
    model = make_model(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert any(h.dtype == torch.bfloat16 for h in model(ids, layout))
        out = model.loss(ids, labels, layout)
    out.loss.backward()
    got = grads(model)
    assert len(got) == len(list(model.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got.values())
    torch.testing.assert_close(out.depth_loss, ref.depth_loss.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_dropping_padding_rows_keeps_the_logits_of_the_real_tokens(tie):
    model = tiny_model(
        1, vocab_size=12, dim=16, n_layers=1, n_heads=2, max_seq_len=1024, tie_embeddings=tie
    )
    ids = torch.randint(0, 10, (1, 6))
    before = [h @ model.head_weight.t() for h in model(ids)]  # the main head and every depth
    model.decoder.drop_padding_rows(10)
    after = [h @ model.head_weight.t() for h in model(ids)]
    assert model.decoder.vocab_size == model.decoder.config.vocab_size == 10
    for full, kept in zip(before, after):
        assert kept.shape[-1] == 10
        torch.testing.assert_close(kept, full[..., :10])


def test_base_targets_in_chunks_are_the_greedy_tokens():
    """mtp.targets=base walks the tokens in loss-sized chunks (never a row's [T, V] logits):
    any chunk size gives every token's argmax, shifted per depth inside the documents."""
    from multitoken.mtp_model import base_targets

    torch.manual_seed(0)
    h0, weight = torch.randn(2, 7, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (3, 2, 7))
    labels[1, :, 5:] = labels[2, :, 4:] = -100
    greedy = (h0 @ weight.t()).argmax(-1)
    for chunk_elements in (11, 33, 10_000):  # 1 token, 3 tokens, everything at once
        out = base_targets(h0, weight, labels, -100, chunk_elements)
        assert torch.equal(out[0], labels[0])
        for k in (1, 2):
            want = torch.where(labels[k] != -100, torch.roll(greedy, -k, 1), labels[k])
            assert torch.equal(out[k], want), (chunk_elements, k)


def test_mtp_config_depth_is_a_deprecated_alias_of_num_depths():
    with pytest.warns(DeprecationWarning, match="use num_depths="):
        config = MTPConfig(depth=3)
    assert config.num_depths == 3 and config == MTPConfig(num_depths=3)
    with pytest.warns(DeprecationWarning, match="MTPConfig.depth is deprecated"):
        assert config.depth == 3
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="num_depths must"):
        MTPConfig(depth=-1)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="pass one"):
        MTPConfig(num_depths=1, depth=1)
    model = make_model(2)
    with pytest.warns(DeprecationWarning, match="MTPModel.depth is deprecated"):
        assert model.depth == model.num_depths == 2
    ids = torch.randint(1, 97, (1, 8))
    with pytest.warns(DeprecationWarning, match=r"build\(depth=...\) is deprecated"):
        batch = StepBatch.build(ids, next_token_labels(ids), None, depth=2)
    with pytest.warns(DeprecationWarning, match="StepBatch.depth is deprecated"):
        assert batch.depth == batch.num_depths == 2
