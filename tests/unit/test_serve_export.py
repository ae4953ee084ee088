"""The serving exports (``export --format mimo_mtp | eagle``) compute what multitoken trained.

* mimo_mtp of the reference GPT: transformers' own Qwen2 model on the folder gives multitoken's
  logits, and multitoken re-imports the MTP depths bit-exactly (MiMo's ``[hidden; emb]``).
* eagle: the vLLM draft folder, run as EAGLE-1 with transformers' own Llama layer (input norm
  removed, ``fc`` over ``[embedding; hidden]``, no final norm), gives depth 1's hidden state.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers.models import tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from multitoken import MTPConfig
from multitoken.errors import CheckpointError
from multitoken.hf.serve_export import export_served
from multitoken.hf.weights import load_hf_mtp_model
from multitoken.layout import SequenceLayout
from multitoken.lookahead import lookahead


def test_mimo_mtp_export_of_the_reference_gpt_is_the_same_model(tmp_path):
    model = tiny_model(2, seed=3, mtp=dict(hidden_first=True)).eval()
    export_served(model, tmp_path, "mimo_mtp", eos_id=1, pad_id=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"  # model_type qwen2: no remote code
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.logits(ids), rtol=1e-5, atol=1e-5)
    back = load_hf_mtp_model(tmp_path, MTPConfig(num_depths=2, hidden_first=True))
    for ours, theirs in zip(model.mtp.depths, back.mtp.depths):
        torch.testing.assert_close(ours.eh_proj.weight, theirs.eh_proj.weight, rtol=0, atol=0)
        assert torch.equal(ours.final_norm.weight, theirs.final_norm.weight)


def test_mimo_mtp_refuses_an_eagle_block(tmp_path):
    with pytest.raises(CheckpointError, match="use --format eagle"):
        export_served(tiny_model(1, mtp=dict(block="eagle")), tmp_path, "mimo_mtp", 1, 0)


def test_eagle_refuses_an_mtp_block(tmp_path):
    with pytest.raises(CheckpointError, match="mtp.block=eagle"):
        export_served(tiny_model(1), tmp_path, "eagle", 1, 0)


@pytest.mark.parametrize("hidden_first", [False, True])
def test_eagle_draft_is_depth_one(tmp_path, hidden_first):
    model = tiny_model(1, seed=4, mtp=dict(block="eagle", hidden_first=hidden_first)).eval()
    export_served(model, tmp_path, "eagle", eos_id=1, pad_id=0)
    draft = tmp_path / "eagle-vllm"
    config = LlamaConfig(**json.loads((draft / "config.json").read_text()))
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, 0)
    layer.input_layernorm = torch.nn.Identity()  # EAGLE-1's layer 0 (llama_eagle.py)
    tensors = load_file(str(draft / "model.safetensors"))
    layer.load_state_dict({k.removeprefix("layers.0."): v for k, v in tensors.items()
                           if k.startswith("layers.0.")})  # fmt: skip
    ids = torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    layout = SequenceLayout.from_lengths([[10]])
    with torch.no_grad():
        h = model(ids, layout)
        emb = model.decoder.embed(lookahead(ids, layout, [1], fill=0)[0])
        x = torch.cat([emb, h[0]], dim=-1) @ tensors["fc.weight"].t()
        positions = torch.arange(10)[None]
        rope = LlamaRotaryEmbedding(config)(x, positions)
        mask = torch.full((10, 10), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, h[1], rtol=1e-5, atol=1e-5)
    assert (tmp_path / "config.json").is_file()  # the target beside the drafts
    assert not any("mtp" in k for k in load_file(str(tmp_path / "model.safetensors")))
