"""Document-causal attention: SDPA with a boolean mask (CPU), FlexAttention (CUDA).

The backend is chosen once per model (:func:`resolve_backend`): ``"auto"`` is FlexAttention on
CUDA when compiled FlexAttention runs there for the model's head size (a one-time probe:
Inductor's kernel refuses head sizes under 16, and without Triton it cannot compile at all), else
SDPA. FlexAttention always runs compiled (uncompiled it materialises the scores), whatever
``train.compile`` says about the layers; its block mask is built from per-block ranges of the
metadata (:mod:`multitoken.models.block_mask`), never from a ``[B, Tq, Tk]`` tensor.

The mask is a function of per-token metadata only (document id, position in the document,
index in the row), for the queries and for the keys separately. That is what makes it work
unchanged under context parallelism: the keys may come from every rank of the group (gathered
K and V) as long as their metadata comes with them.

* ``"document"``: query i sees key j iff they share a document and ``pos_j <= pos_i``.
* ``"causal"``: query i sees every earlier real token of its row (``seq_j <= seq_i``), across
  documents, as much packed pretraining does.

Tokens outside any document (``doc_id == -1``, padding added by sharding) see only other
padding (at most every padding token of their row), so they never contribute to a real token,
and they always see themselves, so no row has nothing to attend to (which would be NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

from multitoken.errors import ConfigError, LayoutError
from multitoken.layout import SequenceLayout
from multitoken.models.block_mask import document_block_mask
from multitoken.models.kv_cache import LayerKVCache

__all__ = [
    "AttentionMask",
    "Attention",
    "ATTENTION_MODES",
    "BACKENDS",
    "FLEX_MIN_HEAD_DIM",
    "resolve_backend",
    "flex_unavailable",
]

ATTENTION_MODES = ("document", "causal")
BACKENDS = ("auto", "sdpa", "flex")
FLEX_MIN_HEAD_DIM = 16  # Inductor's FlexAttention kernel refuses smaller heads


def resolve_backend(backend: str, device_type: str, head_dim: int | None = None) -> str:
    """``"flex"`` or ``"sdpa"``: the attention a model with heads of ``head_dim`` runs.

    ``"auto"`` is FlexAttention on CUDA when :func:`flex_unavailable` finds nothing against it
    (head size, compiler), else SDPA; an explicit ``"flex"`` still goes to SDPA for a head size
    FlexAttention cannot take. ``"sdpa"`` is SDPA.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    small = head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM
    if backend == "sdpa" or small:
        return "sdpa"
    if backend == "flex":
        return "flex"
    return (
        "flex"
        if device_type == "cuda" and flex_unavailable(device_type, head_dim) is None
        else "sdpa"
    )


@cache
def flex_unavailable(device_type: str, head_dim: int | None = None) -> str | None:
    """None when compiled FlexAttention runs forward and backward here, else why not (said
    once, on stderr). Cached: the probe compiles once per process and head size."""
    d = head_dim or 64
    try:
        q = torch.randn(1, 1, 128, d, device=device_type, requires_grad=True)
        layout = SequenceLayout.rows(1, 128, device=device_type)
        out = _compiled_flex()(
            q, q, q, block_mask=AttentionMask(layout, backend="flex").block_mask()
        )
        out.sum().backward()
    except Exception as err:  # any failure of the compiler or the kernel: SDPA
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"multitoken: FlexAttention cannot run here ({reason}): using SDPA", flush=True)
        return reason
    return None


