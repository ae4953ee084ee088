"""Conformance of exported folders with what each serving engine's draft loader reads.

One test per (architecture, engine) row of :data:`multitoken.hf.engines.SPECS` (read in vLLM
0.34.0 and SGLang 0.5.23, files cited there): the folder has the config fields and the
architecture name the engine keys on, and every weight name its loader fills, with the shape it
builds. Every folder comes from multitoken's real export (``export_model``, what ``multitoken
export --format`` runs) of a tiny model of the architecture with MTP depths built by the adapter
(Qwen3.5 dense and MoE: the text models, ``Qwen3_5ForCausalLM`` / ``Qwen3_5MoeForCausalLM``).
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from tests.helpers.models import tiny_model

from multitoken import MTPConfig
from multitoken.data import Document, train_tokenizer
from multitoken.errors import CheckpointError
from multitoken.hf.engines import SPECS, check_folder, expected_weights
from multitoken.hf.export import export_model
from multitoken.hf.serve_export import export_served
from multitoken.hf.weights import load_hf_mtp_model
from multitoken.testing.tiny_hf import save_tiny


def _shapes(folder) -> dict[str, tuple[int, ...]]:
    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        if file.parent != folder:
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                out[key] = tuple(handle.get_slice(key).get_shape())
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["D1", "D2"])
def mimo_folder(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("mimo")
    export_served(tiny_model(request.param, seed=1), out, "mimo_mtp", eos_id=1, pad_id=0)
    return request.param, out


def expected_problems(spec, depths: int) -> list[str]:
    """What the checker must say of a ``depths``-layer folder: nothing, or (SGLang's DeepSeek,
    GLM and MiMo loaders, one layer) that it holds too many."""
    if spec.too_many and depths > spec.max_layers:
        return [f"{depths} MTP layers: {spec.too_many}"]
    return []


@pytest.fixture(scope="module")
def eagle_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle")
    export_served(tiny_model(1, seed=2, mtp=dict(block="eagle")), out, "eagle", 1, 0)
    return out


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_mimo_export_is_what_the_engine_loads(mimo_folder, engine):
    depths, folder = mimo_folder
    spec = SPECS[f"{engine}:mimo"]
    assert check_folder(spec, folder, _shapes(folder)) == expected_problems(spec, depths)
    assert (depths == 2 and engine == "sglang") == bool(expected_problems(spec, depths))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"] and config["model_type"] == "qwen2"
    assert config["num_nextn_predict_layers"] == depths
    assert "auto_map" not in config  # no remote code


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_eagle_export_is_what_the_engine_loads(eagle_folder, engine):
    spec = SPECS[f"{engine}:eagle"]
    draft = eagle_folder / f"eagle-{engine}"
    assert check_folder(spec, draft, _shapes(draft)) == []
    # The other engine's draft differs exactly where the two loaders differ (fc.bias, arch).
    other = eagle_folder / f"eagle-{'sglang' if engine == 'vllm' else 'vllm'}"
    assert check_folder(spec, other, _shapes(other)) != []


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_eagle_export_of_an_hf_model_is_what_the_engine_loads(tmp_path, model_type, engine):
    source = save_tiny(model_type, tmp_path / "source")
    model = load_hf_mtp_model(source, MTPConfig(num_depths=1, block="eagle"))
    export_served(model, tmp_path / "out", "eagle", eos_id=1, pad_id=0)
    draft = tmp_path / "out" / f"eagle-{engine}"
    assert check_folder(SPECS[f"{engine}:eagle"], draft, _shapes(draft)) == []
    # Qwen2's q/k/v biases are in both drafts: vLLM's config says qkv_bias, SGLang's
    # Qwen2ForCausalLMEagle always builds them.
    assert ("layers.0.self_attn.q_proj.bias" in _shapes(draft)) == (model_type == "qwen2")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_mimo_mtp_export_of_an_hf_qwen2_is_what_the_engine_loads(tmp_path, engine):
    source = save_tiny("qwen2", tmp_path / "source")
    export_served(load_hf_mtp_model(source, MTPConfig(num_depths=1)), tmp_path, "mimo_mtp", 1, 0)
    assert check_folder(SPECS[f"{engine}:mimo"], tmp_path, _shapes(tmp_path)) == []


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


# ---------------------------------------------------------------- released architectures
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the dog."]
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts * 4)]
    return train_tokenizer(docs, 300, tmp_path_factory.mktemp("tok"), verbose=False)


def export_tiny(folder, tokenizer, model_type: str, fmt: str, depths: int, **overrides):
    """A tiny ``model_type`` with ``depths`` MTP depths from the adapter, exported in ``fmt``."""
    source = save_tiny(model_type, folder / "source", vocab_size=320, **overrides)
    model = load_hf_mtp_model(source, MTPConfig(num_depths=depths))
    return export_model(model, tokenizer, folder / "out", fmt)


# (architecture, export format, depths): one and two where the format holds several (vLLM reads
# both; SGLang asserts one), Qwen3-Next's one.
EXPORTED = [
    ("deepseek_v3", "deepseek", 1),
    ("deepseek_v3", "deepseek", 2),
    ("glm4_moe", "deepseek", 1),
    ("glm4_moe", "deepseek", 2),
    ("qwen3_next", "qwen3_next", 1),
    ("qwen3_5_text", "qwen3_next", 1),
    ("qwen3_5_moe_text", "qwen3_next", 1),
]
# The engines' row for each model type (Qwen3.5's spec covers its text and multimodal types).
ROW = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5"}


@pytest.fixture(scope="module", params=EXPORTED, ids=[f"{r[0]}-D{r[2]}" for r in EXPORTED])
def exported(request, tmp_path_factory, tokenizer):
    model_type, fmt, depths = request.param
    folder = tmp_path_factory.mktemp(model_type)
    return model_type, fmt, depths, export_tiny(folder, tokenizer, model_type, fmt, depths)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_released_architecture_export_is_what_the_engine_loads(exported, engine):
    model_type, fmt, depths, folder = exported
    spec = SPECS[f"{engine}:{ROW.get(model_type, model_type)}"]
    shapes = _shapes(folder)
    assert check_folder(spec, folder, shapes) == expected_problems(spec, depths)
    assert (depths == 2 and engine == "sglang") == bool(expected_problems(spec, depths))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0] in spec.architectures and "auto_map" not in config
    mtp_names = set(expected_weights(spec, config)) - {"model.embed_tokens.weight"}
    assert mtp_names and mtp_names <= set(shapes)
    if fmt == "qwen3_next":
        assert all(name.startswith("mtp.") for name in mtp_names)
    else:  # model.layers.{L + k}, L = 2: vLLM reads every depth, SGLang the first
        layers = {int(name.split(".")[2]) for name in mtp_names}
        assert layers == set(range(2, 2 + (depths if engine == "vllm" else 1)))


def test_deepseek_export_writes_the_routing_fields_the_engines_read(tmp_path, tokenizer):
    # transformers' DeepseekV3Config writes no topk_method/scoring_func/moe_layer_freq; without
    # them vLLM builds softmax routing with no correction bias, SGLang fails on the attribute.
    folder = export_tiny(tmp_path, tokenizer, "deepseek_v3", "deepseek", 1)
    config = json.loads((folder / "config.json").read_text())
    assert (config["topk_method"], config["scoring_func"], config["moe_layer_freq"]) == (
        "noaux_tc", "sigmoid", 1,
    )  # fmt: skip
    source = json.loads((tmp_path / "source" / "config.json").read_text())
    assert "topk_method" not in source  # the export added them
    del config["topk_method"]
    (folder / "config.json").write_text(json.dumps(config))
    for engine in ("vllm", "sglang"):
        problems = check_folder(SPECS[f"{engine}:deepseek_v3"], folder, _shapes(folder))
        assert problems == ["config.json has topk_method=None, the block needs 'noaux_tc'"]


def test_a_contradicting_routing_field_is_refused_before_anything_is_written(tmp_path, tokenizer):
    source = save_tiny("deepseek_v3", tmp_path / "source", vocab_size=320)
    config = json.loads((source / "config.json").read_text()) | {"scoring_func": "softmax"}
    (source / "config.json").write_text(json.dumps(config))
    model = load_hf_mtp_model(source, MTPConfig(num_depths=1))
    with pytest.raises(CheckpointError, match="scoring_func='softmax'.*'sigmoid'"):
        export_model(model, tokenizer, tmp_path / "out", "deepseek")
    assert not (tmp_path / "out").exists()
