"""The HF adapter: packing exactness per architecture, D = 0 against transformers' own loss,
the mask traps of docs/design.md#weight-formats, and refusals."""

from dataclasses import replace

import pytest
import torch
import transformers  # noqa: F401  (make setup installs the [hf] extra; fail loudly without it)
from tests.helpers import batches
from tests.helpers.batches import DOC_LENGTHS, documents

from multitoken import ConfigError, MTPConfig, MTPModel, SequenceLayout, next_token_labels
from multitoken.hf import SUPPORTED_MODEL_TYPES, HFDecoder, init_mtp_weights
from multitoken.hf.weights import read_tensors
from multitoken.testing.tiny_hf import ARCHITECTURES, save_tiny, tiny_model


def hf_mtp_model(model_type, depth, implementation="sdpa", seed=0):
    decoder = HFDecoder(tiny_model(model_type, seed), implementation)
    torch.manual_seed(seed + 1)
    model = MTPModel(decoder, MTPConfig(num_depths=depth, loss_weight=0.3), pad_id=0)
    init_mtp_weights(model)
    return model


def packed_batch(seed=0):
    """Two rows of 24 tokens (``DOC_LENGTHS``) over the tiny HF vocabulary: ``(ids, layout)``."""
    ids, _, layout = batches.packed_batch(DOC_LENGTHS, seed=seed, vocab=97, low=2)
    return ids, layout


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tested_architectures_are_the_supported_ones():
    assert set(ARCHITECTURES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_packed_equals_documents_one_by_one(model_type, depth):
    model = hf_mtp_model(model_type, depth)
    ids, layout = packed_batch()
    out = model.loss(ids, next_token_labels(ids, layout), layout)
    out.loss.backward()
    packed = grads(model)
    model.zero_grad()

    per_doc = [model.loss(doc, next_token_labels(doc)) for doc in documents(ids)]
    tokens = torch.stack([o.depth_tokens for o in per_doc])  # (docs, D + 1)
    assert torch.equal(tokens.sum(0), out.depth_tokens)
    combined = (torch.stack([o.depth_loss for o in per_doc]) * tokens).sum(0) / tokens.sum(0)
    torch.testing.assert_close(out.depth_loss, combined, rtol=1e-5, atol=1e-6)
    total = combined[0] + 0.3 / depth * combined[1:].sum()
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)

    for doc in documents(ids):
        model.loss(doc, next_token_labels(doc), normalizer=out.depth_tokens).loss.backward()
    one_by_one = grads(model)
    assert set(packed) == {n for n, p in model.named_parameters()} == set(one_by_one)
    for name, grad in one_by_one.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_depth_zero_equals_the_hf_models_own_loss(model_type, implementation):
    reference = tiny_model(model_type, attn_implementation=implementation)
    model = hf_mtp_model(model_type, 0, implementation)
    ids = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    expected = reference(input_ids=ids, labels=ids)
    ours = model.loss(ids, next_token_labels(ids))
    torch.testing.assert_close(ours.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.logits(ids), expected.logits, rtol=1e-5, atol=1e-5)


