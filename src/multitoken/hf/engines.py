"""What each serving engine's MTP (or EAGLE) draft loader reads, as data (docs/serving.md).

One :class:`EngineSpec` per (architecture, engine) row, read in the engines' own source:

* vLLM 0.34.0 (the PyPI wheel, build ``g62d4bc3c7``): ``vllm/config/speculative.py``
  (``hf_config_override``: base architecture -> MTP model type, ``n_predict``),
  ``vllm/model_executor/models/{deepseek_mtp,glm4_moe_mtp,mimo_mtp,qwen3_next_mtp,
  qwen3_5_mtp,llama_eagle}.py``, ``vllm/model_executor/models/utils.py``
  (``get_spec_layer_idx_from_weight_name``), ``vllm/v1/worker/gpu/spec_decode/
  {mtp,multi_module_mtp,target_dependent_ar}/speculator.py`` (which layer step s runs).
* SGLang 0.5.23 (the PyPI wheel): ``sglang/srt/configs/model_config.py`` (the draft
  architecture rewrite), ``sglang/srt/models/{deepseek_nextn,glm4_moe_nextn,mimo_mtp,
  qwen3_next_mtp,qwen3_5_mtp,llama_eagle,qwen2_eagle}.py``,
  ``sglang/srt/models/deepseek_common/deepseek_weight_loader.py``, ``glm4_moe.py``
  (``load_weights(is_nextn=True)``: "Only 1 nextn layer is supported").

:func:`check_folder` compares an exported folder with a spec: the config fields and
architecture the engine keys on, and every weight name and shape its loader reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.decoding.rules import DraftRule
from multitoken.hf.engine_blocks import IMPLIED_CONFIG, block_shapes

__all__ = [
    "EngineSpec",
    "SPECS",
    "VLLM",
    "SGLANG",
    "check_folder",
    "expected_weights",
    "folder_layers",
]

VLLM = "vllm 0.34.0 (PyPI wheel, build g62d4bc3c7)"
SGLANG = "sglang 0.5.23 (PyPI wheel)"


@dataclass(frozen=True)
class EngineSpec:
    """What one engine's draft loader reads for one architecture.

    Attributes:
        architecture, engine: the row (``"deepseek_v3"``, ``"vllm"``).
        source: the engine release and the files read.
        architectures: ``config.json`` ``architectures[0]`` values the engine maps to its draft.
        model_types: ``model_type`` values it maps (vLLM keys DeepSeek/Qwen on these; empty: any).
        draft_class: the class the engine builds for the draft.
        count_field: the config field giving the number of MTP layers (None: none is read).
        count_default: its value when absent (None: required).
        max_layers: MTP layers the engine loads (SGLang: 1); None = all.
        prefix: the per-layer weight prefix; ``{L}`` = num_hidden_layers, ``{i}`` = 0-based layer.
        heads: per-layer head weights: name (after ``prefix``) -> "H", "2H" or "V" shape code.
        shared: weights outside the layers the draft reads: name -> shape code.
        block: the family of the engine's block class (:mod:`multitoken.hf.engine_blocks`).
        concat: the projection's input order.
        zero_first_position: the draft zeroes the token embedding at position 0.
        hidden_input: what the draft reads as h^0.
        step_rule: which layer draft step s (0-based) runs.
        rule: the same, as the :class:`DraftRule` ``generate`` follows.
        command: how to serve the folder (``{folder}``, ``{n}``: speculative tokens).
        config_values: config.json fields the engine builds the block from, with the value
            the trained model computes with (:data:`~multitoken.hf.engine_blocks.IMPLIED_CONFIG`).
        too_many: what the engine does with a folder of more than ``max_layers`` MTP layers,
            where that fails or loses a layer (None: it reads the first ``max_layers``).
    """

    architecture: str
    engine: str
    source: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    draft_class: str
    count_field: str | None
    count_default: int | None
    max_layers: int | None
    prefix: str
    heads: dict[str, str]
    shared: dict[str, str]
    block: str
    concat: str
    zero_first_position: bool
    hidden_input: str
    step_rule: str
    rule: DraftRule
    command: str
    config_values: dict[str, Any]
    too_many: str | None


_NORMED = "h^0 after the main model's final norm (as multitoken trains)"
_DS_HEADS = {
    "enorm.weight": "H",
    "hnorm.weight": "H",
    "eh_proj.weight": "2H",
    "shared_head.norm.weight": "H",
    "shared_head.head.weight": "V",
    "embed_tokens.weight": "V",
}
_QN_SHARED = {
    "mtp.fc.weight": "2H",
    "mtp.pre_fc_norm_embedding.weight": "H",
    "mtp.pre_fc_norm_hidden.weight": "H",
    "mtp.norm.weight": "H",
    "model.embed_tokens.weight": "V",
}
_MIMO_HEADS = {
    "token_layernorm.weight": "H",
    "hidden_layernorm.weight": "H",
    "input_proj.weight": "2H",
    "final_layernorm.weight": "H",
}
_VLLM_SERVE = (
    "vllm serve {folder} --speculative-config "
    """'{{"method": "mtp", "num_speculative_tokens": {n}}}'"""
)
_SGLANG_SERVE = (
    "python -m sglang.launch_server --model-path {folder} --speculative-algorithm EAGLE "
    "--speculative-num-steps {n} --speculative-eagle-topk 1 --speculative-num-draft-tokens {n1}"
)
_MOD = "layer s mod n (spec_step_idx % num_mtp_layers)"
_ONE_NEXTN = (
    "SGLang's loader asserts num_nextn_predict_layers == 1 ('Only 1 nextn layer is supported'): "
    "export a one-depth model for SGLang"
)


def _spec(architecture: str, engine: str, files: str, **fields: Any) -> EngineSpec:
    source = f"{VLLM if engine == 'vllm' else SGLANG}: {files}"
    fields.setdefault("model_types", ())
    fields.setdefault("count_default", None)
    fields.setdefault("max_layers", None if engine == "vllm" else 1)
    fields.setdefault("hidden_input", _NORMED)
    fields.setdefault("command", _VLLM_SERVE if engine == "vllm" else _SGLANG_SERVE)
    fields.setdefault("shared", {})
    fields.setdefault("config_values", dict(IMPLIED_CONFIG.get(architecture, {})))
    fields.setdefault("too_many", None)
    return EngineSpec(architecture, engine, source, **fields)


def _deepseek_like(arch: str, engine: str, files: str, archs, types, draft, block) -> EngineSpec:
    vllm = engine == "vllm"
    heads = dict(_DS_HEADS)
    if not vllm:  # SGLang reads the target's embedding and head instead of the copies
        del heads["shared_head.head.weight"], heads["embed_tokens.weight"]
    return _spec(
        arch,
        engine,
        files,
        architectures=archs,
        model_types=types,
        draft_class=draft,
        count_field="num_nextn_predict_layers",
        prefix="model.layers.{L+i}.",
        heads=heads,
        block=block,
        concat="embedding, hidden",
        zero_first_position=vllm,
        step_rule=_MOD if vllm else "the one MTP layer, every step",
        rule=DraftRule(f"{engine}:{arch}", None if vllm else 1, vllm),
        too_many=None if vllm else _ONE_NEXTN,
    )


def _qwen_like(arch: str, engine: str, files: str, archs, types, draft, field) -> EngineSpec:
    vllm = engine == "vllm"
    return _spec(
        arch,
        engine,
        files,
        architectures=archs,
        model_types=types,
        draft_class=draft,
        count_field=field,
        count_default=1,
        prefix="mtp.layers.{i}.",
        heads={},
        shared=dict(_QN_SHARED),
        block="qwen3_next",
        concat="embedding, hidden",
        zero_first_position=False,
        step_rule=_MOD if vllm else "the one MTP layer, every step",
        rule=DraftRule(f"{engine}:{arch}", None if vllm else 1, False),
    )


_DS = ("DeepseekV3ForCausalLM",)
_GLM = ("Glm4MoeForCausalLM",)
_Q35 = (
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM",
)
_Q35_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text")
SPECS: dict[str, EngineSpec] = {}
_QN = ("Qwen3NextForCausalLM",)
# fmt: off
for _s in (
    _deepseek_like("deepseek_v3", "vllm", "deepseek_mtp.py", _DS, ("deepseek_v3",),
                   "DeepSeekMTP", "deepseek_v2"),
    _deepseek_like("deepseek_v3", "sglang", "deepseek_nextn.py, deepseek_weight_loader.py",
                   _DS, (), "DeepseekV3ForCausalLMNextN", "deepseek_v2"),
    _deepseek_like("glm4_moe", "vllm", "glm4_moe_mtp.py", _GLM, (), "Glm4MoeMTP", "glm4_moe"),
    _deepseek_like("glm4_moe", "sglang", "glm4_moe_nextn.py, glm4_moe.py", _GLM, (),
                   "Glm4MoeForCausalLMNextN", "glm4_moe"),
    _qwen_like("qwen3_next", "vllm", "qwen3_next_mtp.py", _QN, ("qwen3_next",), "Qwen3NextMTP",
               "num_nextn_predict_layers"),
    _qwen_like("qwen3_next", "sglang", "qwen3_next_mtp.py", _QN, (), "Qwen3NextForCausalLMMTP",
               None),
    _qwen_like("qwen3_5", "vllm", "qwen3_5_mtp.py", _Q35, _Q35_TYPES, "Qwen3_5MTP",
               "mtp_num_hidden_layers"),
    _qwen_like("qwen3_5", "sglang", "qwen3_5_mtp.py", _Q35, (), "Qwen3_5ForCausalLMMTP", None),
):
    SPECS[f"{_s.engine}:{_s.architecture}"] = _s
# fmt: on

SPECS["vllm:mimo"] = _spec(
    "mimo",
    "vllm",
    "mimo_mtp.py, mimo.py",
    architectures=("MiMoForCausalLM",),
    draft_class="MiMoMTP",
    count_field="num_nextn_predict_layers",
    prefix="model.mtp_layers.{i}.",
    heads=dict(_MIMO_HEADS),
    shared={"model.embed_tokens.weight": "V", "lm_head.weight": "V"},
    block="qwen2",
    concat="hidden, embedding",
    zero_first_position=True,
    hidden_input="h^0 BEFORE the final norm (MiMoModel.forward skips model.norm)",
    step_rule="layer 0 only (MiMoMTP.forward asserts spec_step_idx == 0): one MTP layer, "
    "reused for every step",
    rule=DraftRule("vllm:mimo", 1, True),
)
SPECS["sglang:mimo"] = _spec(
    "mimo",
    "sglang",
    "mimo_mtp.py, mimo.py",
    architectures=("MiMoForCausalLM",),
    draft_class="MiMoMTP",
    count_field=None,
    prefix="model.mtp_layers.{i}.",
    heads=dict(_MIMO_HEADS),
    shared={"model.embed_tokens.weight": "V"},
    block="qwen2",
    concat="hidden, embedding",
    zero_first_position=True,
    step_rule="one layer: every model.mtp_layers.{k} is read into it (the last read wins)",
    rule=DraftRule("sglang:mimo", 1, True),
    too_many="SGLang's MiMoMTP reads every model.mtp_layers.{k} into its one layer (the last read "
    "wins, silently): export a one-depth model for SGLang",
)
_EAGLE_VLLM = (
    "vllm serve {target} --speculative-config "
    """'{{"method": "eagle", "model": "{folder}", "num_speculative_tokens": {n}}}'"""
)
_EAGLE_SGLANG = (
    "python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE "
    "--speculative-draft-model-path {folder} --speculative-num-steps {n} "
    "--speculative-eagle-topk 1 --speculative-num-draft-tokens {n1}"
)
for _engine, _files, _archs, _shared in (
    (
        "vllm",
        "llama_eagle.py, transformers_utils/configs/eagle.py",
        ("LlamaForCausalLM",),
        {"fc.weight": "2H"},
    ),  # fmt: skip
    (
        "sglang",
        "llama_eagle.py, qwen2_eagle.py",
        ("LlamaForCausalLMEagle", "Qwen2ForCausalLMEagle"),
        {"fc.weight": "2H", "fc.bias": "H"},
    ),  # fmt: skip
):
    SPECS[f"{_engine}:eagle"] = _spec(
        "eagle",
        _engine,
        _files,
        architectures=_archs,
        draft_class="EagleLlamaForCausalLM" if _engine == "vllm" else _archs[0],
        count_field=None,
        max_layers=1,
        prefix="layers.{i}.",
        heads={},
        shared=_shared,
        block="llama_eagle",
        concat="embedding, hidden",
        zero_first_position=False,
        hidden_input=_NORMED + "; steps >= 2 read the draft's un-normed output",
        step_rule="the one draft layer, every step",
        rule=DraftRule(f"{_engine}:eagle", 1, False),
        command=_EAGLE_VLLM if _engine == "vllm" else _EAGLE_SGLANG,
    )


def _size(code: str, config: dict[str, Any]) -> tuple[int, ...]:
    h, v = config["hidden_size"], config["vocab_size"]
    return {"H": (h,), "2H": (h, 2 * h), "V": (v, h)}[code]


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def layer_count(spec: EngineSpec, config: dict[str, Any]) -> int:
    """The MTP layers the engine builds for ``config`` (``n_predict``, capped as it caps it)."""
    text = _text_config(config)
    count = spec.count_default
    if spec.count_field is not None:
        count = config.get(spec.count_field, text.get(spec.count_field, spec.count_default))
    count = 1 if count is None and spec.max_layers == 1 else count
    return min(count, spec.max_layers) if spec.max_layers and count else count


def _prefix(spec: EngineSpec, text: dict[str, Any], i: int) -> str:
    layers = text.get("num_hidden_layers", 0)
    return spec.prefix.replace("{L+i}", str(layers + i)).replace("{i}", str(i))


def folder_layers(spec: EngineSpec, config: dict[str, Any], names) -> int:
    """The MTP layers a folder holds under the spec's per-layer prefix (from its tensor names)."""
    i = 0
    while any(name.startswith(_prefix(spec, _text_config(config), i)) for name in names):
        i += 1
    return i


