"""The key/value cache of one attention layer, for incremental decoding.

A :class:`LayerKVCache` is a preallocated (static) buffer of one attention layer's rotated
keys and values; :meth:`LayerKVCache.truncate` rolls it back and zeroes what it drops, so a
rejected speculative draft leaves no trace. The decoding driver that owns one cache per layer
is :class:`multitoken.decoding.state.DecodeState`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.errors import InputError

__all__ = ["LayerKVCache"]


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
            raise InputError(
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
            raise InputError(f"cannot truncate a cache of {self.length} positions to {length}")
        # Zeroing is not needed for correctness (attention only reads [:length]) but makes
        # "a rolled-back cache equals a cache that never saw the drafts" checkable bit for bit.
        self.k[:, :, length : self.length] = 0
        self.v[:, :, length : self.length] = 0
        self.length = length
