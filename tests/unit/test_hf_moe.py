"""DeepSeek-V3 (MLA + MoE), GLM-4.5, Qwen3-MoE, Qwen3-Next and Qwen3.5 (linear attention) on the
adapter: initialised depths, decoding through MLA's latent cache, heads-only training with routers
(what the routing bias and the auxiliary loss do), linear attention restarted at documents, and
the DeepSeek/GLM, Qwen3-Next and Qwen3.5 release layouts in and out bit-exact.

Packing exactness and D = 0 against transformers' own loss run for these types in
test_hf_adapter.py (parametrised over every supported type), context parallelism in
tests/distributed/test_hf_cp.py.
"""

import functools
import json

import pytest
import torch
import transformers  # noqa: F401  (make setup installs the [hf] extra; fail loudly without it)
from tests.helpers.batches import DOC_LENGTHS, packed_batch
from tests.helpers.released import (
    HEAD_NAMES,
    released_tensors,
    save_released,
    save_released_qwen3_next,
)

from multitoken import ConfigError, MTPConfig, MTPModel
from multitoken.batch import StepBatch
from multitoken.decoding.generate import generate
from multitoken.errors import CheckpointError
from multitoken.hf import HFDecoder, init_mtp_weights
from multitoken.hf.linear_attention import LINEAR_ATTENTION_TYPES, is_linear_attention
from multitoken.hf.parallelize import check_hf_layout
from multitoken.hf.weights import load_hf_mtp_model, mtp_tensors, read_tensors, save_pretrained
from multitoken.mtp_model import step_loss
from multitoken.testing.tiny_hf import save_tiny, tiny_model

DECODED = ["deepseek_v3", "glm4_moe", "qwen3_moe"]  # qwen3_next decodes with transformers only
MOE = [*DECODED, "qwen3_next", "qwen3_5_moe_text"]
HEADS_ONLY = [*MOE, "qwen3_5_text"]  # dense Qwen3.5: the same hybrid, a dense MLP
ROUTED = ["deepseek_v3", "glm4_moe"]  # sigmoid routing with e_score_correction_bias


def build(model_type, depth=2, freeze_base=False, seed=0):
    decoder = HFDecoder(tiny_model(model_type, seed))
    torch.manual_seed(seed + 1)
    mtp = MTPConfig(num_depths=depth, freeze_base=freeze_base)
    model = MTPModel(decoder, mtp, pad_id=0)
    init_mtp_weights(model)
    return model


def batch(depth=2, seed=0):
    ids, labels, layout = packed_batch(DOC_LENGTHS, seed=seed, vocab=97, low=2)
    return StepBatch.build(ids, labels, layout, depth)


@pytest.mark.parametrize("model_type", MOE)
def test_depth_layers_are_moe_layers_and_fully_initialised(model_type):
    # The experts' stacked matrices are torch.empty in transformers' constructors: every
    # depth matrix must be drawn (std near initializer_range), none left as memory garbage.
    model = build(model_type)
    for depth in model.mtp.depths:
        assert type(depth.layer) is type(model.decoder.layers[0])
        assert hasattr(depth.layer.mlp, "experts") and hasattr(depth.layer.mlp, "gate")
    for name, param in model.mtp.named_parameters():
        assert torch.isfinite(param).all(), name
        if param.dim() >= 2:
            assert 0.01 < float(param.detach().std()) < 0.03, name


@pytest.mark.parametrize("model_type", DECODED)
def test_speculative_equals_greedy_equals_the_hf_models_own_argmax(model_type):
    # Cached decoding (MLA caches its compressed latents) against transformers' uncached
    # forward, and speculative decoding against both.
    model = build(model_type).eval()
    prompt = [5, 9, 14, 3, 22]
    plain = generate(model, prompt, 12).tokens
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model.decoder.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert plain == ids[len(prompt) :]
    assert generate(model, prompt, 12, speculative=True).tokens == plain


