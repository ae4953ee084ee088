"""The pieces of one training step: this rank's place, its batch, the model, the optimiser.

:func:`prepare_step` turns the global batch (the same on every rank, from the deterministic
loader) into this rank's :class:`~multitoken.batch.StepBatch`: its data-parallel rows, then,
under context parallelism, its shard with the MTP halo (or the one-collective exchange), and
the per-depth valid-target counts summed over every rank (one all_reduce, the step's first
collective). Whatever the layout, the trainer then runs one path:
``step_loss(model, batch, weight).loss.backward()``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from multitoken.batch import StepBatch
from multitoken.data import dp_slice
from multitoken.errors import ConfigError
from multitoken.layout import SequenceLayout
from multitoken.mtp_model import MTPModel
from multitoken.parallel import (
    ParallelGroups,
    apply_fsdp,
    apply_tp,
    exchange_halo,
    global_normalizer,
    init_distributed,
    parallelize,
    shard_batch,
)
from multitoken.train.config import TrainConfig

__all__ = [
    "Ranks",
    "setup_ranks",
    "prepare_step",
    "build_model",
    "compile_layers",
    "build_optimizer",
    "lr_lambda",
]


def _coordinate(name: str, alone: int) -> property:
    """A coordinate of :class:`Ranks`, read from its groups (``alone`` in one process)."""
    return property(lambda self: alone if self.groups is None else getattr(self.groups, name))


@dataclass(frozen=True)
class Ranks:
    """This process's place in the ``(dp, cp, tp)`` mesh; ``groups`` is None in a single
    process. The coordinates are those of ``groups``, not copies."""

    groups: ParallelGroups | None = None

    dp_rank = _coordinate("dp_rank", 0)
    dp_size = _coordinate("dp_size", 1)
    cp_rank = _coordinate("cp_rank", 0)
    cp_size = _coordinate("cp_size", 1)
    tp_rank = _coordinate("tp_rank", 0)
    tp_size = _coordinate("tp_size", 1)

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return 0 if self.groups is None else dist.get_rank()

    @property
    def world_group(self) -> dist.ProcessGroup | None:
        """A dedicated group of every rank (checkpoints, data preparation, metrics); the
        DP x CP group when ``tp = 1``; None in one process."""
        return None if self.groups is None else self.groups.world_group

    @property
    def token_group(self) -> dist.ProcessGroup | None:
        """The DP x CP group: every rank with other tokens, never a TP peer (same tokens).
        The loss normaliser sums over it; None in one process."""
        return None if self.groups is None else self.groups.dp_cp_group

    @property
    def world(self) -> int:
        """Processes: ``dp * cp * tp``."""
        return self.dp_size * self.cp_size * self.tp_size

    @property
    def token_world(self) -> int:
        """Ranks holding different tokens (the size of :attr:`token_group`): ``dp * cp``."""
        return self.dp_size * self.cp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_ranks(cfg: TrainConfig, device: torch.device) -> Ranks:
    """Join the process group (when ``dp * cp * tp > 1``) and build the mesh's groups.

    The group is joined in a namespace of the launcher's store of its own for every attempt
    (:func:`~multitoken.parallel.init_distributed`): ``torchrun --max-restarts``
    restarts the ranks on a store that still holds the previous attempt's addresses.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and cfg.parallel.world == 1:
        return Ranks(None)
    if world != cfg.parallel.world:  # before any collective: no rank hangs
        raise ConfigError(
            f"{world} ranks were started but parallel.dp * parallel.cp * parallel.tp = "
            f"{cfg.parallel.world}: launch dp * cp * tp ranks"
        )
    init_distributed()
    p = cfg.parallel
    groups = ParallelGroups.build(p.dp, p.cp, device.type, p.tp, p.dp_replicate)
    return Ranks(groups)


