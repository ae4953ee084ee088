"""Pipeline stages of an :class:`~multitoken.mtp_model.MTPModel` over the reference GPT.

A pipeline of ``S`` stages cuts the main layers into ``S`` consecutive runs (counts from
:func:`~multitoken.parallel.pipeline.split_layers`, an even split by default). Stage 0 also
holds the token embedding; the last stage holds the final norm, the MTP depths and the output
head, and, because depth ``k`` embeds the tokens ``i + k``, a copy of the embedding
(Megatron's layout: the two copies start equal and their gradients are summed, so they stay
equal; with tied embeddings the copy is the head too). docs/parallelism.md#pipeline-parallelism.

A rank keeps one :class:`~multitoken.mtp_model.MTPModel` holding only its stages' modules
(:func:`prune_model`): every parameter keeps its name, so a checkpoint saved under any
pipeline layout loads under any other. Its :class:`GPTStage` modules are views over it, one
per stage, each what ``torch.distributed.pipelining`` runs. Nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multitoken.errors import InputError
from multitoken.layout import SequenceLayout
from multitoken.models.gpt import GPT

__all__ = [
    "stage_layers",
    "StageBase",
    "prune_model",
    "needs_embedding_on_last",
    "GPTStage",
]


def stage_layers(counts: Sequence[int], stage: int) -> list[int]:
    """The global indices of the main layers stage ``stage`` runs."""
    start = sum(counts[:stage])
    return list(range(start, start + counts[stage]))


def needs_embedding_on_last(model) -> bool:
    """The last stage embeds MTP inputs, or uses the (tied) embedding as the head."""
    return model.mtp is not None or model.decoder.output is None


def prune_model(model, stages: Sequence[int], counts: Sequence[int]) -> None:
    """Keep only what ``stages`` (this rank's stage indices of ``len(counts)``) run, in place.

    The main layers become an ``nn.ModuleDict`` keyed by their global index, so that every
    parameter keeps its name (``decoder.layers.5.attention.wq.weight``).
    """
    decoder = model.decoder
    if not isinstance(decoder, GPT):
        raise InputError(
            f"pipeline stages are written for the reference GPT, not {type(decoder).__name__}"
        )
    n_stages = len(counts)
    first, last = 0 in stages, n_stages - 1 in stages
    kept = {i for s in stages for i in stage_layers(counts, s)}
    decoder.layers = nn.ModuleDict(
        {str(i): layer for i, layer in enumerate(decoder.layers) if i in kept}
    )
    if not (first or (last and needs_embedding_on_last(model))):
        decoder.tok_embeddings = None
    if not last:
        decoder.norm = None
        decoder.output = None
        model.mtp = None


class StageBase(nn.Module):
    """What every pipeline stage of an :class:`~multitoken.mtp_model.MTPModel` shares: its
    place in the pipeline, its owner model and the last stage's end (final norm, MTP depths).
    Subclasses set ``embed``, ``layers``, ``norm``, ``mtp`` and ``output``."""

    def __init__(self, model, stage: int, num_stages: int):
        super().__init__()
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.stage = stage
        self._model = (model,)  # the owner: rotary tables, masks (not a submodule)

    @property
    def config(self):
        """The MTP configuration (the loss reads it)."""
        return self._model[0].config

    def finish(self, x: Tensor, positions: Tensor, mtp_input_ids, kwargs) -> tuple[Tensor, ...]:
        """The last stage's ``(h^0, ..., h^D)`` from its last layer's output ``x``."""
        hidden = [self.norm(x)]
        if self.mtp is not None:
            if mtp_input_ids is None:
                raise InputError("the last pipeline stage needs mtp_input_ids ([b, D, T])")
            zero = positions == 0 if self.config.zero_first_embedding else None
            ids = mtp_input_ids.transpose(0, 1)
            hidden += self.mtp(hidden[0], ids, self.embed, zero, **kwargs)
        # Views: the schedule detaches a last stage's outputs in place after its backward,
        # which the zero-bubble schedules' later weight pass (and the next depth's saved
        # input) could not survive; it leaves views alone.
        return tuple(h.view_as(h) for h in hidden)


class GPTStage(StageBase):
    """One pipeline stage of a pruned :class:`~multitoken.mtp_model.MTPModel`.

    Its submodules are the model's own (no copy): the embedding (first stage; last stage
    when it needs one), the stage's main layers, and on the last stage the final norm, the
    MTP depths and the untied head. The first stage takes token ids, the others the hidden
    state of the stage before; the last returns ``(h^0, ..., h^D)``.

    Args:
        model: the rank's pruned model (:func:`prune_model`).
        stage: this stage's index; num_stages: how many there are.
        counts: main layers per stage.
    """

    def __init__(self, model, stage: int, num_stages: int, counts: Sequence[int]):
        super().__init__(model, stage, num_stages)
        decoder = model.decoder
        embed = self.is_first or (self.is_last and needs_embedding_on_last(model))
        self.embed = decoder.tok_embeddings if embed else None
        self.layers = nn.ModuleDict(
            {str(i): decoder.layers[str(i)] for i in stage_layers(counts, stage)}
        )
        self.norm = decoder.norm if self.is_last else None
        self.mtp = model.mtp if self.is_last else None
        self.output = decoder.output if self.is_last else None

    @property
    def head_weight(self) -> Tensor:
        """``[V, H]`` the head the last stage's loss uses (its embedding copy when tied)."""
        return self.embed.weight if self.output is None else self.output.weight

    def forward(
        self,
        x: Tensor,
        doc_ids: Tensor,
        positions: Tensor,
        seq_index: Tensor,
        mtp_input_ids: Tensor | None = None,
        kv_doc_ids: Tensor | None = None,
        kv_positions: Tensor | None = None,
        kv_seq_index: Tensor | None = None,
        one_per_row: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """``x``: ``[b, T]`` token ids (first stage) or ``[b, T, H]``; the layout of the
        microbatch as tensors; ``mtp_input_ids``: ``[b, D, T]``."""
        decoder = self._model[0].decoder
        layout = SequenceLayout(doc_ids, positions, seq_index, one_per_row)
        kv_layout = None
        if kv_doc_ids is not None:
            kv_layout = SequenceLayout(kv_doc_ids, kv_positions, kv_seq_index)
        kwargs = decoder.layer_kwargs(layout, kv_layout)
        if self.is_first:
            x = self.embed(x)
        recompute = decoder.config.recompute and torch.is_grad_enabled()
        for layer in self.layers.values():
            if recompute:
                x = checkpoint(layer, x, use_reentrant=False, **kwargs)
            else:
                x = layer(x, **kwargs)
        if not self.is_last:
            return x
        return self.finish(x, positions, mtp_input_ids, kwargs)
