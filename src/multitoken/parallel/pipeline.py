"""Pipeline parallelism on ``torch.distributed.pipelining``: a step of microbatches whose loss
is the one-process loss exactly (docs/parallelism.md#pipeline-parallelism).

The model side cuts the stages (:mod:`multitoken.models.pipeline`, assembled by
``pipeline_gpt``); here they are run by one of PyTorch's schedules (:data:`PP_SCHEDULES`, no
hand-written one). What MTP adds:

* **The loss of a microbatch divides by the step's counts.** The last stage computes each
  microbatch's per-depth loss sums through the chunked (or vocabulary-parallel) head and
  divides them by the step's valid-target counts per depth (every microbatch, every DP x CP
  rank: the :class:`~multitoken.batch.StepBatch`'s normaliser), never by the microbatch's. The
  schedule runs unscaled (``scale_grads=False``): the microbatches' losses and gradients
  simply add up to the step's.
* **Layouts travel with their microbatch.** Every stage of a pipeline reads the same rows, so
  each one splits the step's layout (document ids, positions, the CP key layout) and the MTP
  inputs into the same microbatches itself: no layout is ever sent. Only the hidden states go
  forward and their gradients back, one message per microbatch and stage boundary.
* **The shared embedding.** The last stage holds a copy of the embedding (the MTP depths
  embed tokens ``i + k``; tied, it is the head too). After the schedule the two copies'
  gradients are summed over ``embed_group``, so the copies stay equal after every update.
* **One record per step everywhere.** The last stage's summed losses are broadcast over the
  pipeline group (one message), so every rank logs, checks for non-finite values and
  checkpoints with the same numbers; the gradient norm is summed over the pipeline group with
  the embedding counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class
from torch.distributed.tensor import DTensor

from multitoken.batch import StepBatch
from multitoken.errors import ConfigError
from multitoken.loss import linear_cross_entropy
from multitoken.mtp import DepthLosses
from multitoken.mtp_model import hidden_loss
from multitoken.parallel.grad_norm import grad_norm

__all__ = [
    "PP_SCHEDULES",
    "stages_per_rank",
    "rank_stages",
    "stage_rank",
    "split_layers",
    "parse_layers",
    "check_pipeline",
    "Pipeline",
]

# PyTorch's schedules by their own names (torch.distributed.pipelining.get_schedule_class).
PP_SCHEDULES = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
_V_SHAPED = ("ZBVZeroBubble", "DualPipeV")  # rank r holds stages r and 2 pp - 1 - r


def _schedule_class(name: str):
    if name not in PP_SCHEDULES:
        raise ConfigError(f"must be one of {PP_SCHEDULES}, got {name!r}", "pp_schedule")
    return get_schedule_class(name)


def stages_per_rank(schedule: str) -> int:
    """1 for the single-stage schedules (GPipe, 1F1B), 2 for the interleaved and V ones."""
    return 2 if issubclass(_schedule_class(schedule), PipelineScheduleMulti) else 1


def rank_stages(schedule: str, pp: int, pp_rank: int) -> list[int]:
    """The stage indices pipeline rank ``pp_rank`` runs (looped, or V-shaped)."""
    v = stages_per_rank(schedule)
    if schedule in _V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + pp * i for i in range(v)]


def stage_rank(schedule: str, pp: int, stage: int) -> int:
    """The pipeline rank that runs ``stage``."""
    return next(r for r in range(pp) if stage in rank_stages(schedule, pp, r))


def split_layers(
    n_layers: int, n_stages: int, layers: Sequence[int] = (), name: str = "model.n_layers"
) -> list[int]:
    """Main layers per stage: ``layers`` when given (summing to ``n_layers``, each >= 1 but
    the last: a stage without parameters would only relay), else an even split. ``name``: what
    the errors call the layer count (a Hugging Face folder's ``num_hidden_layers``).

    Raises:
        ConfigError: (``parallel.pp_layers``) a list of the wrong length or sum, or layers
            that ``n_stages`` does not divide evenly.
    """
    if layers:
        layers = list(layers)
        if len(layers) != n_stages or min(layers[:-1]) < 1 or sum(layers) != n_layers:
            raise ConfigError(
                f"must give {n_stages} layer counts (one per pipeline stage) summing to "
                f"{name}={n_layers}, each >= 1 but the last (0: the MTP depths and the "
                f"head on a stage of their own), got {','.join(map(str, layers))}",
                "pp_layers",
            )
        return layers
    if n_layers % n_stages:
        raise ConfigError(
            f"{name}={n_layers} does not split evenly over {n_stages} pipeline stages: "
            f'set parallel.pp_layers to {n_stages} counts summing to {n_layers} (e.g. "'
            f'{_uneven(n_layers, n_stages)}")'
            + (f" or choose n_layers a multiple of {n_stages}" if name == "model.n_layers" else "")
        )
    return [n_layers // n_stages] * n_stages


def _uneven(n_layers: int, n_stages: int) -> str:
    base, extra = divmod(n_layers, n_stages)
    return ",".join(str(base + (i < extra)) for i in range(n_stages))


def parse_layers(text: str) -> tuple[int, ...]:
    """``parallel.pp_layers`` ("3,3,2") as numbers; "" = an even split (empty)."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if not all(p.isdigit() for p in parts):
        raise ConfigError(
            f'must be comma-separated layer counts such as "3,3,2", got {text!r}', "pp_layers"
        )
    return tuple(int(p) for p in parts)


def check_pipeline(
    pp: int, schedule: str, microbatches: int, rows: int, n_layers: int, layers: str = "",
    name: str = "model.n_layers",
) -> None:  # fmt: skip
    """Refuse, before any rank starts, a pipeline the batch, the model or the schedule cannot
    take (each error one line, naming the ``parallel.*`` key to change).

    Args:
        pp: pipeline ranks; schedule: a name of :data:`PP_SCHEDULES`.
        microbatches: ``parallel.pp_microbatches`` (0 = one per stage); rows: the rows each
            DP rank's batch holds; n_layers: the model's main layers; layers: ``pp_layers``;
            name: what the errors call ``n_layers``.
    """
    n_stages = pp * stages_per_rank(schedule)
    microbatches = microbatches or n_stages
    split_layers(n_layers, n_stages, parse_layers(layers), name)
    if rows % microbatches:
        raise ConfigError(
            f"parallel.pp_microbatches={microbatches} does not divide the {rows} rows each "
            "data-parallel rank's batch holds (data.batch_size / parallel.dp): choose a divisor "
            "of it"
        )
    needs_all = schedule in ("1F1B", "DualPipeV", "ZBVZeroBubble")
    if needs_all and microbatches < n_stages:
        raise ConfigError(
            f"parallel.pp_schedule={schedule} needs at least one microbatch per stage "
            f"({n_stages}), got parallel.pp_microbatches={microbatches}"
        )
    if schedule not in _V_SHAPED and n_stages > pp and microbatches % max(1, microbatches // pp):
        raise ConfigError(
            f"parallel.pp_schedule={schedule} runs the microbatches in rounds that "
            f"parallel.pp_microbatches={microbatches} does not fill: make it a multiple of "
            f"parallel.pp={pp}, or at most {pp}"
        )


def _whole(stage: int, n_stages: int):
    """The last stage's backward runs whole, never split into an input and a weight pass.

    The zero-bubble schedules split each backward in two: input gradients first, weight
    gradients later, one ``autograd.grad`` per group of weights. On the last stage the head
    (tied: the embedding too) feeds the D + 1 losses and the MTP depths, so those groups share
    graph nodes that the first group's pass frees. Running its backward whole at the input step
    (its deferred weight step then does nothing) keeps the schedule and the gradients exact;
    every other stage is split as the schedule wants.
    """
    if stage != n_stages - 1:
        return None
    return lambda: _nothing


def _nothing() -> None:
    return None


class Pipeline:
    """This rank's pipeline stages under one schedule; :meth:`step` runs a whole step.

    Args:
        modules: this rank's stage modules (in :func:`rank_stages` order); each has ``embed``
            (the module or None) and the last one ``config`` and ``head_weight``.
        stages: their indices; n_stages: how many the pipeline has.
        schedule: a name of :data:`PP_SCHEDULES`; microbatches: per step.
        pp_group: the pipeline group; embed_group: the first and last ranks' group (None
            when one rank holds both copies, or the last stage needs no embedding).
        device: where the stages run.
        cross_entropy: the head's loss (vocabulary-parallel under TP).
        ignore_index: the "no target" label.
    """

    def __init__(self, modules: list[nn.Module], stages: list[int], n_stages: int,
                 schedule: str, microbatches: int, pp_group, embed_group, device,
                 cross_entropy=linear_cross_entropy, ignore_index: int = -100):  # fmt: skip
        self.modules, self.n_stages, self.microbatches = modules, n_stages, microbatches
        self.pp_group, self.embed_group = pp_group, embed_group
        pp = dist.get_world_size(pp_group)
        self.last_rank = stage_rank(schedule, pp, n_stages - 1)
        self.cross_entropy, self.ignore_index = cross_entropy, ignore_index
        cls = _schedule_class(schedule)
        self.stages = [
            PipelineStage(m, s, n_stages, device, group=pp_group, dw_builder=_whole(s, n_stages))
            for m, s in zip(modules, stages)
        ]
        multi = issubclass(cls, PipelineScheduleMulti)
        self.schedule = cls(
            self.stages if multi else self.stages[0], microbatches, loss_fn=self._loss,
            scale_grads=False,
        )  # fmt: skip
        self.last = next((m for m, s in zip(modules, stages) if s == n_stages - 1), None)
        self._records: list[DepthLosses] = []
        self._batch: StepBatch | None = None
        self._mtp_weight, self._acceptance = 0.0, False

    def parameters(self):
        """This rank's parameters, each once."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.modules:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _loss(self, output, target: Tensor) -> Tensor:
        batch = replace(self._batch, depth_labels=target.transpose(0, 1))
        hidden = list(output) if isinstance(output, (tuple, list)) else [output]  # D = 0: h^0
        losses = hidden_loss(
            self.last, hidden, batch, self._mtp_weight, self.ignore_index,
            cross_entropy=self.cross_entropy, acceptance=self._acceptance,
        )  # fmt: skip
        self._records.append(losses)
        return losses.loss

    def _inputs(self, batch: StepBatch) -> tuple[tuple, dict]:
        layout, kv = batch.layout, batch.kv_layout
        kwargs = dict(doc_ids=layout.doc_ids, positions=layout.positions,
                      seq_index=layout.seq_index, one_per_row=layout.one_per_row)  # fmt: skip
        if kv is not None:
            kwargs.update(kv_doc_ids=kv.doc_ids, kv_positions=kv.positions,
                          kv_seq_index=kv.seq_index)  # fmt: skip
        if batch.num_depths:
            kwargs["mtp_input_ids"] = batch.mtp_input_ids.transpose(0, 1)  # [B, D, T]
        return (batch.input_ids,), kwargs

    def step(
        self, batch: StepBatch, mtp_weight: float, *, train: bool = True, acceptance: bool = False
    ) -> DepthLosses:
        """Forward (and, when ``train``, backward) of every microbatch of ``batch``; returns
        the step's losses (the sum over microbatches, the same on every pipeline rank). After
        a training step every gradient is the one-process gradient of the rank's parameters
        (the embedding copies' gradients summed)."""
        # Measured where the broadcast expects it (whole rows and vocabulary, D >= 1): the same
        # answer on every rank. Under CP the teacher rows i + k of a microbatch would need a
        # row halo of their own (the step's RowHalo covers the whole batch), so not there.
        whole = batch.kv_layout is None and self.cross_entropy is linear_cross_entropy
        measured = acceptance and whole and batch.num_depths > 0
        self._batch, self._mtp_weight, self._acceptance = batch, mtp_weight, measured
        self._records = []
        args, kwargs = self._inputs(batch)
        target = batch.depth_labels.transpose(0, 1)  # [B, D + 1, T]: split by rows
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, return_outputs=False, **kwargs)
        # The first step's metadata inference may run the loss on placeholder inputs first.
        self._records = self._records[-self.microbatches :]
        out = self._broadcast(batch.num_depths, measured, batch)
        if train:
            self._match_placements()
            self._sum_embedding_grads()
        self._records, self._batch = [], None
        return out

    def _broadcast(self, num_depths: int, acceptance: bool, batch: StepBatch) -> DepthLosses:
        """The last stage's summed losses on every pipeline rank (one broadcast)."""
        d1 = num_depths + 1
        sizes = [1, d1, d1, d1, d1] + ([num_depths, num_depths] if acceptance else [])
        if self._records:
            r = self._records
            fields = [torch.stack([x.loss.detach() for x in r]).sum(0)]
            for name in ("depth_loss", "depth_tokens", "depth_correct", "loss_sum"):
                fields.append(torch.stack([getattr(x, name).detach() for x in r]).sum(0))
            if acceptance:
                fields += [torch.stack([x.agree for x in r]).sum(0),
                           torch.stack([x.accept for x in r]).sum(0)]  # fmt: skip
            vec = torch.cat([f.double().reshape(-1) for f in fields])
        else:
            vec = torch.zeros(sum(sizes), dtype=torch.float64, device=batch.normalizer.device)
        dist.broadcast(vec, group=self.pp_group, group_src=self.last_rank)
        loss, depth_loss, tokens, correct, loss_sum, *acc = vec.split(sizes)
        return DepthLosses(
            loss[0].float(), depth_loss.float(), tokens.long(), correct.long(), loss_sum.float(),
            acc[0].long() if acc else None, acc[1] if acc else None,
        )  # fmt: skip

    def _match_placements(self) -> None:
        """Every DTensor gradient laid out as its parameter (a local slice, no message).

        Under TP a vocabulary-parallel embedding that is only an embedding (the first stage's;
        the last stage's copy when the head is untied) gets its gradient replicated over the
        TP ranks, while the parameter, and the last stage's tied copy's gradient, are sharded
        by rows: summing the two copies' local tensors needs the same layout (else their
        sizes differ: gloo's "2048 vs 1024" abort), and so does the optimiser.
        """
        for param in self.parameters():
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad.redistribute(param.device_mesh, param.placements)

    def _embedding(self) -> nn.Parameter | None:
        module = next((m for m in self.modules if m.embed is not None), None)
        return None if module is None else module.embed.weight

    def _sum_embedding_grads(self) -> None:
        """The two copies' gradients summed (each rank's local shard under FSDP2 / TP)."""
        weight = self._embedding()
        if self.embed_group is None or weight is None or not weight.requires_grad:
            return
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self.embed_group)

    def grad_norm(self, max_norm: float = 0.0) -> Tensor:
        """The global gradient norm over every stage (the embedding once), clipped to
        ``max_norm`` when > 0: the pipeline's ``clip_grad_norm``."""
        params = [p for p in self.parameters() if p.grad is not None]
        counted = params
        weight = self._embedding()
        if self.embed_group is not None and self.last is not None and not self.stages[0].is_first:
            counted = [p for p in params if p is not weight]  # the first stage counts it
        device = self.stages[0].device
        square = grad_norm(counted, device).pow(2)
        dist.all_reduce(square, group=self.pp_group)
        norm = square.sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            with torch.no_grad():
                for p in params:
                    local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    local.mul_(scale.to(local.dtype))
        return norm