def prepare_step(
    global_batch: dict[str, torch.Tensor],
    ranks: Ranks,
    depth: int,
    pad_id: int,
    device: torch.device,
    lookahead: str = "halo",
) -> StepBatch:
    """This rank's :class:`StepBatch` of a global batch (``input_ids``, ``labels``,
    ``cu_seqlens`` as the loader yields it).

    Args:
        global_batch: the same dict on every rank.
        ranks: this rank's place (:func:`setup_ranks`).
        depth: D.
        pad_id: input fill where a lookahead leaves its document.
        device: where the batch goes.
        lookahead: ``"halo"`` (from the global batch, no message) or ``"exchange"`` (one
            all_to_all over the CP group, as when only local shards exist).
    """
    local = dp_slice(global_batch, ranks.dp_rank, ranks.dp_size)
    ids, labels = local["input_ids"].to(device), local["labels"].to(device)
    layout = SequenceLayout.from_cu_seqlens(local["cu_seqlens"].to(device), ids.shape)
    if ranks.cp_size == 1:
        # No sharder at cp = 1: the CP tests compare the sharded path against this one.
        batch = StepBatch.build(ids, labels, layout, depth, pad_id)
        normalizer = global_normalizer(batch.depth_labels, ranks.token_group)
        return replace(batch, normalizer=normalizer)
    exchange = lookahead == "exchange"
    shard = shard_batch(
        ids, labels, layout, ranks.cp_size, ranks.cp_rank, depth, pad_id, halo=not exchange
    )
    # The step's first collective: the global valid-target counts per depth, which also
    # checks that every CP peer cut the same plan (so a mismatch fails on every rank).
    normalizer = global_normalizer(shard, ranks.token_group, tp_size=ranks.tp_size)
    if exchange:  # one all_to_all, all depths
        shard = exchange_halo(shard, group=ranks.groups.cp_group, tp_size=ranks.tp_size)
    return shard.step_batch(normalizer)


def build_model(
    cfg: TrainConfig, vocab_size: int, pad_id: int, ranks: Ranks, device: torch.device
) -> MTPModel:
    """The reference GPT with MTP, seeded by ``train.seed``, on ``device``, with parallelism
    applied from outside in torchtitan's order: tensor parallelism (DTensor), context
    parallelism (the K/V all-gather hooks), then ``train.compile`` (per layer), then FSDP2
    over the data x context-parallel ranks (replaces a gradient all_reduce), as HSDP on a
    2-D mesh when ``parallel.dp_replicate > 1``.
    """
    torch.manual_seed(cfg.train.seed)
    if cfg.model.hf:  # a Hugging Face model: the same parallelism below, but no TP
        from multitoken.train.hf import build_hf_model  # optional extra: only when used

        model = build_hf_model(cfg, pad_id, device)
    else:
        model = MTPModel.from_config(cfg.model_config(vocab_size), cfg.mtp, pad_id=pad_id)
        model.to(device)
    if ranks.tp_size > 1:
        apply_tp(model, ranks.groups, sequence_parallel=cfg.parallel.sequence_parallel)
    if ranks.cp_size > 1:
        parallelize(model, ranks.groups)
    if cfg.train.compile:
        compile_layers(model, verbose=ranks.is_main)
    if ranks.token_world > 1:
        apply_fsdp(model, ranks.groups.fsdp_mesh)
    return model


def compile_available(device_type: str = "cpu") -> str | None:
    """None when torch.compile works here, else the reason (no C++ compiler, no Triton...)."""
    try:
        probe = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        probe(torch.ones(4, device=device_type))
    except Exception as err:  # any backend failure means: train eagerly
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def compile_layers(model: MTPModel, verbose: bool = True) -> bool:
    """Compile every main layer and MTP depth in place (each its own graph, reused by every
    layer of the same shape); returns False, after saying why, where compile cannot run."""
    device_type = model.head_weight.device.type
    reason = compile_available(device_type)
    if reason is not None:
        if verbose:
            print(f"train.compile=true but torch.compile cannot run here ({reason}): "
                  "training eagerly", flush=True)  # fmt: skip
        return False
    embedding = getattr(model.decoder, "tok_embeddings", None)
    if embedding is not None and isinstance(embedding.weight, DTensor):
        # Under TP the embedding's output is a view of a DTensor's local tensor, and a
        # compiled layer given that view as an input hands its gradient back as a plain
        # tensor to the DTensor all-reduce's backward, which fails (measured, torch 2.13:
        # "'Tensor' object has no attribute '_local_tensor'"). A copy is an ordinary input.
        embedding.register_forward_hook(lambda module, args, output: output.clone())
    layers = getattr(model.decoder, "layers", [])
    for module in [*layers, *(model.mtp.depths if model.mtp is not None else [])]:
        # Shapes are fixed by the packing (seq_len, batch): one static graph per kind.
        module.compile(dynamic=False)
    return True


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, over the trainable parameters (the MTP heads
    alone under ``mtp.freeze_base``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` over ``train.steps``."""
    t = cfg.train

    def factor(step: int) -> float:  # step = optimiser steps taken so far
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        floor = t.min_lr / t.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
