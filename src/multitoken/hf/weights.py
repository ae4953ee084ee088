"""An HF model folder with MTP weights: load it into an :class:`MTPModel`, save one back.

``AutoModelForCausalLM.from_pretrained`` drops keys its class does not know (the MTP weights
of every released format) with a warning. Here the folder's safetensors are read directly, the
keys that are not the backbone's are matched to exactly one format
(:func:`multitoken.hf.formats.detect_format`) and every one of them is loaded, or the load
fails listing them: never a silent drop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.core_model_loading import PrefixChange
from transformers.utils import logging as hf_logging

from multitoken.errors import CheckpointError
from multitoken.hf.adapter import HFDecoder, init_mtp_weights, read_config
from multitoken.hf.block_names import to_checkpoint_names, to_model_names
from multitoken.hf.engine_blocks import implied_config
from multitoken.hf.folder import check_model_folder
from multitoken.hf.formats import CONFIG_KEYS, detect_format, from_format, to_format
from multitoken.mtp import MTPConfig, MultiTokenPredictor
from multitoken.mtp_model import MTPModel

__all__ = [
    "read_tensors",
    "checkpoint_keys",
    "depth_states",
    "load_mtp_weights",
    "load_depth_weights",
    "mtp_tensors",
    "save_with_mtp",
    "save_pretrained",
    "load_hf_mtp_model",
    "backbone_keys",
]

_WEIGHTS = "model.safetensors"


def checkpoint_keys(folder: str | Path) -> list[str]:
    """Every tensor name in the folder's safetensors (from their checked headers only)."""
    return list(check_model_folder(folder).tensors)


def read_tensors(folder: str | Path, keys: set[str] | None = None) -> dict[str, Tensor]:
    """The folder's tensors under the model's names (only ``keys`` when given; a multimodal
    folder's text model, its vision tower never read: :mod:`multitoken.hf.multimodal`)."""
    checked = check_model_folder(folder)
    out = {}
    for file in checked.weight_files:
        with safe_open(str(file), framework="pt") as handle:
            for stored in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                key = checked.model_name(stored)
                if key is not None and (keys is None or key in keys):
                    out[key] = handle.get_tensor(stored)
    return out


def depth_states(model: MTPModel) -> list[dict[str, Tensor]]:
    """The canonical per-depth dicts of ``model``'s MTP depths (depth 1 first)."""
    return [dict(module.state_dict()) for module in model.mtp.depths] if model.mtp else []


def _checkpoint_depths(
    hf_model: nn.Module, depths: list[dict[str, Tensor]]
) -> list[dict[str, Tensor]]:
    """Canonical depth dicts with the block (``layer.*``) under the checkpoint's names
    (:mod:`multitoken.hf.block_names`: per-expert MoE tensors)."""
    return [to_checkpoint_names(hf_model, state) for state in depths]


def zero_centred(hf_model: nn.Module) -> bool:
    """Whether the model's norms are zero-centred (``1 + w``: a fresh one holds zeros)."""
    norm = hf_model.model.norm
    fresh = type(norm)(4)
    return not bool(fresh.weight.detach().any())


def backbone_keys(hf_model: nn.Module) -> set[str]:
    """The checkpoint names of ``hf_model``'s own tensors (names only: converted on meta)."""
    state = {
        key: torch.empty(value.shape, dtype=value.dtype, device="meta")
        for key, value in hf_model.state_dict().items()
    }
    return set(to_checkpoint_names(hf_model, state))


def _shared(model: MTPModel) -> dict[str, Tensor]:
    return {"embed": model.decoder.base.embed_tokens.weight, "head": model.head_weight}


def load_mtp_weights(model: MTPModel, folder: str | Path) -> str | None:
    """Load the MTP weights ``folder`` carries into ``model``; returns their format (or None).

    Raises:
        CheckpointError: keys of no format or of several, a config.json that does not describe
            them, a depth count other than ``model.num_depths``, missing or unexpected keys.
    """
    hf_model = model.decoder.model
    return load_depth_weights(
        model.mtp, folder, hf_model, model.decoder.num_layers, lambda: _shared(model)
    )


