"""Exports the serving engines run as MTP / EAGLE drafts (docs/serving.md).

* ``mimo_mtp``: a ``MiMoForCausalLM`` folder (``model_type`` ``qwen2``, so no remote code),
  its depths in MiMo's layout (``model.mtp_layers.{k}``), for a Qwen2-based model or the
  reference GPT (written as Qwen2 with zero q/k/v biases: exactly the same function). vLLM
  maps ``MiMoForCausalLM`` to ``mimo_mtp``; SGLang rewrites it to ``MiMoMTP``.
* ``eagle``: the target model (as :func:`~multitoken.hf.export.export_model` writes it, without
  MTP keys) and two EAGLE-1 draft folders beside its files: ``eagle-vllm/``
  (``LlamaForCausalLM`` config, which vLLM's ``method="eagle"`` turns into
  ``EagleLlamaForCausalLM``; ``fc.weight`` only) and ``eagle-sglang/`` (``LlamaForCausalLMEagle``
  or ``Qwen2ForCausalLMEagle``, whose ``fc`` has a bias: written as zeros). Depth 1 becomes the
  draft: ``eh_proj`` -> ``fc`` (``[embedding; hidden]``), its layer -> ``layers.0`` (no input
  norm). Only a model trained with ``mtp.block=eagle`` is exactly that draft; another is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM

from multitoken.errors import CheckpointError
from multitoken.hf.adapter import HFDecoder
from multitoken.hf.export import (
    check_target,
    llama_config,
    llama_model,
    llama_state_dict,
    reference_depths,
    reference_mtp,
    staging,
    tokenizer_folder,
    write_hf_model,
)
from multitoken.hf.serve_formats import SERVE_FORMATS
from multitoken.hf.weights import depth_states, read_tensors, save_pretrained
from multitoken.models.gpt import GPT
from multitoken.mtp_model import MTPModel

__all__ = [
    "SERVE_FORMATS",
    "export_for_engine",
    "export_served",
    "export_mimo_mtp",
    "export_eagle",
    "eagle_draft",
]

_QKV = ("q_proj", "k_proj", "v_proj")


def _block_of(model: MTPModel, wanted: str, fmt: str) -> None:
    block = model.config.block
    if model.mtp is not None and block != wanted:
        fix = "train with mtp.block=eagle" if wanted == "eagle" else "use --format eagle"
        raise CheckpointError(
            f"--format {fmt} serves a {wanted!r} depth block; this model's is {block!r}: {fix}"
        )


def _qwen2_from_gpt(gpt: GPT, eos_id: int, pad_id: int) -> Qwen2ForCausalLM:
    """The reference GPT as a Qwen2 model: Llama's layer plus q/k/v biases, set to zero."""
    config = Qwen2Config(**{**llama_config(gpt, eos_id, pad_id).to_dict(), "model_type": "qwen2"})
    config.use_sliding_window, config.sliding_window = False, None
    model = Qwen2ForCausalLM(config)
    state = llama_state_dict(gpt)
    for i in range(gpt.config.n_layers):
        state |= _zero_biases(state, f"model.layers.{i}.self_attn.")
    model.load_state_dict(state, strict=True)
    return model


def _zero_biases(state: dict[str, Tensor], attn: str) -> dict[str, Tensor]:
    return {f"{attn}{p}.bias": torch.zeros_like(state[f"{attn}{p}.weight"][:, 0]) for p in _QKV}


