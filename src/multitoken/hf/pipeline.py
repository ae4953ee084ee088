"""Pipeline stages of an :class:`~multitoken.mtp_model.MTPModel` over an
:class:`~multitoken.hf.HFDecoder` whose backbone is frozen (``mtp.freeze_base``).

The cut is the reference GPT's (:mod:`multitoken.models.pipeline`): ``S`` consecutive runs of
the transformers decoder layers, the embedding on stage 0, the final norm, the MTP depths, the
head and a copy of the embedding (the depths embed tokens ``i + k``) on the last stage
(docs/parallelism.md#pipeline-parallelism). A rank keeps one model holding only its stages'
modules (:func:`prune_hf_model`); the decoder layers become an ``nn.ModuleDict`` keyed by their
global index, so every parameter keeps its one-process name
(``decoder.model.model.layers.5.self_attn.q_proj.weight``) and checkpoints load under any
pipeline layout.

Heads-only only: no backbone parameter trains, so the embedding copies never need their
gradients summed (neither copy has one) and stay equal because neither changes; the last
stage's MTP depths are the only trainable parameters of the pipeline. Nothing here
communicates.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from multitoken.errors import ConfigError
from multitoken.hf.adapter import HFDecoder
from multitoken.layout import SequenceLayout
from multitoken.models.pipeline import StageBase, stage_layers

__all__ = ["PIPELINE_MODEL_TYPES", "prune_hf_model", "HFStage"]

# The dense architectures whose decoder layers are cut into stages (one layer class, no
# router or recurrent state); the others are refused before any rank starts.
PIPELINE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _check(model) -> HFDecoder:
    decoder = model.decoder
    if not isinstance(decoder, HFDecoder) or not model.config.freeze_base or model.mtp is None:
        raise ConfigError(
            "Hugging Face pipeline stages are cut for heads-only runs (an HFDecoder, "
            "mtp.freeze_base=true, mtp.num_depths >= 1)"
        )
    return decoder


def prune_hf_model(model, stages: Sequence[int], counts: Sequence[int]) -> None:
    """Keep only what ``stages`` (this rank's stage indices of ``len(counts)``) run, in place:
    the stages' decoder layers (keyed by global index), the embedding on the first and the
    last stage, the final norm, the head and the MTP depths on the last."""
    decoder = _check(model)
    base, n_stages = decoder.base, len(counts)
    first, last = 0 in stages, n_stages - 1 in stages
    kept = {i for s in stages for i in stage_layers(counts, s)}
    base.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(base.layers) if i in kept})
    if not (first or last):
        base.embed_tokens = None
    if not last:
        base.norm = None
        decoder.model.lm_head = None
        model.mtp = None


class HFStage(StageBase):
    """One pipeline stage of a pruned heads-only HF :class:`~multitoken.mtp_model.MTPModel`.

    The first stage takes token ids, the others the hidden state of the stage before; the last
    returns ``(h^0, ..., h^D)``. Its submodules are the model's own (no copy).

    Args:
        model: the rank's pruned model (:func:`prune_hf_model`).
        stage: this stage's index; num_stages: how many there are.
        counts: decoder layers per stage.
    """

    def __init__(self, model, stage: int, num_stages: int, counts: Sequence[int]):
        super().__init__(model, stage, num_stages)
        decoder = model.decoder
        base = decoder.base
        self.embed = base.embed_tokens if self.is_first or self.is_last else None
        own = stage_layers(counts, stage)
        self.layers = nn.ModuleDict({str(i): base.layers[str(i)] for i in own})
        self.norm = base.norm if self.is_last else None
        self.mtp = model.mtp if self.is_last else None
        self.output = decoder.model.lm_head if self.is_last else None

    @property
    def head_weight(self) -> Tensor:
        """``[V, H]`` the head the last stage's loss uses (the embedding when tied)."""
        return self.output.weight

    def forward(
        self,
        x: Tensor,
        doc_ids: Tensor,
        positions: Tensor,
        seq_index: Tensor,
        mtp_input_ids: Tensor | None = None,
        one_per_row: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """As :meth:`multitoken.models.pipeline.GPTStage.forward` (whole rows: no context
        parallelism)."""
        model = self._model[0]
        layout = SequenceLayout(doc_ids, positions, seq_index, one_per_row)
        kwargs = model.decoder.layer_kwargs(layout)
        if self.is_first:
            x = self.embed(x)
        else:
            # The backbone is frozen: no gradient flows back into it, so a received hidden
            # state is a constant (the schedule marks it as needing one). No graph is kept
            # through the frozen layers, no stage but the last runs a backward and no
            # gradient is ever sent back: only the forward activations travel.
            x = x.detach()
        for layer in self.layers.values():
            out = layer(x, **kwargs)
            x = out[0] if isinstance(out, tuple) else out  # as HFDecoder.hidden
        if not self.is_last:
            return x
        return self.finish(x, positions, mtp_input_ids, kwargs)
