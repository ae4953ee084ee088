"""A decoder layer's tensors between the model's names and the checkpoint's, by transformers'
own conversion mapping (docs/hf.md#weight-formats).

transformers 5 holds some weights differently from the checkpoints it reads and writes: the
routed experts of an MoE layer (DeepSeek-V3, GLM-4.5, Qwen3-MoE) are one stacked
``mlp.experts.gate_up_proj [E, 2I, H]`` and ``mlp.experts.down_proj [E, H, I]`` in the model,
and ``mlp.experts.{e}.{gate,up,down}_proj.weight`` per expert in every released checkpoint.
``from_pretrained`` and ``save_pretrained`` convert between the two with the model type's
``WeightConverter`` list (``transformers.conversion_mapping``). An MTP block is a decoder layer
that transformers never loads itself, so :mod:`multitoken.hf.weights` converts its tensors here,
with the same list: stacking and splitting copy values, so the round trip is bit-exact. Dense
architectures have no conversion and pass through unchanged.
"""

from __future__ import annotations

from copy import deepcopy

from torch import Tensor, nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from multitoken.errors import CheckpointError

__all__ = ["to_checkpoint_names", "to_model_names"]


def _conversions(model: nn.Module, reverse: bool) -> tuple[list, list]:
    """The model type's renamings and converters (no prefix changes: the keys handed in are
    relative to a layer), reversed for saving."""
    transforms = [
        t
        for t in get_model_conversion_mapping(model, add_legacy=False)
        if not isinstance(t, PrefixChange)
    ]
    if reverse:
        transforms = [t.reverse_transform() for t in transforms[::-1]]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _convert(model: nn.Module, tensors: dict[str, Tensor], reverse: bool) -> dict[str, Tensor]:
    renamings, converters = _conversions(model, reverse)
    if not renamings and not converters:
        return dict(tensors)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, WeightRenaming | WeightConverter] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed, pattern = rename_source_key(key, renamings, converters, reverse=reverse)
        if pattern is not None:
            mapping = pending.setdefault(renamed, deepcopy(by_pattern[pattern]))
        else:
            mapping = pending.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        mapping.add_tensor(renamed, key, pattern, tensor)
    out: dict[str, Tensor] = {}
    for first, mapping in pending.items():
        for name, value in mapping.convert(first, model=model, config=model.config).items():
            value = value[0] if isinstance(value, list) else value
            if reverse and isinstance(mapping, WeightConverter):
                for renaming in renamings:
                    name, _ = renaming.rename_source_key(name)
            out[name] = value.contiguous()
    return out


def to_checkpoint_names(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` (a decoder layer's state, any key prefix) under the names and shapes the
    model type's checkpoints use (``model`` is the transformers model the layer belongs to)."""
    return _convert(model, tensors, reverse=True)


def to_model_names(
    model: nn.Module, tensors: dict[str, Tensor], expected: set[str]
) -> dict[str, Tensor]:
    """The inverse of :func:`to_checkpoint_names`: checkpoint tensors under the model's names,
    which must be exactly ``expected`` (else a :class:`CheckpointError` listing the keys)."""
    try:
        out = _convert(model, tensors, reverse=False)
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        reason = f"MTP block tensors do not convert to the model's layout: {err}"
        raise CheckpointError(reason) from None
    missing, unexpected = sorted(expected - set(out)), sorted(set(out) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"MTP block tensors do not fit the model's layer: missing {missing[:20] or 'none'}; "
            f"unexpected {unexpected[:20] or 'none'}"
        )
    return out
