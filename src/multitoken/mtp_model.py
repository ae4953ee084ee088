"""A decoder with MTP depths on top: hidden states out, the loss computed by the step.

:class:`MTPModel` bundles any :class:`~multitoken.decoder.Decoder` with a
:class:`~multitoken.mtp.MultiTokenPredictor` built from the decoder's own layer and norm
kinds. Its ``forward`` returns the hidden states ``h^0 .. h^D`` (torchtitan's split: the model
computes activations, the training step computes the loss with the step's loss weight and
normaliser, :func:`step_loss`). :meth:`MTPModel.loss` is the one-call convenience for library
users.

Example (the reference GPT, packed documents, D = 2)::

    >>> tiny = GPTConfig.preset("tiny", vocab_size=4096)
    >>> model = MTPModel.from_config(tiny, MTPConfig(num_depths=2))
    >>> ids = torch.randint(1, 4096, (2, 16))
    >>> layout = SequenceLayout.from_lengths([[5, 11], [16]])
    >>> out = model.loss(ids, next_token_labels(ids, layout), layout)
    >>> out.loss.backward(); out.depth_loss.shape
    torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from multitoken.batch import StepBatch
from multitoken.decoder import Decoder
from multitoken.distill import acceptance_sums, linear_distillation, teacher_hidden
from multitoken.errors import InputError, warn_renamed
from multitoken.layout import SequenceLayout
from multitoken.lookahead import IGNORE_INDEX, lookahead
from multitoken.loss import LossStats, chunk_elements_for, chunk_rows, linear_cross_entropy
from multitoken.models.gpt import GPT, GPTConfig, check_batch, init_weights
from multitoken.mtp import DepthLosses, MTPConfig, MultiTokenPredictor, depth_losses

__all__ = [
    "MTPModel",
    "step_loss",
    "hidden_loss",
    "base_targets",
    "depth_loss_fn",
    "measure_acceptance",
]


class MTPModel(nn.Module):
    """A decoder and its MTP depths (``mtp`` is None for D = 0).

    Args:
        decoder: any module implementing :class:`~multitoken.decoder.Decoder`.
        config: :class:`~multitoken.mtp.MTPConfig`.
        pad_id: input token where a lookahead leaves its document (never a target).

    The MTP depths keep the constructor's default initialisation: :meth:`from_config` (the
    reference GPT from scratch) initialises decoder and depths together; an adapter for a
    pretrained decoder initialises only the depths.
    """

    def __init__(self, decoder: nn.Module, config: MTPConfig, *, pad_id: int = 0):
        super().__init__()
        if not isinstance(decoder, Decoder):
            raise InputError(
                f"{type(decoder).__name__} does not implement multitoken.decoder.Decoder "
                "(embed, hidden, layer_kwargs, make_mtp_layer, make_norm, head_weight, ...)"
            )
        if not 0 <= pad_id < decoder.vocab_size:
            raise InputError(f"pad_id {pad_id} outside the vocabulary [0, {decoder.vocab_size})")
        self.decoder = decoder
        self.config = config
        self.pad_id = pad_id
        self.mtp = MultiTokenPredictor.for_decoder(config, decoder) if config.num_depths else None
        if config.freeze_base:
            # No parameter of the decoder requires grad, so autograd records none of its
            # operations: the backbone runs as under no_grad, and only MTP params get grads.
            decoder.requires_grad_(False)

    @classmethod
    def from_config(cls, decoder_config: GPTConfig, mtp: MTPConfig, *, pad_id: int = 0) -> MTPModel:
        """The reference GPT with ``mtp.num_depths`` depths, every weight initialised together.

        The residual projections of the main and MTP layers are scaled by their total count
        (:func:`~multitoken.models.gpt.init_weights`).
        """
        built = cls(GPT(decoder_config, init=False), mtp, pad_id=pad_id)
        init_weights(built, decoder_config.init_std, decoder_config.n_layers + mtp.num_depths)
        return built

    @property
    def num_depths(self) -> int:
        """D, the number of MTP depths (0 without MTP)."""
        return 0 if self.mtp is None else len(self.mtp.depths)

    @property
    def depth(self) -> int:
        """Deprecated: :attr:`num_depths`."""
        warn_renamed("MTPModel.depth", "MTPModel.num_depths")
        return self.num_depths

    @property
    def head_weight(self) -> Tensor:
        """``[V, H]`` the shared output-head weight."""
        return self.decoder.head_weight

    def forward(
        self,
        input_ids: Tensor,
        layout: SequenceLayout | None = None,
        *,
        kv_layout: SequenceLayout | None = None,
        mtp_input_ids: Tensor | None = None,
        hidden: Tensor | None = None,
    ) -> list[Tensor]:
        """Hidden states ``h^0 .. h^D``, each ``[B, T, H]`` and through its final norm.

        Args:
            input_ids: ``[B, T]`` token ids.
            layout: their documents; None = one document per row.
            kv_layout: layout of the keys gathered over the CP group (sharded input only).
            mtp_input_ids: ``[D, B, T]`` MTP inputs; None = ``lookahead`` of ``input_ids``
                (a whole batch only: a shard's lookahead needs its halo).
            hidden: ``[B, T, H]`` a frozen decoder's ``h^0`` computed before (offline
                features, :mod:`multitoken.frozen`): only the MTP depths run.
        """
        decoder = self.decoder
        layout = check_batch(input_ids, layout, decoder.vocab_size)
        if self.mtp is not None and mtp_input_ids is None:
            if kv_layout is not None:
                raise InputError(
                    "a sharded batch (kv_layout given) needs mtp_input_ids built from its halo: "
                    "see multitoken.parallel.shard_batch"
                )
            shifts = list(range(1, self.num_depths + 1))
            mtp_input_ids = lookahead(input_ids, layout, shifts, fill=self.pad_id)
        kwargs = decoder.layer_kwargs(layout, kv_layout)
        hidden_states = [decoder.hidden(input_ids, kwargs) if hidden is None else hidden]
        if self.mtp is not None:
            # The engines' position-0 rule: no token embedding where a document starts.
            zero = layout.positions == 0 if self.config.zero_first_embedding else None
            hidden_states += self.mtp(
                hidden_states[0], mtp_input_ids, decoder.embed, zero, **kwargs
            )
        return hidden_states

    def logits(self, input_ids: Tensor, layout: SequenceLayout | None = None) -> Tensor:
        """``[B, T, V]`` next-token logits of the main head (inference; no MTP depths run)."""
        layout = check_batch(input_ids, layout, self.decoder.vocab_size)
        h0 = self.decoder.hidden(input_ids, self.decoder.layer_kwargs(layout))
        return h0 @ self.head_weight.t()

    def loss(
        self,
        input_ids: Tensor,
        labels: Tensor,
        layout: SequenceLayout | None = None,
        *,
        mtp_weight: float | None = None,
        normalizer: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        cross_entropy: Callable[..., LossStats] = linear_cross_entropy,
    ) -> DepthLosses:
        """One call from a batch to its losses (single process).

        Args:
            input_ids: ``[B, T]`` token ids.
            labels: ``[B, T]`` next-token labels (see :func:`~multitoken.next_token_labels`).
            layout: documents; None = one document per row.
            mtp_weight: lambda; None = ``config.loss_weight``.
            normalizer: ``[D + 1]`` counts to divide by; None = this batch's.
            ignore_index: the "no target" label.
            cross_entropy: the head's loss for the model's layout (what its
                ``parallelize_<model>`` or ``apply_tp`` returned).
        """
        batch = StepBatch.build(
            input_ids, labels, layout, self.num_depths, self.pad_id, ignore_index
        )
        if normalizer is not None:
            batch = replace(batch, normalizer=normalizer)
        mtp_weight = self.config.loss_weight if mtp_weight is None else mtp_weight
        return step_loss(self, batch, mtp_weight, ignore_index, cross_entropy=cross_entropy)


def step_loss(
    model: nn.Module,
    batch: StepBatch,
    mtp_weight: float,
    ignore_index: int = IGNORE_INDEX,
    *,
    cross_entropy: Callable[..., LossStats] = linear_cross_entropy,
    acceptance: bool = False,
) -> DepthLosses:
    """The loss of one step: ``model``'s hidden states through the shared head, per depth.

    Args:
        model: an :class:`MTPModel` (possibly wrapped by a parallelism that keeps its call).
        batch: this rank's :class:`~multitoken.batch.StepBatch`.
        mtp_weight: the step's lambda (schedules pass it here; nothing is mutated).
        ignore_index: the "no target" label.
        cross_entropy: the head's loss for the model's layout: the one its
            ``parallelize_<model>`` returned (vocabulary-parallel under TP).
        acceptance: also measure each depth's agreement and acceptance against the backbone
            (:func:`measure_acceptance`; the losses are unchanged). Skipped (None) under
            context parallelism and with a vocabulary-parallel head.
    """
    frozen = batch.backbone  # offline features: the decoder does not run
    hidden_states = model(
        batch.input_ids,
        batch.layout,
        kv_layout=batch.kv_layout,
        mtp_input_ids=batch.mtp_input_ids,
        hidden=None if frozen is None else frozen.hidden,
    )
    return hidden_loss(
        model, hidden_states, batch, mtp_weight, ignore_index,
        cross_entropy=cross_entropy, acceptance=acceptance,
    )  # fmt: skip


def hidden_loss(
    model: nn.Module,
    hidden_states: list[Tensor],
    batch: StepBatch,
    mtp_weight: float,
    ignore_index: int = IGNORE_INDEX,
    *,
    cross_entropy: Callable[..., LossStats] = linear_cross_entropy,
    acceptance: bool = False,
) -> DepthLosses:
    """:func:`step_loss` from the hidden states ``h^0 .. h^D`` already computed: what a
    pipeline's last stage runs on each microbatch (``model``: anything with the MTP
    ``config`` and the ``head_weight``; ``batch``: the microbatch's targets, the step's
    normaliser and, under CP, a ``kv_layout``)."""
    frozen = batch.backbone  # offline features: the decoder's stored outputs, or None
    depth_labels = batch.depth_labels
    if model.config.targets == "base" and len(hidden_states) > 1:
        if batch.kv_layout is not None:
            raise InputError(
                "mtp.targets=base needs the whole rows (the greedy token i + k may live on "
                "another CP rank): use parallel.cp=1"
            )
        depth_labels = base_targets(
            hidden_states[0],
            model.head_weight,
            depth_labels,
            ignore_index,
            model.config.loss_chunk_elements,
            greedy=None if frozen is None else frozen.greedy,
        )
    losses = depth_losses(
        hidden_states,
        model.head_weight,
        depth_labels,
        mtp_weight,
        batch.normalizer,
        ignore_index,
        model.config.loss_chunk_elements,
        cross_entropy,
        mtp_loss=depth_loss_fn(model, hidden_states, batch, ignore_index, cross_entropy),
        main=None if frozen is None else frozen.main_stats(depth_labels[0], ignore_index),
    )
    sums = acceptance_sums if cross_entropy is linear_cross_entropy else None
    sums = getattr(cross_entropy, "acceptance", sums)  # a vocabulary-parallel head's own
    ahead = teacher_hidden if batch.kv_layout is None else batch.rows_ahead  # CP: the peers'
    if acceptance and sums is not None and ahead is not None and len(hidden_states) > 1:
        losses.agree, losses.accept = measure_acceptance(
            hidden_states, model.head_weight, depth_labels, ignore_index,
            model.config.loss_chunk_elements, ahead=ahead, sums=sums,
        )  # fmt: skip
    return losses


def measure_acceptance(
    hidden_states: list[Tensor],
    head_weight: Tensor,
    depth_labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = 0,
    *,
    ahead: Callable[[Tensor, int], Tensor] = teacher_hidden,
    sums: Callable[..., tuple[Tensor, Tensor]] = acceptance_sums,
) -> tuple[Tensor, Tensor]:
    """``([D], [D])`` greedy agreements and summed acceptance of each depth vs the backbone.

    Depth k at i against the backbone at i + k (:func:`~multitoken.distill.acceptance_sums`),
    over depth k's valid targets (``depth_labels[k] != ignore_index``: i + k + 1 in i's
    document); no gradient. ``ahead(h0, k)``: the rows i + k (a CP shard's come from its
    peers, ``StepBatch.rows_ahead``); ``sums``: the head's measure (a vocabulary-parallel
    head's own, ``VocabParallelCrossEntropy.acceptance``).
    """
    h0 = hidden_states[0]
    agree, accept = [], []
    for k in range(1, len(hidden_states)):
        a, s = sums(
            hidden_states[k], ahead(h0, k), head_weight,
            depth_labels[k] != ignore_index, chunk_elements,
        )  # fmt: skip
        agree.append(a)
        accept.append(s)
    return torch.stack(agree), torch.stack(accept)


def depth_loss_fn(
    model: nn.Module,
    hidden_states: list[Tensor],
    batch: StepBatch,
    ignore_index: int,
    cross_entropy: Callable[..., LossStats],
) -> Callable[[int, Tensor, Tensor], LossStats] | None:
    """The depths' loss ``f(k, h^k, labels)`` for ``model.config`` (``mtp.loss``,
    ``mtp.detach_heads``); None = the cross-entropy through the head, as for the main loss.

    Raises:
        InputError: a distillation loss with a head loss that has none (a vocabulary-parallel
            head has: ``VocabParallelCrossEntropy.distillation``), or on a CP shard without
            ``batch.rows_ahead`` (the teacher row i + k may sit on another rank).
    """
    config = model.config
    if len(hidden_states) == 1 or (config.loss == "ce" and not config.detach_heads):
        return None
    weight = model.head_weight.detach() if config.detach_heads else model.head_weight
    chunk = config.loss_chunk_elements
    if config.loss == "ce":
        return lambda k, h, labels: cross_entropy(h, weight, labels, ignore_index, chunk)
    if cross_entropy is linear_cross_entropy:
        distillation = linear_distillation
    else:  # a vocabulary-parallel head brings its own (VocabParallelCrossEntropy.distillation)
        distillation = getattr(cross_entropy, "distillation", None)
    if distillation is None:
        raise InputError(
            f"mtp.loss={config.loss} needs a head loss that offers it (linear_cross_entropy, "
            "or a vocabulary-parallel one): use mtp.loss=ce with this head"
        )
    if batch.kv_layout is not None and batch.rows_ahead is None:
        raise InputError(
            f"mtp.loss={config.loss} on a CP shard needs its teacher rows i + k from the peers: "
            "give the StepBatch rows_ahead (multitoken.parallel.RowHalo)"
        )
    h0 = hidden_states[0]
    ahead = teacher_hidden if batch.kv_layout is None else batch.rows_ahead

    def distill(k: int, hidden: Tensor, labels: Tensor) -> LossStats:
        return distillation(
            hidden, ahead(h0, k), weight, labels, config.loss,
            alpha=config.lk_alpha, temperature=config.teacher_temperature,
            ignore_index=ignore_index, chunk_elements=chunk,
        )  # fmt: skip

    return distill


def base_targets(
    h0: Tensor,
    head_weight: Tensor,
    depth_labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = 0,
    greedy: Tensor | None = None,
) -> Tensor:
    """Self-distillation targets: depth k learns the decoder's own greedy next tokens.

    Depth k's target at position i is normally ``t_{i+k+1}`` (``depth_labels[k, :, i]``); here it
    is the decoder's greedy prediction of that token, ``argmax(h^0_{i+k} W^T)``, wherever the data
    target exists (so the document bounds stay exactly those of the data). Index 0, the main
    next-token labels, is kept.

    Args:
        h0: ``[B, T, H]`` the decoder's final hidden states.
        head_weight: ``[V, H]`` the output head.
        depth_labels: ``[D + 1, B, T]`` data targets.
        ignore_index: the "no target" label.
        chunk_elements: at most this many logits exist at once (the loss's bound); 0 = the
            device's default.
        greedy: ``[B, T]`` the decoder's greedy tokens computed before (offline features);
            None = computed here from ``h0``.

    Returns:
        ``[D + 1, B, T]`` targets.
    """
    with torch.no_grad():
        if greedy is not None:
            return _shift_greedy(greedy, depth_labels, ignore_index)
        # Chunks of tokens, as the loss walks them: never a row's [T, V] logits at once.
        flat = h0.reshape(-1, h0.shape[-1])
        rows = chunk_rows(head_weight.shape[0], chunk_elements_for(h0.device, chunk_elements))
        parts = [(part @ head_weight.t()).argmax(-1) for part in flat.split(rows)]
        greedy = torch.cat(parts).view(h0.shape[:-1])  # (B, T)
    return _shift_greedy(greedy, depth_labels, ignore_index)


def _shift_greedy(greedy: Tensor, depth_labels: Tensor, ignore_index: int) -> Tensor:
    """Depth k's target at i: ``greedy[i + k]`` where its data target exists."""
    out = depth_labels.clone()
    for k in range(1, depth_labels.shape[0]):
        shifted = torch.full_like(greedy, ignore_index)
        shifted[:, : greedy.shape[1] - k] = greedy[:, k:]
        # A valid depth-k target at i means i + k + 1 is in i's document, so i + k is too.
        out[k] = torch.where(depth_labels[k] != ignore_index, shifted, depth_labels[k])
    return out
