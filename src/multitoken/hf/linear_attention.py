"""Linear-attention layers restarted at every document (Qwen3-Next's and Qwen3.5's gated
DeltaNet).

A linear-attention layer carries state along the row: a recurrent state and a short causal
convolution window. transformers passes ``cu_seq_lens_q`` to its kernels, but its torch
implementations (the only ones on a CPU, the fallback everywhere else) ignore it, so through
transformers a packed row leaks one document's state into the next, and no attention mask can
stop that (docs/hf.md#qwen3-next-linear-attention-restarted-at-documents).

:func:`restart_at_documents` makes each such module of a model run every document of a row as
its own sequence when it is handed an :class:`~multitoken.hf.attention.HFAttentionMask`: the
recurrence and the convolution window both start from zero at the document's first token,
exactly as for the document alone. The module's parameters and names are untouched (its
``forward`` is wrapped on the instance); called by transformers itself (no mask object), it is
the module it was.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multitoken.errors import ConfigError
from multitoken.hf.attention import HFAttentionMask

__all__ = ["LINEAR_ATTENTION_TYPES", "restart_at_documents", "is_linear_attention"]

# The supported model types with linear-attention layers (no multitoken cache, no CP).
LINEAR_ATTENTION_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")


def is_linear_attention(module: nn.Module) -> bool:
    """A transformers linear-attention (gated DeltaNet) module."""
    return type(module).__name__.endswith("GatedDeltaNet")


class _PerDocument:
    """``forward`` of a linear-attention module, run document by document under a layout."""

    def __init__(self, module: nn.Module):
        self.forward = type(module).forward.__get__(module)

    def __call__(self, hidden_states: Tensor, cache=None, attention_mask=None, **kwargs) -> Tensor:
        if not isinstance(attention_mask, HFAttentionMask):
            return self.forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        rule = attention_mask.rule
        if cache is not None or rule.kv is not rule.q:
            raise ConfigError(
                "a linear-attention layer (Qwen3-Next, Qwen3.5) carries a recurrent state that "
                "is neither cached nor gathered across ranks here: decode it with transformers, "
                "and train it with parallel.cp=1"
            )
        if rule.mode == "causal":
            return self.forward(hidden_states, **kwargs)
        rows = []
        for row, docs in enumerate(rule.q.doc_ids):  # docs: (T,)
            cuts = ((docs[1:] != docs[:-1]).nonzero().flatten() + 1).tolist()
            bounds = [0, *cuts, len(docs)]
            parts = [
                self.forward(hidden_states[row : row + 1, begin:end], **kwargs)  # (1, n, H)
                for begin, end in zip(bounds[:-1], bounds[1:])
            ]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)  # (B, T, H)


def restart_at_documents(model: nn.Module) -> int:
    """Wrap every linear-attention module under ``model`` (idempotent); returns how many."""
    found = 0
    for module in model.modules():
        if is_linear_attention(module):
            if not isinstance(module.__dict__.get("forward"), _PerDocument):
                module.forward = _PerDocument(module)
            found += 1
    return found
