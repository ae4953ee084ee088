"""A released multimodal folder read as its text model (Qwen3.5: docs/hf.md#qwen35).

Qwen3.5 ships as ``Qwen3_5ForConditionalGeneration`` (``model_type`` ``qwen3_5``, or
``qwen3_5_moe``): ``config.json`` holds the text model's config under ``text_config``, the
weights hold the text model under ``model.language_model.*``, the vision tower under
``model.visual.*``, the head as ``lm_head.weight`` and the MTP module as ``mtp.*``. transformers
itself loads such a folder with ``AutoModelForCausalLM`` as the text model
(``Qwen3_5ForCausalLM``: its conversion mapping drops ``language_model.``, its
``_keys_to_ignore_on_load_unexpected`` the vision tower and the MTP keys).

The folder's gate sees the same: :func:`text_config` is the config a text-only folder would
hold, :func:`text_names` the tensors under the text model's names (as transformers, also in a
text-only Qwen3.5 folder: ``save_pretrained`` of a text model loaded from a multimodal folder
writes ``model.language_model.*``). The vision tower is never read (its headers are checked like
every other tensor's); a text-only folder that holds one is refused, since its config says
nothing of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitoken.errors import ConfigError

__all__ = ["MULTIMODAL_TYPES", "text_config", "text_names"]

# Multimodal model type -> the model type of its text model (what the adapter drives).
MULTIMODAL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
_TEXT = "model.language_model."
_VISION = "model.visual."


def text_config(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` itself, or for a multimodal ``config.json`` its text model's config."""
    model_type = config.get("model_type")
    if model_type not in MULTIMODAL_TYPES:
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(
            f"{path} is a {model_type} (multimodal) config.json without a text_config object: "
            "the text model's sizes cannot be known; use the folder as released"
        )
    out = dict(text)
    out["model_type"] = MULTIMODAL_TYPES[model_type]
    # transformers' Qwen3_5Config keeps the (untied) head flag at the top level too.
    out.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return out


def text_names(path: Path, config: dict[str, Any], names) -> dict[str, str | None]:
    """The stored tensor names that are not the text model's own: stored name -> its name in
    the text model (``model.language_model.X`` -> ``model.X``), or None for the vision tower
    (never read). Names not listed are the same in both.

    Raises:
        ConfigError: vision-tower tensors in a text-only folder; a text tensor stored under
            both names.
    """
    model_type = config.get("model_type")
    multimodal = model_type in MULTIMODAL_TYPES
    vision = sorted(name for name in names if name.startswith(_VISION))
    if vision and not multimodal:
        raise ConfigError(
            f"{path} holds vision-tower tensors ({vision[0]}, ... {len(vision)} in all) but its "
            f"config.json is a text-only {config.get('model_type')!r}: the folder mixes a "
            "multimodal checkpoint with a text config; use the released config.json "
            "(Qwen3_5ForConditionalGeneration, whose text model is read) or drop model.visual.*"
        )
    if model_type not in (*MULTIMODAL_TYPES, *MULTIMODAL_TYPES.values()):
        return {}
    out: dict[str, str | None] = dict.fromkeys(vision)
    for name in names:
        if name.startswith(_TEXT):
            out[name] = "model." + name.removeprefix(_TEXT)
    clash = sorted(set(out.values()) & set(names))
    if clash:
        raise ConfigError(
            f"{path} holds {clash[0]!r} both as itself and under {_TEXT}: keep one copy"
        )
    return out
