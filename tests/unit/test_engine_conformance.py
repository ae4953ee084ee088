"""Conformance of exported folders with what each serving engine's draft loader reads.

One test per (architecture, engine) row of :data:`multitoken.hf.engines.SPECS` (read in vLLM
0.34.0 and SGLang 0.5.23, files cited there): the folder has the config fields and the
architecture name the engine keys on, and every weight name its loader fills, with the shape it
builds. MiMo and EAGLE folders come from multitoken's real export; the DeepSeek-V3, GLM-4.5,
Qwen3-Next and Qwen3.5 folders are built from a tiny transformers model of the released
architecture (its own layer's names) plus the MTP tensors of ``formats.to_format``, because the
adapter cannot export those architectures yet.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tests.helpers.models import tiny_model

from multitoken.hf.engines import SPECS, check_folder, expected_weights
from multitoken.hf.formats import to_format
from multitoken.hf.serve_export import export_served


def _shapes(folder) -> dict[str, tuple[int, ...]]:
    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        if file.parent != folder:
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                out[key] = tuple(handle.get_slice(key).get_shape())
    return out


@pytest.fixture(scope="module")
def mimo_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("mimo")
    export_served(tiny_model(2, seed=1), out, "mimo_mtp", eos_id=1, pad_id=0)
    return out


@pytest.fixture(scope="module")
def eagle_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle")
    export_served(tiny_model(1, seed=2, mtp=dict(block="eagle")), out, "eagle", 1, 0)
    return out


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_mimo_export_is_what_the_engine_loads(mimo_folder, engine):
    spec = SPECS[f"{engine}:mimo"]
    assert check_folder(spec, mimo_folder, _shapes(mimo_folder)) == []
    config = json.loads((mimo_folder / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"] and config["model_type"] == "qwen2"
    assert config["num_nextn_predict_layers"] == 2
    assert "auto_map" not in config  # no remote code


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_eagle_export_is_what_the_engine_loads(eagle_folder, engine):
    spec = SPECS[f"{engine}:eagle"]
    draft = eagle_folder / f"eagle-{engine}"
    assert check_folder(spec, draft, _shapes(draft)) == []
    # The other engine's draft differs exactly where the two loaders differ (fc.bias, arch).
    other = eagle_folder / f"eagle-{'sglang' if engine == 'vllm' else 'vllm'}"
    assert check_folder(spec, other, _shapes(other)) != []


def test_the_checker_names_what_is_wrong(eagle_folder, tmp_path):
    spec = SPECS["vllm:eagle"]
    shapes = _shapes(eagle_folder / "eagle-vllm")
    shapes.pop("layers.0.mlp.up_proj.weight")
    shapes["layers.0.input_layernorm.weight"] = (32,)  # EAGLE's layer 0 has no input norm
    shapes["fc.weight"] = (32, 32)
    problems = check_folder(spec, eagle_folder / "eagle-vllm", shapes)
    assert any("missing layers.0.mlp.up_proj.weight" in p for p in problems)
    assert any("unexpected layers.0.input_layernorm.weight" in p for p in problems)
    assert any("fc.weight has shape (32, 32)" in p for p in problems)


def _released(folder, model_cls, config, fmt: str, depths: int, extra: dict) -> None:
    """A folder in a released layout: the tiny model as transformers saves it (the released
    names), plus ``depths`` MTP layers in ``fmt`` (``formats.to_format``) whose blocks are
    copies of the model's last layer."""
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    last = f"model.layers.{config.num_hidden_layers - 1}."
    block = {k.removeprefix(last): v for k, v in state.items() if k.startswith(last)}
    h = config.hidden_size
    canonical = {
        "enorm.weight": torch.ones(h),
        "hnorm.weight": torch.ones(h),
        "eh_proj.weight": torch.randn(h, 2 * h),
        "final_norm.weight": torch.ones(h),
    }
    depth = canonical | {f"layer.{k}": v for k, v in block.items()}
    embed = state["model.embed_tokens.weight"]
    tensors, entries = to_format(
        [dict(depth) for _ in range(depths)], fmt, num_layers=config.num_hidden_layers,
        hidden_first=False, embed=embed, head=state.get("lm_head.weight", embed),
    )  # fmt: skip
    save_file(state | tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((folder / "config.json").read_text()) | entries | extra
    (folder / "config.json").write_text(json.dumps(data))


_MOE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip


def _deepseek(folder, depths):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        **{**_MOE, "num_key_value_heads": 4}, num_hidden_layers=2, first_k_dense_replace=1,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    )  # fmt: skip
    _released(folder, DeepseekV3ForCausalLM, config, "deepseek", depths, {})


def _glm(folder, depths):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(
        **_MOE, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
    )  # fmt: skip
    _released(folder, Glm4MoeForCausalLM, config, "deepseek", depths, {})


def _qwen3_next(folder, depths):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        **_MOE, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip
    _released(folder, Qwen3NextForCausalLM, config, "qwen3_next", depths, {})


def _qwen3_5(folder, depths):
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(
        **_MOE, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip
    extra = {"architectures": ["Qwen3_5MoeForCausalLM"]}
    _released(folder, Qwen3_5MoeForCausalLM, config, "qwen3_next", depths, extra)


# (row, builder, depths): SGLang loads one MTP layer, vLLM every one the config counts.
RELEASED = [
    ("vllm:deepseek_v3", _deepseek, 2),
    ("sglang:deepseek_v3", _deepseek, 1),
    ("vllm:glm4_moe", _glm, 2),
    ("sglang:glm4_moe", _glm, 1),
    ("vllm:qwen3_next", _qwen3_next, 1),
    ("sglang:qwen3_next", _qwen3_next, 1),
    ("vllm:qwen3_5", _qwen3_5, 1),
    ("sglang:qwen3_5", _qwen3_5, 1),
]


@pytest.mark.parametrize("row,build,depths", RELEASED, ids=[r[0] for r in RELEASED])
def test_released_layout_is_what_the_engine_loads(tmp_path, row, build, depths):
    build(tmp_path, depths)
    spec = SPECS[row]
    shapes = _shapes(tmp_path)
    assert check_folder(spec, tmp_path, shapes) == []
    config = json.loads((tmp_path / "config.json").read_text())
    mtp_names = set(expected_weights(spec, config)) - {"model.embed_tokens.weight"}
    assert mtp_names and mtp_names <= set(shapes)


def test_sglang_deepseek_refuses_two_layers_where_vllm_reads_both(tmp_path):
    _deepseek(tmp_path, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    vllm = expected_weights(SPECS["vllm:deepseek_v3"], config)
    sglang = expected_weights(SPECS["sglang:deepseek_v3"], config)
    assert any(k.startswith("model.layers.3.") for k in vllm)
    assert not any(k.startswith("model.layers.3.") for k in sglang)  # "Only 1 nextn layer"
