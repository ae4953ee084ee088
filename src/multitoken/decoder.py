"""What Multi-Token Prediction needs from a decoder, written down once
(docs/design.md#decoder-interface).

MTP sits on top of a decoder-only language model and needs only a few things from it: embed
token ids, run the main layers on a layout to the final normed hidden state ``h^0``, build a
layer of the same kind for each MTP depth (and a norm of the model's kind), the keyword
arguments those layers take for a layout (rotary tables, the attention mask, the key layout
under context parallelism), and the output-head weight. :class:`Decoder` is that contract.

The reference :class:`~multitoken.models.GPT` implements it; an adapter for a Hugging Face
model implements it the same way. :class:`~multitoken.mtp.MultiTokenPredictor`,
:class:`~multitoken.mtp_model.MTPModel`, the loss, context parallelism and decoding use nothing
else, so they work on any decoder that does.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from multitoken.layout import SequenceLayout

__all__ = ["Decoder", "KVCache"]


@runtime_checkable
class KVCache(Protocol):
    """One layer's key/value cache as decoding drives it (opaque otherwise)."""

    @property
    def length(self) -> int:
        """Positions cached."""
        ...

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        ...


@runtime_checkable
class Decoder(Protocol):
    """A decoder-only language model, as MTP sees it.

    Attributes:
        hidden_size: H, the width of ``h^0`` and of every MTP depth.
        vocab_size: V, the rows of :attr:`head_weight`.
        max_seq_len: the longest position the decoder's rotary table (or equivalent) covers.
        num_layers: main layers (one :class:`KVCache` each when decoding).

    Example (what :class:`~multitoken.mtp_model.MTPModel` does with a decoder)::

        kwargs = decoder.layer_kwargs(layout)                    # rotary tables, mask
        h0 = decoder.hidden(input_ids, kwargs)                   # (B, T, H), after the norm
        layer = decoder.make_mtp_layer(1)                        # same kind as the main layers
        h1 = layer(x, **kwargs)                                  # (B, T, H)
        logits = h0 @ decoder.head_weight.T                      # (B, T, V)
    """

    hidden_size: int
    vocab_size: int
    max_seq_len: int
    num_layers: int

    @property
    def head_weight(self) -> Tensor:
        """``[V, H]`` output-head weight, shared by every MTP depth."""
        ...

    def embed(self, input_ids: Tensor) -> Tensor:
        """``[B, T, H]`` embeddings of ``[B, T]`` token ids (the embedding MTP shares)."""
        ...

    def layer_kwargs(
        self,
        layout: SequenceLayout,
        kv_layout: SequenceLayout | None = None,
        *,
        decoding: bool = False,
    ) -> dict[str, Any]:
        """Keyword arguments every layer (main and MTP) takes for this batch.

        Args:
            layout: the queries' layout (positions restart in every document).
            kv_layout: the keys' layout when it differs: keys gathered over the CP group, or
                the cached prefix plus the new tokens when decoding.
            decoding: built for incremental decoding (small, ever-changing shapes).
        """
        ...

    def hidden(
        self,
        input_ids: Tensor,
        layer_kwargs: dict[str, Any],
        caches: list[Any] | None = None,
    ) -> Tensor:
        """``h^0 [B, T, H]``: the main layers and the final norm (the head's input).

        Args:
            input_ids: ``[B, T]`` token ids.
            layer_kwargs: from :meth:`layer_kwargs`.
            caches: one cache per main layer (from :meth:`new_kv_cache`) to append to.
        """
        ...

    def make_mtp_layer(self, k: int) -> nn.Module:
        """A fresh layer for MTP depth ``k`` (1..D), called as ``layer(x, **layer_kwargs)``
        (plus ``cache=`` when decoding)."""
        ...

    def make_norm(self) -> nn.Module:
        """A fresh norm of the decoder's kind over H (the MTP depths' four norms)."""
        ...

    def new_kv_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for one layer, holding up to ``capacity`` positions."""
        ...
