"""Released MTP weight formats, in and out, by the names the serving engines load
(docs/design.md#weight-formats).

* ``deepseek`` (DeepSeek-V3/R1, GLM-4.5): ``model.layers.{L+k}.{enorm, hnorm, eh_proj,
  shared_head.norm}`` + the block, and per-depth copies ``embed_tokens``, ``shared_head.head``;
  ``[emb; hidden]``; config ``num_nextn_predict_layers``.
* ``qwen3_next`` (Qwen3-Next / 3.5): ``mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden,
  norm}``, ``mtp.layers.0.*``; zero-centred norms (stored ``w - 1``); one depth;
  ``[emb; hidden]``; config ``mtp_num_hidden_layers``.
* ``mimo`` (MiMo): ``model.mtp_layers.{k}.{token_layernorm, hidden_layernorm, input_proj,
  final_layernorm}`` + the block; ``[hidden; emb]``; config ``num_nextn_predict_layers``.

(k counts depths from 0; L is the main model's number of layers.)

Inside multitoken a depth is the canonical dict ``{enorm, hnorm, eh_proj, final_norm}.weight`` +
``layer.<the HF decoder layer's own keys>`` (``MTPDepth``'s state dict on an HF decoder), in the
model's concatenation order. Converting between orders swaps the two column halves of
``eh_proj`` (exact). Every conversion is a renaming, a column swap or, for zero-centred norms,
``w -> w - 1`` checked to be exact, so load then save gives back the same bits; a key that no
format expects, or one that a format needs and is missing, is an error listing the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from multitoken.errors import CheckpointError

__all__ = ["FORMATS", "CONFIG_KEYS", "detect_format", "to_format", "from_format"]

FORMATS = ("deepseek", "qwen3_next", "mimo")
CONFIG_KEYS = {
    "deepseek": "num_nextn_predict_layers",
    "qwen3_next": "mtp_num_hidden_layers",
    "mimo": "num_nextn_predict_layers",
}
_HIDDEN_FIRST = {"deepseek": False, "qwen3_next": False, "mimo": True}
_HEAD_NAMES = {  # canonical -> format name, per format (the block keeps its own names)
    "deepseek": {
        "enorm.weight": "enorm.weight",
        "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight",
        "final_norm.weight": "shared_head.norm.weight",
    },
    "qwen3_next": {
        "enorm.weight": "pre_fc_norm_embedding.weight",
        "hnorm.weight": "pre_fc_norm_hidden.weight",
        "eh_proj.weight": "fc.weight",
        "final_norm.weight": "norm.weight",
    },
    "mimo": {
        "enorm.weight": "token_layernorm.weight",
        "hnorm.weight": "hidden_layernorm.weight",
        "eh_proj.weight": "input_proj.weight",
        "final_norm.weight": "final_layernorm.weight",
    },
}
# Where each format's MTP keys live; group 1 is the depth's prefix index where there is one.
_PATTERNS = {
    "deepseek": re.compile(r"model\.layers\.(\d+)\.(enorm|hnorm|eh_proj|shared_head)\."),
    "qwen3_next": re.compile(r"mtp\."),
    "mimo": re.compile(r"model\.mtp_layers\.(\d+)\."),
}
_NORM = re.compile(r"(^|\.)(\w*norm\w*)\.weight$")


def _prefix(fmt: str, num_layers: int, k: int) -> str:
    if fmt == "deepseek":
        return f"model.layers.{num_layers + k}."
    if fmt == "mimo":
        return f"model.mtp_layers.{k}."
    return "mtp."


def _name(fmt: str, canonical: str) -> str:
    """A canonical depth key's name inside the format's prefix."""
    if canonical in _HEAD_NAMES[fmt]:
        return _HEAD_NAMES[fmt][canonical]
    block_key = canonical.removeprefix("layer.")
    return f"layers.0.{block_key}" if fmt == "qwen3_next" else block_key


def _swap_halves(weight: Tensor) -> Tensor:
    half = weight.shape[1] // 2
    return torch.cat([weight[:, half:], weight[:, :half]], dim=1)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown MTP weight format {fmt!r}: choose one of {FORMATS}")


def _norm_shift(fmt: str, zero_centred: bool) -> bool:
    """Whether norm weights move by 1 between the model and ``fmt``: only a model with plain
    norms in the zero-centred qwen3_next format; a zero-centred model (Qwen3-Next) keeps its
    own format, whose norms are its own."""
    if zero_centred and fmt != "qwen3_next":
        raise CheckpointError(
            f"this model's norms are zero-centred (1 + w): its MTP weights go in the qwen3_next "
            f"format, not {fmt}"
        )
    return fmt == "qwen3_next" and not zero_centred


def _shift_norm(name: str, value: Tensor, delta: float) -> Tensor:
    """``value + delta`` for a zero-centred norm, refused where float rounding would lose bits."""
    moved = value + delta
    if not torch.equal(moved - delta, value):
        raise CheckpointError(
            f"{name}: converting between zero-centred (1 + w) and plain norm weights is not "
            "exact for these values: load this format into a model with zero-centred norms"
        )
    return moved


def to_format(
    depths: list[dict[str, Tensor]],
    fmt: str,
    *,
    num_layers: int,
    hidden_first: bool,
    embed: Tensor | None = None,
    head: Tensor | None = None,
    zero_centred: bool = False,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The MTP tensors of a checkpoint in ``fmt``, and the config.json entries that go with them.

    Args:
        depths: one canonical dict per depth (depth 1 first).
        fmt: one of :data:`FORMATS`.
        num_layers: L, the main model's layers (DeepSeek numbers MTP layers after them).
        hidden_first: the concatenation order of ``depths``' ``eh_proj``.
        embed, head: the shared embedding and head (DeepSeek stores a copy per depth).
        zero_centred: the model's norms are zero-centred already (Qwen3-Next's own).
    """
    _check_format(fmt)
    shift = _norm_shift(fmt, zero_centred)
    if fmt == "qwen3_next" and len(depths) != 1:
        raise CheckpointError(
            f"the qwen3_next MTP format holds one depth, the model has {len(depths)}: export "
            "with --format deepseek or mimo, or train with mtp.num_depths=1"
        )
    out: dict[str, Tensor] = {}
    for k, state in enumerate(depths):
        prefix = _prefix(fmt, num_layers, k)
        for canonical, value in state.items():
            if canonical == "eh_proj.weight" and hidden_first != _HIDDEN_FIRST[fmt]:
                value = _swap_halves(value)
            name = prefix + _name(fmt, canonical)
            if shift and _NORM.search(canonical):
                value = _shift_norm(name, value, -1.0)
            out[name] = value.detach().clone().contiguous()
        if fmt == "deepseek":
            if embed is None or head is None:
                raise CheckpointError("the deepseek format stores the embedding and head per depth")
            out[prefix + "embed_tokens.weight"] = embed.detach().clone().contiguous()
            out[prefix + "shared_head.head.weight"] = head.detach().clone().contiguous()
    return out, {CONFIG_KEYS[fmt]: 1 if fmt == "qwen3_next" else len(depths)}


