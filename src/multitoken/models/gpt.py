"""The reference decoder: Llama-style (RMSNorm, RoPE, SwiGLU, grouped-query attention).

:class:`GPT` implements the :class:`~multitoken.decoder.Decoder` interface and nothing more: it
maps token ids to the final normed hidden state ``h^0``. The MTP depths
(:class:`~multitoken.mtp.MultiTokenPredictor`) and the loss sit on top of it
(:class:`~multitoken.mtp_model.MTPModel`). No ``torch.distributed`` here: context parallelism hands
the model a sharded layout and the layout of the gathered keys (:mod:`multitoken.parallel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multitoken.errors import (
    FIXED,
    ConfigError,
    InputError,
    check_in_range,
    check_int_tensor,
    require,
)
from multitoken.layout import SequenceLayout
from multitoken.models.attention import (
    ATTENTION_MODES,
    BACKENDS,
    Attention,
    AttentionMask,
    resolve_backend,
)
from multitoken.models.kv_cache import LayerKVCache

__all__ = ["GPTConfig", "GPT", "Block", "PRESETS", "init_weights"]


@dataclass
class GPTConfig:
    """The reference decoder (field docstrings become CLI help).

    Attributes:
        vocab_size: token ids; 0 = the tokenizer's vocabulary size (training).
        dim: hidden size H.
        n_layers: transformer layers of the main model.
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention); 0 = n_heads.
        ffn_dim: SwiGLU hidden size; 0 = 8/3 * dim rounded up to a multiple of 64.
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
        max_seq_len: longest document position the rotary table covers.
        tie_embeddings: share the embedding matrix with the output head.
        attention: "document" (causal inside each document) or "causal" (across the row).
        backend: "auto" (FlexAttention on CUDA where it compiles for the head size, >= 16;
            SDPA elsewhere), "sdpa" or "flex".
        init_std: standard deviation of the weight initialisation.
        recompute: recompute the main layers' activations in the backward (less memory).
        hf: a local Hugging Face model folder (config.json, safetensors, tokenizer); when set
            it is the decoder, its tokenizer tokenises the corpus, and the shape fields above
            are ignored (needs multitoken[hf]).
    """

    vocab_size: int = field(default=0, metadata=FIXED)
    dim: int = field(default=128, metadata=FIXED)
    n_layers: int = field(default=4, metadata=FIXED)
    n_heads: int = field(default=4, metadata=FIXED)
    n_kv_heads: int = field(default=2, metadata=FIXED)
    ffn_dim: int = field(default=0, metadata=FIXED)
    norm_eps: float = field(default=1e-5, metadata=FIXED)
    rope_theta: float = field(default=10000.0, metadata=FIXED)
    max_seq_len: int = 1024
    tie_embeddings: bool = field(default=True, metadata=FIXED)
    attention: str = field(default="document", metadata=FIXED)
    backend: str = "auto"
    init_std: float = 0.02
    recompute: bool = False
    hf: str = field(default="", metadata=FIXED)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~multitoken.errors.ConfigError` naming the first bad field."""
        checks = [
            (self.vocab_size >= 0, "vocab_size", "must be >= 0 (0 = the tokenizer's)"),
            (self.dim >= 2, "dim", "must be >= 2"),
            (self.n_layers >= 1, "n_layers", "must be >= 1"),
            (self.n_heads >= 1, "n_heads", "must be >= 1"),
            (self.n_kv_heads >= 0, "n_kv_heads", "must be >= 0 (0 = n_heads)"),
            (self.ffn_dim >= 0, "ffn_dim", "must be >= 0 (0 = 8/3 * dim)"),
            (self.norm_eps > 0, "norm_eps", "must be > 0"),
            (self.rope_theta > 0, "rope_theta", "must be > 0"),
            (self.max_seq_len >= 1, "max_seq_len", "must be >= 1"),
            (self.init_std > 0, "init_std", "must be > 0"),
            (self.attention in ATTENTION_MODES, "attention", f"must be one of {ATTENTION_MODES}"),
            (self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}"),
        ]
        require(checks, self)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError(
                f"must split dim={self.dim} into heads of an even size, got {self.n_heads}",
                "n_heads",
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"must divide n_heads={self.n_heads}, got {self.kv_heads}", "n_kv_heads"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size from :data:`PRESETS`, with field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
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
        self.attention = Attention(config.dim, config.n_heads, config.kv_heads)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


def init_weights(module: nn.Module, std: float, n_residual_layers: int) -> None:
    """Normal(0, std) for every matrix of ``module``, in ``named_parameters`` order.

    Residual output projections (``wo``, ``w2``) are scaled by ``1 / sqrt(2 * n)`` for ``n``
    residual layers, main and MTP together (GPT-2 / Llama practice). Vectors (norms) keep
    their constructor values.
    """
    for name, param in module.named_parameters():
        if param.dim() < 2:
            continue
        residual = name.endswith(("wo.weight", "w2.weight"))
        scale = 1 / math.sqrt(2 * n_residual_layers) if residual else 1
        nn.init.normal_(param, std=std * scale)


class GPT(nn.Module):
    """Llama-style decoder: token ids to ``h^0``, the input of the head and of MTP depth 1.

    Implements :class:`~multitoken.decoder.Decoder`.

    Example::

        >>> gpt = GPT(GPTConfig.preset("tiny", vocab_size=4096))
        >>> ids = torch.randint(1, 4096, (2, 16))
        >>> layout = SequenceLayout.from_lengths([[5, 11], [16]])
        >>> gpt(ids, layout).shape                      # h^0
        torch.Size([2, 16, 64])

    Args:
        config: :class:`GPTConfig` (``vocab_size`` must be set).
        init: initialise the weights (:func:`init_weights`); ``False`` leaves the constructor
            defaults for a caller that initialises the whole model at once.
    """

    def __init__(self, config: GPTConfig, *, init: bool = True):
        super().__init__()
        if config.vocab_size < 2:
            raise ConfigError(f"must be set (>= 2), got {config.vocab_size}", "vocab_size")
        self.config = config
        self.hidden_size, self.vocab_size = config.dim, config.vocab_size
        self.max_seq_len, self.num_layers = config.max_seq_len, config.n_layers
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = None
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        head_dim = config.head_dim
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(config.max_seq_len).float(), inv_freq)  # (S, d/2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        if init:
            init_weights(self, config.init_std, config.n_layers)

    # ------------------------------------------------------------------ Decoder interface
    @property
    def head_weight(self) -> Tensor:
        """``[V, H]`` output-head weight, shared by every depth."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.tok_embeddings(input_ids)  # (B, T, H)

    def layer_kwargs(
        self,
        layout: SequenceLayout,
        kv_layout: SequenceLayout | None = None,
        *,
        decoding: bool = False,
    ) -> dict[str, Any]:
        """``rope`` (cos, sin ``[B, 1, T, d/2]`` at the queries' positions) and ``mask``."""
        check_in_range(
            "a document position",
            layout.positions,
            self.config.max_seq_len,
            "raise model.max_seq_len or split long documents",
        )
        # Decoding shapes change every step: SDPA, as FlexAttention would recompile each time.
        backend = "sdpa" if decoding else self.backend(layout.device.type)
        mask = AttentionMask(layout, kv_layout, self.config.attention, backend)
        positions = layout.positions
        rope = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        return {"rope": rope, "mask": mask}

    def backend(self, device_type: str) -> str:
        """The attention this model runs on ``device_type`` (chosen once, see
        :func:`~multitoken.models.attention.resolve_backend`)."""
        return resolve_backend(self.config.backend, device_type, self.config.head_dim)

    def hidden(
        self,
        input_ids: Tensor,
        layer_kwargs: dict[str, Any],
        caches: list[LayerKVCache] | None = None,
    ) -> Tensor:
        if caches is not None and len(caches) != len(self.layers):
            raise InputError(f"{len(caches)} caches for {len(self.layers)} layers")
        x = self.embed(input_ids)  # (B, T, H)
        for i, layer in enumerate(self.layers):
            if caches is not None:
                x = layer(x, **layer_kwargs, cache=caches[i])
            elif self.config.recompute and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False, **layer_kwargs)
            else:
                x = layer(x, **layer_kwargs)
        return self.norm(x)

    def drop_padding_rows(self, vocab_size: int) -> None:
        """Keep the first ``vocab_size`` rows of the embedding and head, in place: a model
        trained with a padded vocabulary (``model.vocab_size`` above the tokenizer's, e.g. a
        multiple of the TP size) decodes over the tokenizer's tokens only."""
        if not 0 < vocab_size <= self.vocab_size:
            raise InputError(f"cannot keep {vocab_size} of {self.vocab_size} vocabulary rows")
        with torch.no_grad():
            for module in (self.tok_embeddings, self.output):
                if module is not None:
                    module.weight = nn.Parameter(module.weight[:vocab_size].clone())
        self.tok_embeddings.num_embeddings = vocab_size
        if self.output is not None:
            self.output.out_features = vocab_size
        self.vocab_size = vocab_size
        self.config = replace(self.config, vocab_size=vocab_size)

    def make_mtp_layer(self, k: int) -> Block:
        return Block(self.config)

    def make_norm(self) -> nn.RMSNorm:
        return nn.RMSNorm(self.config.dim, eps=self.config.norm_eps)

    def new_kv_cache(self, batch: int, capacity: int) -> LayerKVCache:
        param = self.tok_embeddings.weight
        cfg = self.config
        return LayerKVCache(batch, cfg.kv_heads, cfg.head_dim, capacity, param.device, param.dtype)

    # ------------------------------------------------------------------ plain use
    def forward(
        self,
        input_ids: Tensor,
        layout: SequenceLayout | None = None,
        *,
        kv_layout: SequenceLayout | None = None,
    ) -> Tensor:
        """``h^0 [B, T, H]`` of a batch (``layout`` None = one document per row)."""
        layout = check_batch(input_ids, layout, self.vocab_size)
        return self.hidden(input_ids, self.layer_kwargs(layout, kv_layout))


def check_batch(
    input_ids: Tensor, layout: SequenceLayout | None, vocab_size: int
) -> SequenceLayout:
    """The layout of ``input_ids [B, T]`` (rows when None), after checking both.

    Raises:
        InputError: not a ``[B, T]`` integer tensor, or ids outside ``[0, vocab_size)``.
        LayoutError: a layout of another shape or device.
    """
    check_int_tensor("input_ids", input_ids, 2)
    if layout is None:
        layout = SequenceLayout.rows(*input_ids.shape, device=input_ids.device)
    layout.check_tensor("input_ids", input_ids)
    check_in_range(
        "input id",
        input_ids,
        vocab_size,
        "check the tokenizer against model.vocab_size",
    )
    return layout