class AttentionMask:
    """Who attends to whom in one forward, built once and shared by every layer.

    Args:
        q_layout: layout of the local queries ``[B, Tq]``.
        kv_layout: layout of the keys ``[B, Tk]``; defaults to ``q_layout`` (no sharding).
        mode: ``"document"`` or ``"causal"``.
        backend: ``"sdpa"``, ``"flex"`` or ``"auto"`` (:func:`resolve_backend` without a head
            size; models pass their resolved one).
    """

    def __init__(
        self,
        q_layout: SequenceLayout,
        kv_layout: SequenceLayout | None = None,
        mode: str = "document",
        backend: str = "auto",
    ):
        if mode not in ATTENTION_MODES:
            raise ConfigError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        kv_layout = q_layout if kv_layout is None else kv_layout
        if kv_layout.shape[0] != q_layout.shape[0]:
            raise LayoutError(
                f"key layout has {kv_layout.shape[0]} rows, query layout {q_layout.shape[0]}"
            )
        if backend == "auto":
            backend = resolve_backend(backend, q_layout.device.type)
        self.q, self.kv, self.mode, self.backend = q_layout, kv_layout, mode, backend
        self._dense: Tensor | None = None
        self._block = None

    def dense(self) -> Tensor:
        """``[B, 1, Tq, Tk]`` boolean mask (True = attend)."""
        if self._dense is None:
            q, kv = self.q, self.kv
            dq, dk = q.doc_ids[:, :, None], kv.doc_ids[:, None, :]
            allowed = (dq == dk) & (kv.positions[:, None, :] <= q.positions[:, :, None])
            if self.mode == "causal":
                real = (dq >= 0) & (dk >= 0)
                allowed |= real & (kv.seq_index[:, None, :] <= q.seq_index[:, :, None])
            self._dense = allowed[:, None]
        return self._dense

    def block_mask(self):
        """FlexAttention ``BlockMask`` with the same rule as :meth:`dense`."""
        if self._block is None:
            q, kv, causal = self.q, self.kv, self.mode == "causal"

            def mask_mod(b, h, qi, ki):
                dq, dk = q.doc_ids[b, qi], kv.doc_ids[b, ki]
                ok = (dq == dk) & (kv.positions[b, ki] <= q.positions[b, qi])
                if causal:
                    ok = ok | ((dq >= 0) & (dk >= 0) & (kv.seq_index[b, ki] <= q.seq_index[b, qi]))
                return ok

            self._block = document_block_mask(q, kv, causal, mask_mod)
        return self._block

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Masked ``softmax(q k^T / sqrt(d)) v``; q ``[B, H, Tq, d]``, k/v ``[B, Hkv, Tk, d]``."""
        gqa = k.shape[1] != q.shape[1]
        if self.backend == "flex" and q.shape[-1] >= FLEX_MIN_HEAD_DIM:
            return _compiled_flex()(q, k, v, block_mask=self.block_mask(), enable_gqa=gqa)
        if self.q.one_per_row and self.kv is self.q:
            # One document per row, keys = queries: the rule is plain causal attention, which
            # SDPA runs without materialising a [T, T] mask (and faster).
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense(), enable_gqa=gqa)


@cache
def _compiled_flex():
    # Uncompiled FlexAttention materialises the scores; compiled it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on ``x [B, H, T, d]`` with ``cos, sin [B, 1, T, d/2]`` (half-split)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads and rotary positions.

    ``kv_gather`` is the context-parallel hook: when set (by
    :func:`multitoken.parallel.apply_cp`), it maps the stacked local rotated keys and
    values ``[2, B, Hkv, T_local, d]`` to those of the whole row (sequence dim 3), and the
    :class:`AttentionMask` carries the matching key layout. The model never talks to other ranks.

    ``cache`` is the incremental-decoding hook (:mod:`multitoken.decoding`): the new rotated
    keys and values are appended to a :class:`~multitoken.models.kv_cache.LayerKVCache` and the
    queries attend over everything it holds; the mask then carries the cached key layout.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ConfigError(f"dim {dim} is not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads:
            raise ConfigError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.kv_gather: Callable[[Tensor], Tensor] | None = None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        batch, seqlen, _ = x.shape
        q = self.wq(x).view(batch, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, H, T, d), (B, Hkv, T, d)
        if self.kv_gather is not None:
            # K and V travel together: one all-gather (one reduce-scatter back) per layer.
            k, v = self.kv_gather(torch.stack((k, v))).unbind(0)  # 2 x (B, Hkv, T_row, d)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, T_cached + T, d)
        out = mask.attend(q, k, v)  # (B, H, T, d)
        return self.wo(out.transpose(1, 2).reshape(batch, seqlen, -1))