@pytest.mark.parametrize("model_type", HEADS_ONLY)
def test_heads_only_moe_training_leaves_routing_biases_alone(model_type):
    model = build(model_type, freeze_base=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(3):
        out = step_loss(model, batch(seed=step), 0.3)
        # No auxiliary term: the loss is the main loss plus lambda / D times the depths'.
        expected = out.depth_loss[0] + 0.3 / 2 * out.depth_loss[1:].sum()
        torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        if name.startswith("decoder.") or name.endswith("e_score_correction_bias"):
            # The backbone, and every routing-correction bias (a buffer: no gradient, and
            # multitoken applies no bias-update rule), main layers' and depths' alike.
            assert not changed, name
        elif name.endswith(("mlp.gate.weight", "eh_proj.weight")):
            assert changed, name  # the depths' own routers train with the heads
    biases = [n for n in before if n.endswith("e_score_correction_bias")]
    assert bool(biases) == (model_type in ROUTED)


@pytest.mark.parametrize("model_type", HEADS_ONLY)
def test_heads_only_gradients_equal_full_training_gradients(model_type):
    frozen, full = build(model_type, freeze_base=True), build(model_type)
    b = batch()
    step_loss(frozen, b, 0.3).loss.backward()
    step_loss(full, b, 0.3).loss.backward()
    for (name, p), q in zip(frozen.mtp.named_parameters(), full.mtp.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_depth_routers_stay_fp32_in_a_bf16_model(tmp_path):
    # transformers keeps DeepSeek's router weight and routing bias in fp32 in a bf16 model
    # (_keep_in_fp32_modules_strict); the depths' layers do the same.
    decoder = HFDecoder.from_pretrained(save_tiny("deepseek_v3", tmp_path), dtype=torch.bfloat16)
    main, depth = decoder.layers[1], decoder.make_mtp_layer(1)
    for layer in (main, depth):
        assert layer.mlp.gate.weight.dtype == layer.mlp.gate.e_score_correction_bias.dtype
        assert layer.mlp.gate.weight.dtype == torch.float32
        assert layer.mlp.experts.gate_up_proj.dtype == layer.self_attn.o_proj.weight.dtype
        assert layer.self_attn.o_proj.weight.dtype == torch.bfloat16


def test_router_auxiliary_loss_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="output_router_logits"):
        HFDecoder(tiny_model("qwen3_moe", output_router_logits=True))


# ---------------------------------------------------------------- the release layout
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("model_type", ROUTED)
def test_release_layout_loads_as_the_models_own_layer_and_saves_back_bit_exact(
    tmp_path, model_type, depth
):
    folder = save_released(model_type, tmp_path / "released", num_layers=2, depths=depth)
    original = read_tensors(folder)
    model = load_hf_mtp_model(folder, MTPConfig(num_depths=depth))
    # The block is the model's own decoder layer class, holding layer L + k of a transformers
    # model of L + D layers (the helper saved it with transformers' own save_pretrained).
    twin = tiny_model(model_type, 0, num_hidden_layers=2 + depth)
    for k, module in enumerate(model.mtp.depths):
        assert type(module.layer) is type(model.decoder.layers[0])
        expected = twin.model.layers[2 + k].state_dict()
        got = module.layer.state_dict()
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
        prefix = f"model.layers.{2 + k}."
        assert torch.equal(module.eh_proj.weight, original[prefix + "eh_proj.weight"])
        assert torch.equal(module.final_norm.weight, original[prefix + "shared_head.norm.weight"])
    # Out again in the same layout: every key of the folder, bit for bit.
    mtp_keys = {k for k in original if k.startswith("model.layers.") and int(k.split(".")[2]) >= 2}
    out, entries = mtp_tensors(model, "deepseek")
    assert set(out) == mtp_keys
    assert entries == {"num_nextn_predict_layers": depth}
    save_pretrained(model, tmp_path / "again", "deepseek")
    again = read_tensors(tmp_path / "again")
    assert set(again) == set(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["num_nextn_predict_layers"] == depth


def test_release_layout_names_are_the_released_ones():
    # Spelled out: the per-depth tensors and a block with one tensor per expert.
    tensors, config = released_tensors("deepseek_v3", num_layers=2, depths=1)
    layer = sorted(k.removeprefix("model.layers.2.") for k in tensors if ".layers.2." in k)
    assert [f"{name}.weight" for name in HEAD_NAMES if f"{name}.weight" in layer] == [
        f"{name}.weight" for name in HEAD_NAMES
    ]
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"mlp.experts.{e}.{proj}.weight" in layer
    assert "mlp.gate.e_score_correction_bias" in layer
    assert "self_attn.kv_a_proj_with_mqa.weight" in layer
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 2


# ---------------------------------------------------------------- Qwen3-Next's linear attention
def unmasked(forward, hidden_states, cache=None, attention_mask=None, **kwargs):
    return forward(hidden_states, cache=cache, **kwargs)


@pytest.mark.parametrize("model_type", LINEAR_ATTENTION_TYPES)
def test_linear_attention_leaks_across_documents_unless_restarted(model_type):
    # transformers' torch gated-DeltaNet ignores document boundaries: without the restart the
    # packed rows differ from the documents alone (with it, test_hf_adapter.py's packed ==
    # one-by-one passes for qwen3_next and qwen3_5_text).
    model = build(model_type, depth=0)
    b = batch(depth=0)
    with torch.no_grad():
        restarted = model(b.input_ids, b.layout)[0]
        for module in model.modules():
            if is_linear_attention(module):  # the class's forward, over the whole row
                module.forward = functools.partial(unmasked, type(module).forward.__get__(module))
        leaking = model(b.input_ids, b.layout)[0]
    assert not torch.allclose(restarted, leaking, atol=1e-4)


@pytest.mark.parametrize("model_type", LINEAR_ATTENTION_TYPES)
def test_linear_attention_is_refused_where_its_state_cannot_follow(model_type):
    model = build(model_type, depth=1).eval()
    with pytest.raises(ConfigError, match="recurrent state"):
        generate(model, [5, 9, 14], 4)
    with pytest.raises(ConfigError, match="parallel.cp=1"):
        check_hf_layout(1, cp=2, model_type=model_type)
    check_hf_layout(1, cp=2, model_type="deepseek_v3")


@pytest.mark.parametrize("model_type", LINEAR_ATTENTION_TYPES)
def test_qwen3_next_release_layout_loads_and_saves_back_bit_exact(tmp_path, model_type):
    # Qwen3.5's released MTP module has Qwen3-Next's names (mtp.*); dense Qwen3.5's block is dense.
    folder = save_released_qwen3_next(tmp_path / "released", model_type=model_type)
    original = read_tensors(folder)
    model = load_hf_mtp_model(folder, MTPConfig(num_depths=1))
    depth = model.mtp.depths[0]
    assert type(depth.layer) is type(model.decoder.layers[0])
    assert depth.layer.block_type == "full_attention"
    assert hasattr(depth.layer.mlp, "experts") == (model_type != "qwen3_5_text")
    # Zero-centred norms stay as stored (the model's own convention), the projection is fc.
    assert torch.equal(depth.enorm.weight, original["mtp.pre_fc_norm_embedding.weight"])
    assert torch.equal(depth.final_norm.weight, original["mtp.norm.weight"])
    assert torch.equal(depth.eh_proj.weight, original["mtp.fc.weight"])
    save_pretrained(model, tmp_path / "again", "qwen3_next")
    again = read_tensors(tmp_path / "again")
    assert set(again) == set(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 1
    with pytest.raises(CheckpointError, match="zero-centred"):
        mtp_tensors(model, "deepseek")
