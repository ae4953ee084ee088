"""Document masks for Hugging Face attention layers: a layout in, the model's own kernel out.

A transformers attention module calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the ``attention_mask`` its decoder layer was given, untouched. The adapter registers one
function, ``"multitoken"``, and hands every layer an :class:`HFAttentionMask`: the function turns
it into the mask format of the implementation the user asked for (a boolean ``[B, 1, Tq, Tk]``
for ``"sdpa"``, an additive float mask for ``"eager"``, a FlexAttention ``BlockMask`` for
``"flex_attention"``) and calls transformers' own function for it.

Why not let transformers build the mask from ``position_ids``: its packed-sequence detection is
switched off silently by any 2D attention mask, by ``use_cache=True`` and by rolled position ids
(docs/design.md#weight-formats). Here the mask comes from the
:class:`~multitoken.layout.SequenceLayout`
alone, so it cannot be switched off, and it carries the key layout under context parallelism
and when decoding with a cache, like the reference model's :class:`AttentionMask`.

Sliding windows follow transformers' rule (query i sees key j iff ``i - j < window``), applied
per layer from the ``sliding_window`` the attention module passes (Mistral: every layer; Qwen2/3:
the layers whose type is ``"sliding_attention"``).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from multitoken.errors import ConfigError, InputError
from multitoken.layout import SequenceLayout
from multitoken.models.attention import AttentionMask

__all__ = ["HFAttentionMask", "ATTENTION_NAME", "IMPLEMENTATIONS", "register"]

ATTENTION_NAME = "multitoken"
# The transformers implementations the mask can be handed to. Flash attention takes no mask
# (it needs cu_seqlens and fails open on a wrong guess), so it is refused rather than guessed.
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


class HFAttentionMask:
    """Who attends to whom in one forward, for every layer of an HF model (built once).

    Args:
        q_layout: the queries' layout ``[B, Tq]``.
        kv_layout: the keys' layout ``[B, Tk]`` (cached prefix + new tokens, or gathered over
            the CP group); None = ``q_layout``.
        mode: ``"document"`` (causal inside each document) or ``"causal"`` (across the row).
        implementation: one of :data:`IMPLEMENTATIONS`.
    """

    def __init__(
        self,
        q_layout: SequenceLayout,
        kv_layout: SequenceLayout | None,
        mode: str,
        implementation: str,
    ):
        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"attention implementation {implementation!r} cannot take a document mask: use "
                f"one of {IMPLEMENTATIONS}"
            )
        backend = "flex" if implementation == "flex_attention" else "sdpa"
        self.rule = AttentionMask(q_layout, kv_layout, mode, backend)
        self.implementation = implementation
        self._dense: dict[int | None, Tensor] = {}

    def dense(self, window: int | None = None) -> Tensor:
        """``[B, 1, Tq, Tk]`` boolean (True = attend), limited to ``window`` keys when set."""
        if window not in self._dense:
            allowed = self.rule.dense()
            if window is not None:
                q, kv = self.rule.q.seq_index, self.rule.kv.seq_index
                # Inside a document seq_index differences are position differences; across
                # documents (row-causal mode) they are the row distance, as transformers has it.
                allowed = allowed & ((q[:, :, None] - kv[:, None, :]) < window)[:, None]
            self._dense[window] = allowed
        return self._dense[window]

    def additive(self, window: int | None, dtype: torch.dtype) -> Tensor:
        """The same rule as an additive float mask (0 = attend, dtype minimum = blocked)."""
        allowed = self.dense(window)
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), blocked)


def _eager_of(module: nn.Module):
    # Each modeling file defines its own eager_attention_forward (some add softcapping or
    # sinks): take the one of the module's own file.
    return sys.modules[type(module).__module__].eager_attention_forward


def _gather_kv(gather, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """K and V gathered together: one all-gather (one reduce-scatter back) per layer. MLA's
    keys are wider than its values: the values travel zero-padded and are cut back after."""
    k_dim, v_dim = key.shape[-1], value.shape[-1]
    if k_dim == v_dim:
        return gather(torch.stack((key, value))).unbind(0)
    width = max(k_dim, v_dim)
    padded = [nn.functional.pad(t, (0, width - t.shape[-1])) for t in (key, value)]
    key, value = gather(torch.stack(padded)).unbind(0)
    return key[..., :k_dim], value[..., :v_dim]


def multitoken_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask,
    sliding_window: int | None = None,
    **kwargs,
):
    """The attention function registered as ``"multitoken"``.

    Args:
        module: the calling attention module (``kv_gather`` set on it under context
            parallelism).
        query: ``[B, H, Tq, d]``; key, value: ``[B, Hkv, Tk, d]`` (after the cache update).
        attention_mask: an :class:`HFAttentionMask`.
        sliding_window: the module's window, None = full attention.
        **kwargs: ``scaling``, ``dropout`` and the rest, passed on.

    Returns:
        transformers' ``(attn_output [B, Tq, H, d], attn_weights | None)``.
    """
    if not isinstance(attention_mask, HFAttentionMask):
        # The wrapped model called as a plain transformers model (its own forward, generate):
        # transformers built an sdpa-format mask for it (see register), so sdpa it is.
        if attention_mask is not None and not isinstance(attention_mask, Tensor):
            raise InputError(
                f"unexpected attention mask {type(attention_mask).__name__}: build a multitoken "
                "layer's keyword arguments with HFDecoder.layer_kwargs(layout)"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    gather = getattr(module, "kv_gather", None)
    if gather is not None:
        key, value = _gather_kv(gather, key, value)
    implementation = attention_mask.implementation
    if implementation == "flex_attention":
        if sliding_window is not None:
            raise ConfigError(
                "flex_attention with a sliding window is not wired up: use attention "
                "implementation sdpa for this model"
            )
        function = AttentionInterface._global_mapping["flex_attention"]
        mask = attention_mask.rule.block_mask()
    elif implementation == "eager":
        function = _eager_of(module)
        mask = attention_mask.additive(sliding_window, query.dtype)
    else:
        function = sdpa_attention_forward
        mask = attention_mask.dense(sliding_window)
    return function(module, query, key, value, mask, sliding_window=sliding_window, **kwargs)


def register() -> None:
    """Make ``"multitoken"`` a transformers attention implementation (idempotent).

    Its mask builder is sdpa's, so the wrapped model's own forward (and ``generate``) keeps
    working as a plain sdpa model when it is called without a layout.
    """
    AttentionInterface.register(ATTENTION_NAME, multitoken_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