def detect_format(keys: Iterable[str], config: dict) -> str | None:
    """The one format all of ``keys`` (the checkpoint's non-backbone keys) belong to.

    Returns None when there are no such keys. Raises :class:`CheckpointError` listing the keys
    that match no format, or when they mix formats.
    """
    keys = sorted(keys)
    if not keys:
        return None
    found = {fmt: [k for k in keys if pattern.match(k)] for fmt, pattern in _PATTERNS.items()}
    # A deepseek depth's block keys (model.layers.{L+k}.self_attn...) match no head pattern:
    # they belong to deepseek when a deepseek head key with the same layer index exists.
    deepseek_layers = {
        m.group(1) for k in found["deepseek"] if (m := _PATTERNS["deepseek"].match(k))
    }
    for key in keys:
        match = re.match(r"model\.layers\.(\d+)\.", key)
        if match and match.group(1) in deepseek_layers and key not in found["deepseek"]:
            found["deepseek"].append(key)
    formats = [fmt for fmt, matched in found.items() if matched]
    unknown = [k for k in keys if not any(k in matched for matched in found.values())]
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} checkpoint key(s) belong to neither the model nor any MTP format "
            f"({', '.join(FORMATS)}): {', '.join(unknown[:20])}"
        )
    if len(formats) > 1:
        raise CheckpointError(f"the checkpoint mixes MTP formats {formats}: keep one")
    fmt = formats[0]
    if CONFIG_KEYS[fmt] not in config:
        raise CheckpointError(
            f"the checkpoint holds {fmt} MTP keys but config.json has no {CONFIG_KEYS[fmt]}: "
            f"these are MTP keys of another format than the config describes ({keys[0]}, ...)"
        )
    return fmt


def from_format(
    tensors: dict[str, Tensor],
    fmt: str,
    *,
    template: list[dict[str, Tensor]],
    num_layers: int,
    hidden_first: bool,
    embed: Tensor | None = None,
    head: Tensor | None = None,
    zero_centred: bool = False,
) -> list[dict[str, Tensor]]:
    """The canonical per-depth dicts of the MTP tensors ``tensors`` (exactly ``fmt``'s keys).

    Args:
        tensors: the checkpoint's MTP tensors (no backbone keys).
        fmt: their format.
        template: the model's own canonical depth dicts (names and shapes to fill).
        num_layers: L.
        hidden_first: the model's concatenation order.
        embed, head: the model's shared embedding and head (DeepSeek's copies must equal them).
        zero_centred: the model's norms are zero-centred already (Qwen3-Next's own).

    Raises:
        CheckpointError: listing missing and unexpected keys, or a shape that does not fit.
    """
    _check_format(fmt)
    shift = _norm_shift(fmt, zero_centred)
    if fmt == "qwen3_next" and len(template) != 1:
        raise CheckpointError(
            f"the qwen3_next MTP format holds one depth, the model has {len(template)}: "
            "set mtp.num_depths=1"
        )
    expected = set()
    for k, state in enumerate(template):
        prefix = _prefix(fmt, num_layers, k)
        expected |= {prefix + _name(fmt, canonical) for canonical in state}
        if fmt == "deepseek":
            expected |= {prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{fmt} MTP weights do not fit a model with {len(template)} depth(s) on {num_layers} "
            f"layers: missing {missing[:20] or 'none'}; unexpected {unexpected[:20] or 'none'}"
        )
    depths = []
    for k, state in enumerate(template):
        prefix = _prefix(fmt, num_layers, k)
        out = {}
        for canonical, like in state.items():
            name = prefix + _name(fmt, canonical)
            value = tensors[name]
            if value.shape != like.shape:
                raise CheckpointError(
                    f"{name} has shape {tuple(value.shape)}, the model needs {tuple(like.shape)}"
                )
            if shift and _NORM.search(canonical):
                value = _shift_norm(name, value, 1.0)
            if canonical == "eh_proj.weight" and hidden_first != _HIDDEN_FIRST[fmt]:
                value = _swap_halves(value)
            out[canonical] = value
        if fmt == "deepseek":
            for name, shared in (("embed_tokens.weight", embed), ("shared_head.head.weight", head)):
                if not torch.equal(tensors[prefix + name].to(shared.dtype), shared):
                    raise CheckpointError(
                        f"{prefix + name} differs from the main model's: multitoken shares the "
                        "embedding and head between the model and its MTP depths"
                    )
        depths.append(out)
    return depths