def expected_weights(spec: EngineSpec, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight name the engine's draft loader fills, with its shape."""
    text = _text_config(config)
    out = {name: _size(code, text) for name, code in spec.shared.items()}
    block = block_shapes(spec.block, text)
    for i in range(layer_count(spec, config) or 0):
        prefix = _prefix(spec, text, i)
        out |= {prefix + name: _size(code, text) for name, code in spec.heads.items()}
        out |= {prefix + name: shape for name, shape in block.items()}
    return out


def check_folder(spec: EngineSpec, folder: str | Path, shapes: dict[str, tuple[int, ...]]) -> list:
    """What in an exported folder the engine's loader would not accept (empty: nothing).

    Args:
        spec: the row.
        folder: the folder (its ``config.json`` is read).
        shapes: the folder's tensors' shapes, by name (the safetensors headers).
    """
    config = json.loads((Path(folder) / "config.json").read_text())
    problems = []
    arch = (config.get("architectures") or [None])[0]
    if arch not in spec.architectures:
        problems.append(f"architectures[0] is {arch!r}, {spec.engine} maps {spec.architectures}")
    if spec.model_types and config.get("model_type") not in spec.model_types:
        problems.append(f"model_type {config.get('model_type')!r} not in {spec.model_types}")
    text = _text_config(config)
    present = spec.count_field in config or spec.count_field in text
    if spec.count_field and spec.count_default is None and not present:
        problems.append(f"config.json has no {spec.count_field}")
    for name, value in spec.config_values.items():
        if text.get(name) != value:
            problems.append(f"config.json has {name}={text.get(name)!r}, the block needs {value!r}")
    held = folder_layers(spec, config, shapes)
    if spec.too_many and held > spec.max_layers:
        problems.append(f"{held} MTP layers: {spec.too_many}")
    expected = expected_weights(spec, config)
    if spec.architecture == "eagle":  # the folder is the draft: its loader refuses strangers
        extra = set(shapes) - set(expected) - {"embed_tokens.weight", "lm_head.weight"}
        problems += [f"unexpected {name}" for name in sorted(extra)]
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"missing {name}")
        elif tuple(shapes[name]) != shape:
            problems.append(f"{name} has shape {tuple(shapes[name])}, the engine builds {shape}")
    return problems