def load_depth_weights(
    predictor: MultiTokenPredictor | None,
    folder: str | Path,
    hf_model: nn.Module,
    num_layers: int,
    shared: Callable[[], dict[str, Tensor]],
) -> str | None:
    """:func:`load_mtp_weights` into the depths alone: ``hf_model`` is the transformers model
    (its keys are the backbone's; on the meta device is fine), ``shared()`` gives its embedding
    and head (read only for the DeepSeek format's copies)."""
    folder = Path(folder)
    config = read_config(folder)
    extra = set(checkpoint_keys(folder)) - backbone_keys(hf_model)
    fmt = detect_format(extra, config)
    if fmt is None:
        return None
    stored = int(config[CONFIG_KEYS[fmt]]) if fmt != "qwen3_next" else 1
    num_depths = 0 if predictor is None else len(predictor.depths)
    if stored != num_depths:
        raise CheckpointError(
            f"{folder} holds {stored} MTP depth(s) ({fmt} format) but mtp.num_depths = "
            f"{num_depths}: set mtp.num_depths={stored}"
        )
    states = [dict(module.state_dict()) for module in predictor.depths]
    depths = from_format(
        read_tensors(folder, extra),
        fmt,
        template=_checkpoint_depths(hf_model, states),
        num_layers=num_layers,
        hidden_first=predictor.config.hidden_first,
        zero_centred=zero_centred(hf_model),
        **(shared() if fmt == "deepseek" else {}),
    )
    with torch.no_grad():
        for module, state, own in zip(predictor.depths, depths, states):
            module.load_state_dict(to_model_names(hf_model, state, set(own)), strict=True)
    return fmt


def mtp_tensors(model: MTPModel, fmt: str) -> tuple[dict[str, Tensor], dict[str, int]]:
    """``model``'s MTP weights in ``fmt`` and the config.json entries that describe them."""
    return to_format(
        _checkpoint_depths(model.decoder.model, depth_states(model)),
        fmt,
        num_layers=model.decoder.num_layers,
        hidden_first=model.config.hidden_first,
        zero_centred=zero_centred(model.decoder.model),
        **_shared(model),
    )


def save_with_mtp(
    folder: str | Path, tensors: dict[str, Tensor], config_entries: dict[str, object]
) -> None:
    """Add MTP ``tensors`` to a folder written by ``save_pretrained`` (one weights file or an
    index), and their ``config_entries`` to its config.json."""
    folder = Path(folder)
    index = folder / f"{_WEIGHTS}.index.json"
    if tensors and index.is_file():
        save_file(tensors, str(folder / "model-mtp.safetensors"), metadata={"format": "pt"})
        data = json.loads(index.read_text())
        data["weight_map"].update({key: "model-mtp.safetensors" for key in tensors})
        index.write_text(json.dumps(data, indent=2))
    elif tensors:
        merged = read_tensors(folder)
        clash = sorted(set(merged) & set(tensors))
        if clash:
            raise CheckpointError(f"MTP keys clash with the model's own: {clash[:10]}")
        save_file({**merged, **tensors}, str(folder / _WEIGHTS), metadata={"format": "pt"})
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.update(config_entries)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def save_pretrained(model: MTPModel, folder: str | Path, fmt: str) -> Path:
    """Write ``model`` (an HF decoder with MTP depths) as an HF folder, MTP weights in ``fmt``;
    config.json gains the fields the serving engines need that transformers does not write
    (:func:`~multitoken.hf.engine_blocks.implied_config`)."""
    folder = Path(folder)
    hf_model = model.decoder.model
    implied = implied_config(hf_model.config.to_dict())
    saved = hf_model.config._attn_implementation
    hf_model.config._attn_implementation = "sdpa"  # what a reader of the folder should get
    # transformers reverts at save what it converted at load; a text model read from a
    # multimodal folder (Qwen3.5) would be written back under model.language_model.*, with a
    # text config. The export is the text model's own layout: its prefix change is not reverted.
    conversions = getattr(hf_model, "_weight_conversions", None)
    if conversions:
        hf_model._weight_conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    hf_logging.disable_progress_bar()
    try:
        hf_model.save_pretrained(folder)
    finally:
        hf_model.config._attn_implementation = saved
        if conversions:
            hf_model._weight_conversions = conversions
        hf_logging.enable_progress_bar()
    tensors, entries = mtp_tensors(model, fmt) if model.mtp is not None else ({}, {})
    if tensors or implied:
        save_with_mtp(folder, tensors, entries | implied)
    return folder


def load_hf_mtp_model(
    path: str | Path,
    mtp: MTPConfig,
    *,
    pad_id: int = 0,
    implementation: str = "sdpa",
    attention: str = "document",
    seed: int = 0,
) -> MTPModel:
    """A local HF folder as an :class:`MTPModel` with ``mtp.num_depths`` depths.

    The depths come from the folder's MTP weights when it carries some (any format), else they
    are initialised as the model initialises its layers (seeded by ``seed``).
    """
    decoder = HFDecoder.from_pretrained(path, implementation, attention)
    torch.manual_seed(seed)
    model = MTPModel(decoder, mtp, pad_id=pad_id)
    init_mtp_weights(model)
    if mtp.num_depths:
        load_mtp_weights(model, path)
    else:
        extra = set(checkpoint_keys(path)) - backbone_keys(decoder.model)
        detect_format(extra, read_config(path))  # still refuse keys of no format
    return model
