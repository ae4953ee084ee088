"""Key/value caches for incremental decoding, and the decoding state of one sequence.

A :class:`LayerKVCache` is a preallocated (static) buffer of one attention layer's rotated
keys and values; :meth:`LayerKVCache.truncate` rolls it back and zeroes what it drops, so a
rejected speculative draft leaves no trace.

A :class:`DecodeState` holds everything that decoding one sequence keeps: the committed
tokens, the main model's caches, and, for self-speculative decoding, one cache per MTP depth
plus the hidden states ``h^0 .. h^{D-1}`` that feed the next depth. The bookkeeping is the
MTP recurrence read position by position: depth k at position j needs ``h^{k-1}_j`` and the
token ``t_{j+k}``, so with ``L`` committed tokens the main model can be cached up to position
``L - 2`` (the last token is its next input) and depth k up to position ``L - 1 - k``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from multitoken.models.gpt import GPT

__all__ = ["LayerKVCache", "DecodeState"]


class LayerKVCache:
    """Rotated keys and values of one attention layer, ``[B, Hkv, capacity, d]`` each.

    Args:
        batch: rows B.
        n_kv_heads: key/value heads.
        head_dim: per-head size d.
        capacity: the most positions it can hold.
        device: where the buffers live.
        dtype: the model's dtype.

    Example::

        >>> cache = LayerKVCache(1, 2, 8, capacity=16)
        >>> k_all, v_all = cache.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
        >>> cache.length, tuple(k_all.shape)
        (3, (1, 2, 3, 8))
        >>> cache.truncate(1); cache.length
        1
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v [B, Hkv, T, d]``; return every cached key and value, new ones included."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"KV cache full: {self.length} + {k.shape[2]} positions exceed its capacity "
                f"{self.capacity}"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions; zero the dropped ones."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        # Zeroing is not needed for correctness (attention only reads [:length]) but makes
        # "a rolled-back cache equals a cache that never saw the drafts" checkable bit for bit.
        self.k[:, :, length : self.length] = 0
        self.v[:, :, length : self.length] = 0
        self.length = length


class DecodeState:
    """The caches and hidden states of one sequence being decoded (batch of one row).

    Invariants between steps, with ``L = len(tokens)``:

    * ``main[i].length == L - 1``: every committed token but the last went through the main
      model, and ``hidden[0][:, j]`` is ``h^0_j`` for ``j < L - 1``.
    * ``mtp[k-1].length <= L - 1 - k``: depth k at position j reads ``t_{j+k}``, and the last
      token ``t_{L-1}`` was at best a draft when the depths last ran. ``hidden[k][:, j]``
      (``k >= 1``) is ``h^k_j`` for every ``j`` depth k has cached. Depths catch up lazily,
      when they draft; everything past the kept lengths is zero.

    Args:
        model: the :class:`~multitoken.models.gpt.GPT`.
        capacity: the longest sequence (prompt plus new tokens) this state will hold.
        mtp_depths: how many MTP depths keep caches (0 for plain decoding).
    """

    def __init__(self, model: GPT, capacity: int, mtp_depths: int = 0):
        cfg = model.config
        param = model.tok_embeddings.weight
        head_dim = cfg.dim // cfg.n_heads

        def new_cache() -> LayerKVCache:
            return LayerKVCache(1, cfg.n_kv_heads, head_dim, capacity, param.device, param.dtype)

        self.model = model
        self.tokens: list[int] = []
        self.main = [new_cache() for _ in range(cfg.n_layers)]
        self.mtp = [new_cache() for _ in range(mtp_depths)]
        # hidden[k][:, j] = h^k_j, the hidden input of depth k + 1 at position j.
        self.hidden = torch.zeros(
            mtp_depths, 1, capacity, cfg.dim, device=param.device, dtype=param.dtype
        )
        self._hidden_end = [0] * mtp_depths  # one past the last position written, per depth

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _ids(self, ids: list[int]) -> Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)

    def forward_main(self, ids: list[int]) -> Tensor:
        """Run the main model on ``ids`` after the cached prefix; return ``h^0 [T, H]``."""
        start = self.main[0].length
        h0 = self.model.forward_cached(self._ids(ids), self.main)  # (1, T, H)
        if len(self.mtp):
            self.hidden[0, :, start : start + len(ids)] = h0
            self._hidden_end[0] = max(self._hidden_end[0], start + len(ids))
        return h0[0]

    def forward_depth(self, depth: int, tokens: list[int], end: int) -> Tensor:
        """Bring MTP depth ``depth`` up to position ``end - 1``; return ``h^depth [T, H]``.

        Args:
            depth: k in 1..D.
            tokens: the sequence the depth reads, committed tokens followed by the drafts of the
                shallower depths (position j reads ``tokens[j + depth]``).
            end: one past the last position to compute; ``h^{depth-1}`` must be known there.

        Returns:
            ``h^depth`` at the newly computed positions ``[cache.length, end)``.
        """
        cache = self.mtp[depth - 1]
        start = cache.length
        if end <= start:
            raise ValueError(f"MTP depth {depth} already holds positions up to {start - 1}")
        hidden = self.hidden[depth - 1, :, start:end]  # (1, T, H)
        ids = self._ids(tokens[start + depth : end + depth])
        out = self.model.mtp_forward_cached(depth, hidden, ids, cache)  # (1, T, H)
        if depth < len(self.mtp):
            self.hidden[depth, :, start:end] = out
            self._hidden_end[depth] = max(self._hidden_end[depth], end)
        return out[0]

    def commit(self, tokens: list[int], exact_upto: int) -> None:
        """Make ``tokens`` the committed sequence and roll back what no longer holds.

        Args:
            tokens: the committed sequence after this step (length ``L``).
            exact_upto: number of leading tokens of the sequence each cache was last computed
                from that equal ``tokens`` (the accepted prefix; the first rejected draft and
                everything after it differ or may differ).
        """
        self.tokens = list(tokens)
        length = len(tokens)
        for cache in self.main:
            cache.truncate(min(cache.length, length - 1, exact_upto))
        for k, cache in enumerate(self.mtp, start=1):
            # Position j of depth k read tokens up to j + k.
            cache.truncate(max(0, min(cache.length, length - 1 - k, exact_upto - k)))
        # Hidden states past what each cache keeps came from the same dropped inputs.
        kept = [self.main[0].length] + [cache.length for cache in self.mtp[:-1]]
        for k in range(len(self.mtp)):
            self.hidden[k, :, kept[k] : self._hidden_end[k]] = 0
            self._hidden_end[k] = min(self._hidden_end[k], kept[k])
