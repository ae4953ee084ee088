"""The DeepSeek-V3 Multi-Token Prediction module, for any decoder.

Depth k (k = 1..D) maps the previous depth's hidden state and the embedding of the token k
places ahead to a new hidden state (docs/design.md#mtp-formula)::

    h_i^k = FinalNorm_k(Layer_k(Proj_k([ENorm_k(Emb(t_{i+k})) ; HNorm_k(h_i^{k-1})])))

``h^0`` is the main model's final (normed) hidden state; the embedding and the output head are
shared with the main model and passed in, and ``Layer_k`` comes from a factory, so the module
sits on any decoder. Parameter names follow DeepSeek's released weights (``enorm``, ``hnorm``,
``eh_proj``, ``final_norm`` for ``shared_head.norm``) so those can be mapped in.

The loss of a step is ``L = L_main + (lambda / D) * sum_k L_k`` where each ``L_k`` is a sum
over depth k's valid targets divided by their count over every rank (:func:`depth_losses`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multitoken.distill import DISTILL_LOSSES
from multitoken.eagle import BLOCKS, drop_input_norm
from multitoken.errors import FIXED, ConfigError, InputError, warn_renamed
from multitoken.loss import LossStats, linear_cross_entropy

__all__ = ["MTPConfig", "MTPDepth", "MultiTokenPredictor", "DepthLosses", "depth_losses"]

# What the MTP depths predict: the data's tokens, or the decoder's own greedy next tokens.
TARGETS = ("data", "base")
# The depths' loss: cross-entropy on TARGETS, or one of the distillation losses (distill.py).
MTP_LOSSES = ("ce", *DISTILL_LOSSES)


@dataclass
class MTPConfig:
    """Multi-Token Prediction and its loss (field docstrings become CLI help).

    Attributes:
        num_depths: extra future tokens predicted (D); 0 = plain next-token training.
        loss_weight: lambda in L_main + lambda/D * sum_k L_k (DeepSeek-V3: 0.3, then 0.1).
        loss_weight_final: lambda after the switch; < 0 = no switch.
        loss_weight_switch: fraction of train.steps after which loss_weight_final applies.
        hidden_first: concatenate [hidden; embedding] (MiMo's weights) instead of
            [embedding; hidden] (DeepSeek-V3, GLM-4.5, Qwen3-Next).
        recompute: recompute each depth's layer in the backward (less memory, same result).
        loss_chunk_elements: logits per chunk of the chunked cross-entropy; 0 = by device
            (2**23 on the CPU, 2**26 on CUDA).
        freeze_base: train the MTP heads only: the decoder runs without autograd and only the
            MTP parameters are optimised and checkpointed (a pretrained or fine-tuned model
            gets working draft heads back).
        targets: what the MTP depths learn to predict: "data" (the corpus' tokens) or "base"
            (the decoder's own greedy next tokens: self-distillation, which maximises
            speculative acceptance). With a distillation ``loss`` it only chooses what a
            depth's accuracy counts (data tokens, or agreement with the greedy decoder).
        loss: the MTP depths' loss: "ce" (cross-entropy on ``targets``), or against the
            decoder's own next-token distribution at i + k (detached): "kl" (forward KL),
            "tv" (total variation: speculative sampling accepts with probability 1 - TV) or
            "lk" (lk_alpha * KL + (1 - lk_alpha) * TV); docs/design.md#acceptance-aware-losses.
        lk_alpha: the KL weight of loss = "lk", in [0, 1].
        teacher_temperature: tau dividing the student's and the teacher's logits (loss != ce).
        detach_heads: no MTP gradient reaches the decoder when training jointly: the depths
            read h^0, the embeddings and the head weight detached (Megatron's option).
        block: "mtp" (DeepSeek-V3's depth) or "eagle" (EAGLE-1's draft block: no depth norms,
            no input norm in the layer), what ``export --format eagle`` serves (docs/serving.md).
        zero_first_embedding: zero the depths' token embedding at each document's first
            position, as the engines' MTP drafts do at position 0 (docs/serving.md#position-0).

    ``depth`` is the deprecated name of ``num_depths``: ``MTPConfig(depth=2)`` and
    ``config.depth`` still work for one version, with a :class:`DeprecationWarning`.
    """

    num_depths: int = field(default=2, metadata=FIXED)
    loss_weight: float = 0.3
    loss_weight_final: float = -1.0
    loss_weight_switch: float = 0.7
    hidden_first: bool = field(default=False, metadata=FIXED)
    recompute: bool = False
    loss_chunk_elements: int = 0
    freeze_base: bool = field(default=False, metadata=FIXED)
    targets: str = "data"
    loss: str = "ce"
    lk_alpha: float = 0.5
    teacher_temperature: float = 1.0
    detach_heads: bool = False
    block: str = field(default="mtp", metadata=FIXED)
    zero_first_embedding: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~multitoken.errors.ConfigError` naming the first bad field."""
        d = self.num_depths
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise ConfigError(f"must be an int >= 0, got {d!r}", "num_depths")
        for key in ("loss_weight", "loss_weight_final"):
            value = getattr(self, key)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"must be a finite number, got {value}", key)
        if self.loss_weight < 0:
            raise ConfigError(f"must be >= 0, got {self.loss_weight}", "loss_weight")
        if not 0 <= self.loss_weight_switch <= 1:
            raise ConfigError(
                f"must be in [0, 1], got {self.loss_weight_switch}", "loss_weight_switch"
            )
        if self.freeze_base and self.num_depths == 0:
            raise ConfigError(
                "with num_depths = 0 leaves nothing to train: set mtp.num_depths >= 1",
                "freeze_base",
            )
        if self.targets not in TARGETS:
            raise ConfigError(f"must be one of {TARGETS}, got {self.targets!r}", "targets")
        if self.loss not in MTP_LOSSES:
            raise ConfigError(f"must be one of {MTP_LOSSES}, got {self.loss!r}", "loss")
        if not 0 <= self.lk_alpha <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.lk_alpha}", "lk_alpha")
        tau = self.teacher_temperature
        if not 0 < tau < float("inf"):
            raise ConfigError(f"must be a finite number > 0, got {tau}", "teacher_temperature")
        if self.block not in BLOCKS:
            raise ConfigError(f"must be one of {BLOCKS}, got {self.block!r}", "block")
        if self.loss_chunk_elements < 0:
            raise ConfigError(
                f"must be >= 0 (0 = by device), got {self.loss_chunk_elements}",
                "loss_chunk_elements",
            )

    def check_layout(self, tp: int, cp: int) -> None:
        """Raise :class:`~multitoken.errors.ConfigError` (one line, why) for the parallel
        layouts the chosen targets and loss do not support yet."""
        if self.targets == "base" and (tp > 1 or cp > 1):
            raise ConfigError(
                "mtp.targets=base takes the decoder's greedy tokens over the whole vocabulary "
                "and the whole row: use parallel.tp=1 and parallel.cp=1 with it"
            )
        if self.zero_first_embedding and tp > 1:
            raise ConfigError(
                "mtp.zero_first_embedding masks the depths' embeddings by document position, "
                "which is not written for tensor-parallel embeddings yet: use parallel.tp=1"
            )

    @property
    def depth(self) -> int:
        """Deprecated: :attr:`num_depths`."""
        warn_renamed("MTPConfig.depth", "MTPConfig.num_depths")
        return self.num_depths

    @depth.setter
    def depth(self, value: int) -> None:
        warn_renamed("MTPConfig.depth", "MTPConfig.num_depths")
        self.num_depths = value

    def weight_at(self, step: int, total_steps: int) -> float:
        """lambda at optimiser step ``step`` of ``total_steps`` (the DeepSeek-V3 switch)."""
        if self.loss_weight_final >= 0 and step > self.loss_weight_switch * total_steps:
            return self.loss_weight_final
        return self.loss_weight


_fields_init = MTPConfig.__init__
_NO_DEPTH = object()


@functools.wraps(_fields_init)
def _init_with_deprecated_depth(self, *args, depth=_NO_DEPTH, **kwargs) -> None:
    if depth is not _NO_DEPTH:
        warn_renamed("MTPConfig(depth=...)", "num_depths= (the number D of MTP depths)")
        if args or "num_depths" in kwargs:
            raise TypeError("MTPConfig got num_depths and its deprecated alias depth: pass one")
        kwargs["num_depths"] = depth
    _fields_init(self, *args, **kwargs)


MTPConfig.__init__ = _init_with_deprecated_depth


class MTPDepth(nn.Module):
    """One MTP depth: two input norms, the 2H -> H projection, one layer, the final norm.

    Args:
        dim: hidden size H.
        layer: the depth's transformer layer, called as ``layer(x, **layer_kwargs)``.
        make_norm: builds a fresh norm over H (the decoder's kind).
        hidden_first: ``[hidden; embedding]`` order (MiMo) instead of ``[embedding; hidden]``.
        block: "mtp", or "eagle" (no depth norms, the layer's input norm removed).
    """

    def __init__(
        self,
        dim: int,
        layer: nn.Module,
        make_norm: Callable[[], nn.Module],
        hidden_first: bool = False,
        block: str = "mtp",
    ):
        super().__init__()
        if block == "eagle":
            make_norm = nn.Identity
            drop_input_norm(layer)
        self.enorm = make_norm()
        self.hnorm = make_norm()
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.layer = layer
        self.final_norm = make_norm()
        self.hidden_first = hidden_first

    def forward(self, hidden: Tensor, embedded: Tensor, **layer_kwargs) -> Tensor:
        # hidden, embedded: (B, T, H)
        parts = [self.enorm(embedded), self.hnorm(hidden)]
        if self.hidden_first:
            parts.reverse()
        x = self.eh_proj(torch.cat(parts, dim=-1))  # (B, T, H)
        return self.final_norm(self.layer(x, **layer_kwargs))


class MultiTokenPredictor(nn.Module):
    """D sequential MTP depths sharing the main model's embedding and output head.

    Args:
        config: :class:`MTPConfig`.
        dim: hidden size H of the main model.
        layer_factory: ``layer_factory(k)`` returns depth k's transformer layer, a module called
            as ``layer(x, **layer_kwargs)`` (same kind as the main model's layers).
        norm_factory: returns a fresh norm over H (the main model's kind).

    Use :meth:`for_decoder` to build one for a :class:`~multitoken.decoder.Decoder`.
    """

    def __init__(
        self,
        config: MTPConfig,
        dim: int,
        layer_factory: Callable[[int], nn.Module],
        norm_factory: Callable[[], nn.Module],
    ):
        super().__init__()
        self.config = config
        self.depths = nn.ModuleList(
            MTPDepth(dim, layer_factory(k), norm_factory, config.hidden_first, config.block)
            for k in range(1, config.num_depths + 1)
        )

    @classmethod
    def for_decoder(cls, config: MTPConfig, decoder) -> MultiTokenPredictor:
        """Depths whose layers and norms are of ``decoder``'s kind."""
        return cls(config, decoder.hidden_size, decoder.make_mtp_layer, decoder.make_norm)

    def forward(
        self,
        hidden: Tensor,
        mtp_input_ids: Tensor,
        embed: Callable[[Tensor], Tensor],
        zero_embedding: Tensor | None = None,
        **layer_kwargs,
    ) -> list[Tensor]:
        """Hidden states of every depth.

        Args:
            hidden: ``[B, T, H]`` the main model's final normed hidden state ``h^0``.
            mtp_input_ids: ``[D, B, T]``, depth k's input tokens at index k - 1 (built by
                :func:`multitoken.lookahead.mtp_inputs` or, under context parallelism, from
                the halo).
            embed: the shared token embedding.
            zero_embedding: ``[B, T]`` bool: where the depths' embedding is zeroed (None = none).
            **layer_kwargs: passed to every depth's layer (rotary tables, attention mask).

        Returns:
            D tensors ``[B, T, H]``, depth 1 first, each already through its final norm.
        """
        if mtp_input_ids.shape[0] != len(self.depths):
            raise InputError(
                f"mtp_input_ids holds {mtp_input_ids.shape[0]} depths, the module has "
                f"{len(self.depths)}"
            )
        outputs = []
        if self.config.detach_heads:
            # No MTP gradient into the decoder through h^0 or the shared embedding.
            hidden = hidden.detach()
            embed = _detached(embed)
        if zero_embedding is not None:
            embed = _zeroed(embed, zero_embedding)
        for module, ids in zip(self.depths, mtp_input_ids):
            if self.config.recompute and torch.is_grad_enabled():
                # The embedding lookup stays outside: only the layer's activations are dropped.
                hidden = checkpoint(module, hidden, embed(ids), use_reentrant=False, **layer_kwargs)
            else:
                hidden = module(hidden, embed(ids), **layer_kwargs)
            outputs.append(hidden)
        return outputs


def _detached(embed: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda ids: embed(ids).detach()


def _zeroed(embed: Callable[[Tensor], Tensor], where: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda ids: embed(ids).masked_fill(where.unsqueeze(-1), 0.0)  # where: (B, T)


@dataclass
class DepthLosses:
    """Per-depth losses of one step; index 0 is the main next-token prediction.

    Attributes:
        loss: the total ``L_main + lambda / D * sum_k L_k``; the tensor to call backward on.
        depth_loss: ``[D + 1]`` differentiable per-depth losses (local sum / global count).
        depth_tokens: ``[D + 1]`` int64 valid targets per depth in this batch (local).
        depth_correct: ``[D + 1]`` int64 top-1 hits per depth (local).
        loss_sum: ``[D + 1]`` detached fp32 summed losses per depth (local), for metrics.
        agree: ``[D]`` int64 greedy agreements of depth k with the backbone at i + k (local),
            or None where not measured (``step_loss(..., acceptance=True)``).
        accept: ``[D]`` fp64 summed speculative acceptance ``sum_v min(p_v, q_v)`` (local), or
            None; both count the rows of ``depth_tokens[1:]``.
    """

    loss: Tensor
    depth_loss: Tensor
    depth_tokens: Tensor
    depth_correct: Tensor
    loss_sum: Tensor
    agree: Tensor | None = None
    accept: Tensor | None = None


def depth_losses(
    hidden_states: Sequence[Tensor],
    head_weight: Tensor,
    depth_labels: Tensor,
    mtp_weight: float,
    loss_normalizer: Tensor | None = None,
    ignore_index: int = -100,
    chunk_elements: int = 0,
    cross_entropy: Callable[..., LossStats] = linear_cross_entropy,
    *,
    mtp_loss: Callable[[int, Tensor, Tensor], LossStats] | None = None,
    main: LossStats | None = None,
) -> DepthLosses:
    """Cross-entropy of every depth through the shared head, normalised per depth.

    Args:
        hidden_states: D + 1 tensors ``[B, T, H]``: ``h^0`` then each depth's.
        head_weight: ``[V, H]`` shared output-head weight.
        depth_labels: ``[D + 1, B, T]`` targets (``ignore_index`` where none).
        mtp_weight: lambda.
        loss_normalizer: ``[D + 1]`` valid-target counts to divide by; pass the counts summed
            over every rank that shares the batch (context and data parallel) so that summing
            losses and gradients over ranks gives the unsharded ones. ``None``: local counts.
        ignore_index: the "no target" label.
        chunk_elements: logits per chunk in :func:`linear_cross_entropy` (0 = by device).
        cross_entropy: the head's loss, called as :func:`linear_cross_entropy`; tensor
            parallelism passes a vocabulary-parallel one (``MTPModel.cross_entropy``).
        mtp_loss: depth k >= 1's loss as ``mtp_loss(k, hidden, labels)`` (summed, with counts,
            as :func:`linear_cross_entropy`); None = ``cross_entropy`` through ``head_weight``.
        main: the main loss's stats computed before (a frozen decoder's offline features,
            :class:`~multitoken.frozen.BackboneOutputs`); None = ``cross_entropy`` on ``h^0``.
    """
    if len(hidden_states) != depth_labels.shape[0]:
        raise InputError(
            f"{len(hidden_states)} hidden states but {depth_labels.shape[0]} label depths"
        )
    sums, tokens, correct = [], [], []
    for k, (hidden, labels) in enumerate(zip(hidden_states, depth_labels)):
        if k == 0 and main is not None:
            stats = main
        elif k and mtp_loss is not None:
            stats = mtp_loss(k, hidden, labels)
        else:
            stats = cross_entropy(hidden, head_weight, labels, ignore_index, chunk_elements)
        sums.append(stats.loss_sum)
        tokens.append(stats.num_valid)
        correct.append(stats.num_correct)
    loss_sum = torch.stack(sums)  # (D + 1,)
    depth_tokens = torch.stack(tokens)
    normalizer = depth_tokens if loss_normalizer is None else loss_normalizer
    if normalizer.shape != depth_tokens.shape:
        raise InputError(
            f"loss_normalizer must have shape {tuple(depth_tokens.shape)} (one count per "
            f"depth, main first), got {tuple(normalizer.shape)}"
        )
    # A depth with no valid target anywhere has sum 0 and count 0: 0 / 1 = 0, never NaN.
    depth_loss = loss_sum / normalizer.to(loss_sum).clamp(min=1)
    num_depths = depth_loss.shape[0] - 1
    loss = depth_loss[0]
    if num_depths > 0:
        loss = loss + (mtp_weight / num_depths) * depth_loss[1:].sum()
    return DepthLosses(loss, depth_loss, depth_tokens, torch.stack(correct), loss_sum.detach())