def _as_mimo(folder: Path, tied_head: Tensor | None) -> None:
    """Name the folder's architecture ``MiMoForCausalLM``; write ``lm_head.weight`` where the
    model ties it (vLLM's MiMoMTP has its own, untied head to fill)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["MiMoForCausalLM"]
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    if tied_head is not None:
        tensors = read_tensors(folder)
        tensors.setdefault("lm_head.weight", tied_head.detach().clone().contiguous())
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def export_mimo_mtp(model: MTPModel, partial: Path, eos_id: int, pad_id: int) -> None:
    """Write ``model`` into ``partial`` as a ``MiMoForCausalLM`` folder (see the module doc)."""
    _block_of(model, "mtp", "mimo_mtp")
    decoder = model.decoder
    tied = None
    if isinstance(decoder, HFDecoder):
        model_type = decoder.model.config.model_type
        if model_type != "qwen2":
            raise CheckpointError(
                f"--format mimo_mtp writes MiMo, whose layers are Qwen2's; this model is "
                f"{model_type!r}: use --format eagle (dense Llama/Mistral/Qwen2) or mimo"
            )
        save_pretrained(model, partial, "mimo")
        if decoder.model.config.tie_word_embeddings:
            tied = decoder.head_weight
    elif isinstance(decoder, GPT):
        qwen2 = _qwen2_from_gpt(decoder, eos_id, pad_id)
        tensors, entries = reference_mtp(model, "mimo")
        for k in range(model.num_depths):
            tensors |= _zero_biases(tensors, f"model.mtp_layers.{k}.self_attn.")
        write_hf_model(qwen2, partial, tensors, entries)
        if decoder.config.tie_embeddings:
            tied = decoder.head_weight
    else:
        raise CheckpointError(f"cannot export a {type(decoder).__name__} decoder as MiMo")
    _as_mimo(partial, tied)


def _draft_config(model: MTPModel, eos_id: int, pad_id: int, engine: str) -> dict:
    decoder = model.decoder
    if isinstance(decoder, GPT):
        config = llama_config(decoder, eos_id, pad_id).to_dict()
    else:
        config = decoder.model.config.to_dict()
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise CheckpointError(
            f"the engines' EAGLE-1 draft is a Llama (or, in SGLang, Qwen2) layer without QK "
            f"norm; a {model_type!r} depth layer is not one: use --format mimo or deepseek"
        )
    qwen2 = model_type == "qwen2"
    drop = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
    config = {k: v for k, v in config.items() if k not in drop and not k.startswith("_")}
    config.update(num_hidden_layers=1, tie_word_embeddings=False)
    if engine == "vllm":
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        if qwen2:
            config.update(attention_bias=False, qkv_bias=True)
    else:
        arch = "Qwen2ForCausalLMEagle" if qwen2 else "LlamaForCausalLMEagle"
        config.update(model_type="qwen2" if qwen2 else "llama", architectures=[arch])
    return config


def eagle_draft(model: MTPModel, engine: str) -> dict[str, Tensor]:
    """Depth 1 as the engine's EAGLE-1 draft tensors (``fc``, ``layers.0.*``)."""
    gpt = isinstance(model.decoder, GPT)
    state = (reference_depths(model) if gpt else depth_states(model))[0]
    fc = state["eh_proj.weight"]
    if model.config.hidden_first:  # EAGLE reads [embedding; hidden]
        half = fc.shape[1] // 2
        fc = torch.cat([fc[:, half:], fc[:, :half]], dim=1)
    out = {"fc.weight": fc}
    if engine == "sglang":  # SGLang's fc is nn.Linear(2H, H) with a bias; EAGLE's is zero here
        out["fc.bias"] = torch.zeros(fc.shape[0], dtype=fc.dtype)
    out |= {f"layers.0.{k[6:]}": v for k, v in state.items() if k.startswith("layer.")}
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_eagle(model: MTPModel, partial: Path, eos_id: int, pad_id: int) -> None:
    """The target model in ``partial`` and its EAGLE-1 drafts in ``eagle-vllm/``,
    ``eagle-sglang/`` beside its files."""
    if model.mtp is None:
        raise CheckpointError("--format eagle writes depth 1 as a draft: this model has none")
    _block_of(model, "eagle", "eagle")
    for engine in ("vllm", "sglang"):
        folder = partial / f"eagle-{engine}"
        folder.mkdir()
        config = _draft_config(model, eos_id, pad_id, engine)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(eagle_draft(model, engine), str(folder / "model.safetensors"))


def _write_target(model: MTPModel, partial: Path, eos_id: int, pad_id: int) -> None:
    """The main model alone (no MTP keys: the engines' target loaders refuse strangers)."""
    decoder = model.decoder
    hf_model = llama_model(decoder, eos_id, pad_id) if isinstance(decoder, GPT) else decoder.model
    write_hf_model(hf_model, partial, {}, {})


def export_served(model: MTPModel, partial: Path, fmt: str, eos_id: int, pad_id: int) -> None:
    """Write ``model`` into ``partial`` in the serving export ``fmt`` (one of SERVE_FORMATS)."""
    if fmt == "mimo_mtp":
        export_mimo_mtp(model, partial, eos_id, pad_id)
    elif fmt == "eagle":
        _block_of(model, "eagle", "eagle")
        _draft_config(model, eos_id, pad_id, "vllm")  # refuses a model it cannot draft for
        _write_target(model, partial, eos_id, pad_id)
        export_eagle(model, partial, eos_id, pad_id)
    else:
        raise CheckpointError(f"unknown serving export {fmt!r}: choose one of {SERVE_FORMATS}")


def export_for_engine(model: MTPModel, tokenizer, out: str | Path, fmt: str) -> Path:
    """Write ``model`` and its tokenizer into the new folder ``out`` in the serving export
    ``fmt``, with :func:`~multitoken.hf.export.export_model`'s guarantees (everything checked
    first, written beside ``out`` and renamed when complete)."""
    out = Path(out)
    if fmt not in SERVE_FORMATS:
        raise CheckpointError(f"unknown serving export {fmt!r}: choose one of {SERVE_FORMATS}")
    check_target(out)
    hf_tokenizer = tokenizer_folder(tokenizer)
    with staging(out) as partial:
        export_served(model, partial, fmt, tokenizer.eos_id, tokenizer.pad_id)
        hf_tokenizer.save_pretrained(partial)
    return out