def test_sliding_window_bites_and_is_honoured():
    # Mistral's window of 6 is shorter than the 24-token rows: without it the logits differ.
    windowed, full = tiny_model("mistral"), tiny_model("mistral", sliding_window=None)
    ids = torch.randint(2, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not torch.allclose(windowed(ids).logits, full(ids).logits, atol=1e-4)
        ours = MTPModel(HFDecoder(tiny_model("mistral")), MTPConfig(num_depths=0)).logits(ids)
        torch.testing.assert_close(ours, windowed(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the traps of section 9
def hf_packed_logits(model, ids, positions, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, **kwargs).logits


def test_trap_2d_mask_and_use_cache_turn_hf_packing_off_but_not_ours():
    reference = tiny_model("llama")
    ids, layout = packed_batch()
    ids, positions = ids[:1], layout.positions[:1]
    row_layout = SequenceLayout(layout.doc_ids[:1], positions, layout.seq_index[:1])
    ours = MTPModel(HFDecoder(tiny_model("llama")), MTPConfig(num_depths=0))
    with torch.no_grad():
        exact = ours.logits(ids, row_layout)
    # transformers detects packing from restarting position_ids alone (no mask, no cache) ...
    detected = hf_packed_logits(reference, ids, positions, use_cache=False)
    torch.testing.assert_close(detected, exact, rtol=1e-5, atol=1e-5)
    # ... and silently stops as soon as a 2D mask or a cache comes along (use_cache defaults
    # to the config's True): documents leak into each other.
    ones = torch.ones_like(ids)
    for kwargs in ({"attention_mask": ones, "use_cache": False}, {"use_cache": True}, {}):
        leaky = hf_packed_logits(reference, ids, positions, **kwargs)
        assert not torch.allclose(leaky, exact, atol=1e-4), kwargs


def test_trap_rolled_positions_break_packing_detection():
    # Rolling position ids (as an MTP shift of ids and labels might) makes them no longer
    # restart at 0 where documents start: transformers then sees other documents.
    reference = tiny_model("llama")
    ids, layout = packed_batch()
    ids, positions = ids[:1], layout.positions[:1]
    rolled = hf_packed_logits(reference, ids.roll(-1, 1), positions.roll(-1, 1), use_cache=False)
    unrolled = hf_packed_logits(reference, ids.roll(-1, 1), positions, use_cache=False)
    assert not torch.allclose(rolled, unrolled, atol=1e-4)


def test_trap_flattening_separator_protects_shift_one_only():
    # DataCollatorWithFlattening puts -100 at each document's first label; at depth k >= 1
    # the shifted labels reach into the next document. multitoken's targets never do.
    from transformers import DataCollatorWithFlattening

    features = [{"input_ids": [11, 12, 13, 14]}, {"input_ids": [21, 22, 23]}]
    flat = DataCollatorWithFlattening(return_tensors="pt")(features)
    labels = flat["labels"][0].tolist()  # unshifted, -100 at each document's first token
    assert labels == [-100, 12, 13, 14, -100, 22, 23]
    # Position i's depth-k target is labels[i + k + 1]: at depth 0 the first document's last
    # token (i = 3) meets the separator, at depth 1 it reaches the second document's 22.
    assert [labels[i + 1] for i in range(4)] == [12, 13, 14, -100]
    assert [labels[i + 2] for i in range(4)] == [13, 14, -100, 22]
    ids = flat["input_ids"]
    layout = SequenceLayout.from_lengths([[4, 3]])
    from multitoken.batch import StepBatch

    batch = StepBatch.build(ids, next_token_labels(ids, layout), layout, num_depths=2)
    first_doc = batch.depth_labels[:, 0, :4]
    assert not (first_doc >= 20).any()


# ---------------------------------------------------------------- refusals
def test_unsupported_architecture_is_refused_with_the_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match="gpt2.*supported model types are llama, mistral"):
        HFDecoder.from_pretrained(tmp_path)


def test_a_folder_that_is_no_hf_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        HFDecoder.from_pretrained(tmp_path)


def test_flash_attention_is_refused():
    with pytest.raises(ConfigError, match="cannot take a document mask"):
        HFDecoder(tiny_model("llama"), "flash_attention_2")


def test_from_pretrained_round_trip(tmp_path):
    folder = save_tiny("qwen3", tmp_path / "q")
    decoder = HFDecoder.from_pretrained(folder)
    ids = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        expected = tiny_model("qwen3")(ids).logits
        ours = MTPModel(decoder, MTPConfig(num_depths=0)).logits(ids)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_wrapped_model_still_runs_as_a_plain_transformers_model():
    decoder = HFDecoder(tiny_model("qwen2"))
    ids = torch.randint(2, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            decoder.model(ids).logits, tiny_model("qwen2")(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_trap_num_items_in_batch_gradient_accumulation_is_exact():
    # The HF Trainer passes num_items_in_batch to a forward taking **kwargs and then skips its
    # own division by the accumulation steps. multitoken's forward takes no **kwargs (the
    # Trainer cannot take that path) and the step divides by the global per-depth counts, so
    # micro-batches accumulate to exactly the whole batch's loss and gradients.
    import inspect

    params = inspect.signature(MTPModel.forward).parameters.values()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    from multitoken.batch import StepBatch
    from multitoken.mtp_model import step_loss

    model = hf_mtp_model("qwen3", 2)
    ids, layout = packed_batch()
    whole = StepBatch.build(ids, next_token_labels(ids, layout), layout, 2)
    out = step_loss(model, whole, 0.3)
    out.loss.backward()
    expected = grads(model)
    model.zero_grad()
    total = 0
    for row in range(2):
        sub = SequenceLayout.from_lengths([DOC_LENGTHS[row]])
        micro = StepBatch.build(
            ids[row : row + 1], next_token_labels(ids[row : row + 1], sub), sub, 2
        )
        micro = replace(micro, normalizer=whole.normalizer)
        loss = step_loss(model, micro, 0.3).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, out.loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_pickled_weight_file_is_never_loaded(tmp_path, monkeypatch):
    """A handed-over folder's pytorch_model.bin (a pickle) is never unpickled: refused when it
    is the only weight file, ignored (safetensors read) when both are there."""
    folder = save_tiny("llama", tmp_path / "both")
    other = tiny_model("llama", seed=1).state_dict()  # weights the .bin alone holds
    torch.save(other, folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a file from a model folder")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = HFDecoder.from_pretrained(folder).model.state_dict()  # model.safetensors only
    saved = read_tensors(folder)
    for name, value in loaded.items():
        key = next(k for k in (name, f"model.{name}") if k in saved)
        assert torch.equal(value, saved[key]), name
    embed = next(name for name in loaded if name.endswith("embed_tokens.weight"))
    assert not torch.equal(loaded[embed], other[f"model.{embed.removeprefix('model.')}"])
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no \\*.safetensors weights"):
        HFDecoder.from_pretrained(folder)
