"""Qwen3.5 as released: a multimodal ``Qwen3_5ForConditionalGeneration`` folder (text model
under ``model.language_model.*``, a vision tower, ``mtp.*``) read as its text model.

The text model itself (``qwen3_5_text``) is tested with the others: packed == documents one by
one in test_hf_adapter.py, heads-only and its ``mtp.*`` layout in and out bit-exact in
test_hf_moe.py, the engines' rows through the real export in test_engine_conformance.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.helpers.released import save_released_qwen3_5, save_released_qwen3_next

from multitoken import ConfigError, MTPConfig
from multitoken.hf.export import default_format
from multitoken.hf.weights import load_hf_mtp_model, read_tensors, save_pretrained


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5")
    text = save_released_qwen3_next(root / "text", model_type="qwen3_5_text")
    return text, save_released_qwen3_5(root / "released", text)


def _equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


def test_the_released_folder_is_its_own_layout(folders):
    _, released = folders
    config = json.loads((released / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config["model_type"] == "qwen3_5" and config["text_config"]["mtp_num_hidden_layers"] == 1
    keys = set(read_tensors(released))  # under the text model's names; the vision tower unread
    assert "model.embed_tokens.weight" in keys and "mtp.fc.weight" in keys
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in keys)


@pytest.mark.parametrize("vision", [True, False], ids=["with_vision", "without_vision"])
def test_multimodal_folder_loads_as_its_text_model_with_its_mtp_module(folders, tmp_path, vision):
    text, released = folders
    if not vision:  # a folder stripped of its vision tower: the text model is all that is read
        released = save_released_qwen3_5(tmp_path / "stripped", text, vision=False)
    model = load_hf_mtp_model(released, MTPConfig(num_depths=1))
    twin = load_hf_mtp_model(text, MTPConfig(num_depths=1))
    assert model.decoder.model.config.model_type == "qwen3_5_text"
    _equal_models(model, twin)  # backbone and MTP module, bit for bit
    assert default_format(model) == "qwen3_next"


def test_the_text_model_read_is_the_multimodal_models_own(folders):
    # Independent reference: transformers' Qwen3_5ForConditionalGeneration on the same folder,
    # text input only, gives the adapter's logits (D = 0: the backbone alone).
    from transformers import Qwen3_5ForConditionalGeneration

    _, released = folders
    model = load_hf_mtp_model(released, MTPConfig(num_depths=1)).eval()
    reference = Qwen3_5ForConditionalGeneration.from_pretrained(released).eval()
    ids = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
        torch.testing.assert_close(model.logits(ids), theirs, rtol=1e-5, atol=1e-5)


def test_export_of_a_multimodal_release_is_the_text_model_bit_exact(folders, tmp_path):
    # What is exported is the text model in its own layout (Qwen3_5ForCausalLM, mtp.*): with
    # no training in between, exactly the text folder's tensors, every key and no other.
    text, released = folders
    model = load_hf_mtp_model(released, MTPConfig(num_depths=1))
    save_pretrained(model, tmp_path / "out", "qwen3_next")
    out, original = read_tensors(tmp_path / "out"), read_tensors(text)
    assert set(out) == set(original)
    for key, value in original.items():
        assert torch.equal(out[key], value), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForCausalLM"]
    assert config["model_type"] == "qwen3_5_text" and config["mtp_num_hidden_layers"] == 1


def test_a_vision_tower_in_a_text_only_folder_is_refused(folders, tmp_path):
    text, released = folders
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    stored = load_file(str(released / "model.safetensors"))
    vision = {k: v for k, v in stored.items() if k.startswith("model.visual.")}
    assert vision
    tensors = read_tensors(released) | vision
    save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    (mixed / "config.json").write_text((text / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"vision-tower tensors \(model\.visual\..*text-only"):
        load_hf_mtp_model(mixed, MTPConfig(num_depths=1))


def test_a_multimodal_config_without_its_text_config_is_refused(folders, tmp_path):
    _, released = folders
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((released / "model.safetensors").read_bytes())
    config = json.loads((released / "config.json").read_text())
    del config["text_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="without a text_config"):
        load_hf_mtp_model(broken, MTPConfig(num_depths=1))


def test_transformers_own_save_of_the_text_model_reads_back(folders, tmp_path):
    # transformers writes a text model loaded from the multimodal folder back under
    # model.language_model.* with a text config; the gate reads that as transformers does.
    text, released = folders
    model = load_hf_mtp_model(released, MTPConfig(num_depths=1))
    model.decoder.model.save_pretrained(tmp_path / "hf")
    assert any(
        k.startswith("model.language_model.")
        for k in load_file(str(tmp_path / "hf" / "model.safetensors"))
    )
    again = load_hf_mtp_model(tmp_path / "hf", MTPConfig(num_depths=0))
    twin = load_hf_mtp_model(text, MTPConfig(num_depths=0))
    _equal_models(again, twin)
