"""The reference decoder: Llama-style (RMSNorm, RoPE, SwiGLU, grouped-query attention) with
Multi-Token Prediction built in.

No ``torch.distributed`` here: context parallelism is applied from outside
(:mod:`multitoken.parallel`), which hands the model a sharded layout, the key layout of the
whole row, the MTP inputs built from the halo, and the global valid-target counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multitoken.layout import LayoutError, SequenceLayout
from multitoken.lookahead import IGNORE_INDEX, mtp_inputs
from multitoken.loss import DEFAULT_CHUNK_ELEMENTS
from multitoken.models.attention import ATTENTION_MODES, BACKENDS, Attention, AttentionMask
from multitoken.mtp import MTPConfig, MultiTokenPredictor, depth_losses

if TYPE_CHECKING:
    from multitoken.kv_cache import LayerKVCache

__all__ = ["GPTConfig", "GPT", "GPTOutput", "Block", "PRESETS"]


@dataclass
class GPTConfig:
    """Reference decoder settings (field docstrings become CLI help).

    Attributes:
        vocab_size: number of token ids.
        dim: hidden size H.
        n_layers: transformer layers of the main model.
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention); None = n_heads.
        ffn_dim: SwiGLU hidden size; None = 8/3 * dim rounded up to a multiple of 64.
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
        max_seq_len: longest document position the rotary table covers.
        tie_embeddings: share the embedding matrix with the output head.
        attention: "document" (causal inside each document) or "causal" (across the row).
        backend: "auto" (FlexAttention on CUDA, SDPA elsewhere), "sdpa" or "flex".
        pad_id: token id used where a lookahead leaves its document (never a target).
        ignore_index: label value meaning "no target".
        loss_chunk_elements: logits per chunk in the chunked cross-entropy.
        init_std: standard deviation of the weight initialisation.
        recompute: recompute the main layers' activations in the backward (less memory).
        mtp: Multi-Token Prediction settings (depth 0 = plain next-token model).
    """

    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = True
    attention: str = "document"
    backend: str = "auto"
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX
    loss_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    init_std: float = 0.02
    recompute: bool = False
    mtp: MTPConfig = field(default_factory=lambda: MTPConfig(depth=0))

    def __post_init__(self) -> None:
        if isinstance(self.mtp, dict):
            self.mtp = MTPConfig(**self.mtp)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.n_layers < 1 or self.dim < 2 or self.vocab_size < 2:
            raise ValueError(
                f"need n_layers >= 1, dim >= 2 and vocab_size >= 2, got n_layers={self.n_layers}, "
                f"dim={self.dim}, vocab_size={self.vocab_size}"
            )
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of an even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} outside the vocabulary [0, {self.vocab_size})")

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size from :data:`PRESETS`, with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)


PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=1024),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=2048),
    "base": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=4096),
}


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer layer; the main model's layers and every MTP depth's layer."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


@dataclass
class GPTOutput:
    """What a forward returns.

    Attributes:
        loss: ``L_main + lambda / D * sum_k L_k`` (None without labels); call backward on it.
        depth_loss: ``[D + 1]`` per-depth losses, index 0 the main next-token loss.
        depth_tokens: ``[D + 1]`` valid targets per depth in this (local) batch.
        depth_correct: ``[D + 1]`` top-1 hits per depth.
        hidden_states: ``h^0`` and each depth's hidden state, ``[B, T, H]`` each.
        logits: ``[B, T, V]`` main-head logits, only when no labels are given.
    """

    loss: Tensor | None
    depth_loss: Tensor | None
    depth_tokens: Tensor | None
    depth_correct: Tensor | None
    hidden_states: list[Tensor]
    logits: Tensor | None = None


class GPT(nn.Module):
    """Llama-style decoder with DeepSeek-V3 Multi-Token Prediction.

    Example::

        >>> model = GPT(GPTConfig.preset("tiny", mtp=MTPConfig(depth=2)))
        >>> ids = torch.randint(1, 4096, (2, 16))
        >>> layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 5, 16, 32]), (2, 16))
        >>> out = model(ids, labels=next_token_labels(ids, layout), layout=layout)
        >>> out.loss.backward(); out.depth_loss.shape
        torch.Size([3])
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = None
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.mtp = None
        if config.mtp.depth > 0:
            self.mtp = MultiTokenPredictor(
                config.mtp, config.dim, lambda k: Block(config), eps=config.norm_eps
            )
        head_dim = config.dim // config.n_heads
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(config.max_seq_len).float(), inv_freq)  # (S, d/2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # Residual output projections are scaled down by depth (GPT-2 / Llama practice).
        n_residual = 2 * (self.config.n_layers + self.config.mtp.depth)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            scale = 1 / math.sqrt(n_residual) if name.endswith(("wo.weight", "w2.weight")) else 1
            nn.init.normal_(param, std=std * scale)

    @property
    def head_weight(self) -> Tensor:
        """``[V, H]`` output-head weight, shared by every depth."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[B, 1, T, d/2]`` for per-token positions ``[B, T]``."""
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        layout: SequenceLayout | None = None,
        *,
        kv_layout: SequenceLayout | None = None,
        mtp_input_ids: Tensor | None = None,
        depth_labels: Tensor | None = None,
        loss_normalizer: Tensor | None = None,
    ) -> GPTOutput:
        """Forward pass, with the per-depth losses when labels are given.

        Args:
            input_ids: ``[B, T]`` token ids.
            labels: ``[B, T]`` next-token labels (already shifted, ``ignore_index`` where none);
                see :func:`multitoken.lookahead.next_token_labels`.
            layout: documents in the batch; None = one document per row.
            kv_layout: layout of the keys when they are gathered from other ranks (context
                parallelism); None = the keys are the local tokens.
            mtp_input_ids: ``[D, B, T]`` MTP inputs; None = computed with ``lookahead``.
            depth_labels: ``[D + 1, B, T]`` per-depth targets; None = computed from labels.
            loss_normalizer: ``[D + 1]`` valid-target counts over every rank sharing the batch;
                None = the local counts.
        """
        cfg = self.config
        depth = cfg.mtp.depth
        layout = self._check_inputs(input_ids, labels, layout)
        if (depth > 0 and mtp_input_ids is None) or (depth_labels is None and labels is not None):
            # One lookahead for all depths; shift 0 also drops labels on padding tokens.
            computed_ids, computed_labels = mtp_inputs(
                input_ids, labels, layout, depth, cfg.pad_id, cfg.ignore_index
            )
            mtp_input_ids = computed_ids if mtp_input_ids is None else mtp_input_ids
            depth_labels = computed_labels if depth_labels is None else depth_labels

        mask = AttentionMask(layout, kv_layout, cfg.attention, cfg.backend)
        rope = self.rope(layout.positions)
        x = self.tok_embeddings(input_ids)  # (B, T, H)
        for layer in self.layers:
            if cfg.recompute and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False, rope=rope, mask=mask)
            else:
                x = layer(x, rope=rope, mask=mask)
        hidden_states = [self.norm(x)]
        if self.mtp is not None:
            hidden_states += self.mtp(
                hidden_states[0], mtp_input_ids, self.tok_embeddings, rope=rope, mask=mask
            )
        if depth_labels is None:
            logits = hidden_states[0] @ self.head_weight.t()  # (B, T, V)
            return GPTOutput(None, None, None, None, hidden_states, logits)
        losses = depth_losses(
            hidden_states,
            self.head_weight,
            depth_labels,
            cfg.mtp.loss_weight,
            loss_normalizer,
            cfg.ignore_index,
            cfg.loss_chunk_elements,
        )
        return GPTOutput(
            losses.loss,
            losses.depth_loss,
            losses.depth_tokens,
            losses.depth_correct,
            hidden_states,
        )

    # ------------------------------------------------------------------ incremental decoding
    def forward_cached(self, input_ids: Tensor, caches: Sequence[LayerKVCache]) -> Tensor:
        """``h^0`` of tokens that continue the prefix held in the layers' caches.

        One document per row; the new tokens take positions ``caches[0].length + arange(T)``
        and their keys and values are appended to the caches. Running a sequence through
        this in chunks of any sizes gives the ``hidden_states[0]`` of :meth:`forward` on the
        whole sequence (up to floating-point rounding).

        Args:
            input_ids: ``[B, T]`` new token ids.
            caches: one :class:`~multitoken.kv_cache.LayerKVCache` per main-model layer.

        Returns:
            ``[B, T, H]`` final normed hidden states (the input of the head and of MTP depth 1).
        """
        if len(caches) != len(self.layers):
            raise ValueError(f"{len(caches)} caches for {len(self.layers)} layers")
        rope, mask = self._decode_rope_mask(input_ids, caches[0].length)
        x = self.tok_embeddings(input_ids)  # (B, T, H)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope=rope, mask=mask, cache=cache)
        return self.norm(x)

    def mtp_forward_cached(
        self, depth: int, hidden: Tensor, input_ids: Tensor, cache: LayerKVCache
    ) -> Tensor:
        """``h^depth`` at the next ``T`` positions of MTP depth ``depth``, with its layer's cache.

        Args:
            depth: k in 1..D.
            hidden: ``[B, T, H]`` ``h^{k-1}`` at those positions.
            input_ids: ``[B, T]`` the tokens k places ahead of those positions.
            cache: depth k's :class:`~multitoken.kv_cache.LayerKVCache`; the positions are
                ``cache.length + arange(T)`` (the same rotary positions as the main model).

        Returns:
            ``[B, T, H]`` depth k's hidden states, through its final norm.
        """
        if self.mtp is None or not 1 <= depth <= len(self.mtp.depths):
            have = 0 if self.mtp is None else len(self.mtp.depths)
            raise ValueError(f"MTP depth {depth} requested, the model has depths 1..{have}")
        rope, mask = self._decode_rope_mask(input_ids, cache.length)
        module = self.mtp.depths[depth - 1]
        return module(hidden, self.tok_embeddings(input_ids), rope=rope, mask=mask, cache=cache)

    def _decode_rope_mask(
        self, input_ids: Tensor, start: int
    ) -> tuple[tuple[Tensor, Tensor], AttentionMask]:
        batch, seqlen = input_ids.shape
        end = start + seqlen
        if end > self.config.max_seq_len:
            raise LayoutError(
                f"decoding reaches position {end - 1} but max_seq_len is "
                f"{self.config.max_seq_len}: shorten the prompt or max_new_tokens"
            )
        device = input_ids.device
        key_pos = torch.arange(end, device=device).expand(batch, end)
        query_pos = key_pos[:, start:]
        # One document per row, so the existing mask rule with the cached keys' layout is the
        # causal mask shifted by ``start``. SDPA: FlexAttention would recompile for every length.
        q_layout = SequenceLayout(torch.zeros_like(query_pos), query_pos, query_pos)
        kv_layout = SequenceLayout(torch.zeros_like(key_pos), key_pos, key_pos)
        mask = AttentionMask(q_layout, kv_layout, self.config.attention, backend="sdpa")
        return self.rope(query_pos), mask

    def _check_inputs(
        self, input_ids: Tensor, labels: Tensor | None, layout: SequenceLayout | None
    ) -> SequenceLayout:
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise LayoutError(f"input_ids must be a [B, T] tensor, got {got}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise LayoutError(f"input_ids must be int32 or int64 token ids, got {input_ids.dtype}")
        if layout is None:
            layout = SequenceLayout.rows(*input_ids.shape, device=input_ids.device)
        layout.check_tensor("input_ids", input_ids)
        if labels is not None:
            layout.check_tensor("labels", labels)
            if labels.dtype not in (torch.int32, torch.int64):
                raise LayoutError(f"labels must be int32 or int64, got {labels.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise LayoutError(
                f"input id {bad} is outside the vocabulary [0, {cfg.vocab_size}): check the "
                "tokenizer against model.vocab_size"
            )
        if int(layout.positions.max()) >= cfg.max_seq_len:
            raise LayoutError(
                f"a document reaches position {int(layout.positions.max())} but max_seq_len is "
                f"{cfg.max_seq_len}: raise model.max_seq_len or split long documents"
            )
        return layout
