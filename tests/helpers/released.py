"""Tiny model folders in a released MTP layout, written independently of multitoken's exporter.

DeepSeek-V3/R1 and GLM-4.5/4.6 ship their MTP module as decoder layer ``num_hidden_layers + k``
of the checkpoint, next to the depth's own tensors::

    model.layers.{L+k}.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head,
                         embed_tokens}.weight   + the full decoder layer (attention, MoE)

with ``num_nextn_predict_layers = D`` in config.json. :func:`save_released` writes such a
folder: the blocks are layers L..L+D-1 of a transformers model of L + D layers, saved by
transformers' own ``save_pretrained`` (so the block's names are the ones transformers writes
and reads: one tensor per expert), and config.json then says L layers, D MTP layers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from multitoken.testing.tiny_hf import tiny_model

HEAD_NAMES = ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens")


def released_tensors(model_type: str, num_layers: int, depths: int, seed: int = 0, **overrides):
    """``(tensors, config)``: a whole checkpoint of a tiny ``model_type`` with ``num_layers``
    main layers and ``depths`` MTP layers in the DeepSeek/GLM layout."""
    model = tiny_model(model_type, seed, num_hidden_layers=num_layers + depths, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = load_file(str(Path(tmp) / "model.safetensors"))
        config = json.loads((Path(tmp) / "config.json").read_text())
    hidden = config["hidden_size"]
    gen = torch.Generator().manual_seed(seed + 11)
    for k in range(depths):
        prefix = f"model.layers.{num_layers + k}."
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            tensors[f"{prefix}{norm}.weight"] = 0.75 + 0.5 * torch.rand(hidden, generator=gen)
        projection = 0.05 * torch.randn(hidden, 2 * hidden, generator=gen)
        tensors[f"{prefix}eh_proj.weight"] = projection
        tensors[f"{prefix}embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"{prefix}shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    config.update(num_hidden_layers=num_layers, num_nextn_predict_layers=depths)
    config.pop("layer_types", None)  # sized for L + D layers; transformers rebuilds it
    return tensors, config


def save_released(
    model_type: str, folder: str | Path, num_layers: int = 2, depths: int = 1, seed: int = 0, **kw
) -> Path:
    """Write :func:`released_tensors` as a model folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, config = released_tensors(model_type, num_layers, depths, seed, **kw)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def save_released_qwen3_next(
    folder: str | Path, num_layers: int = 2, seed: int = 0, model_type: str = "qwen3_next"
) -> Path:
    """A tiny Qwen3-Next (or Qwen3.5 text: ``model_type="qwen3_5_text"``) folder with its MTP
    module as released: ``mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm}.weight``
    (zero-centred norms, stored as the model holds them) and the block under ``mtp.layers.0.``
    (layer L of a transformers model of L + 1 layers: a full-attention layer, MoE for Qwen3-Next,
    dense for Qwen3.5); ``mtp_num_hidden_layers = 1``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    types = ["linear_attention", "full_attention"] * (num_layers // 2) + ["full_attention"]
    model = tiny_model(model_type, seed, num_hidden_layers=num_layers + 1, layer_types=types)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = load_file(str(Path(tmp) / "model.safetensors"))
        config = json.loads((Path(tmp) / "config.json").read_text())
    block = f"model.layers.{num_layers}."
    tensors = {
        ("mtp.layers.0." + k.removeprefix(block)) if k.startswith(block) else k: v
        for k, v in saved.items()
    }
    hidden = config["hidden_size"]
    gen = torch.Generator().manual_seed(seed + 11)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        tensors[f"mtp.{norm}.weight"] = 0.1 * torch.randn(hidden, generator=gen)
    tensors["mtp.fc.weight"] = 0.05 * torch.randn(hidden, 2 * hidden, generator=gen)
    config.update(num_hidden_layers=num_layers, layer_types=types[:num_layers])
    config["mtp_num_hidden_layers"] = 1
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def save_released_qwen3_5(folder: str | Path, text_folder: str | Path, vision: bool = True) -> Path:
    """A tiny Qwen3.5 folder as released (``Qwen3_5ForConditionalGeneration``) holding the text
    model of ``text_folder`` (a :func:`save_released_qwen3_next` folder of ``qwen3_5_text``):
    config.json with the text config under ``text_config``, the text model under
    ``model.language_model.*``, ``lm_head.weight`` and ``mtp.*`` as they are, and (``vision``) a
    tiny vision tower under ``model.visual.*`` written by transformers' own ``save_pretrained``."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    folder, text_folder = Path(folder), Path(text_folder)
    text = json.loads((text_folder / "config.json").read_text())
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                         out_hidden_size=text["hidden_size"], num_position_embeddings=16,
                         patch_size=2)  # fmt: skip
    text_config = {
        k: v for k, v in text.items() if k not in ("architectures", "transformers_version")
    }
    torch.manual_seed(3)
    config = Qwen3_5Config(text_config=text_config, vision_config=vision_config)
    Qwen3_5ForConditionalGeneration(config).save_pretrained(folder)
    saved = load_file(str(folder / "model.safetensors"))
    tensors = {k: v for k, v in saved.items() if vision and k.startswith("model.visual.")}
    for key, value in load_file(str(text_folder / "model.safetensors")).items():
        is_text = key.startswith("model.")
        tensors["model.language_model." + key.removeprefix("model.") if is_text else key] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
