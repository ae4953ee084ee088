"""Context, tensor and data parallelism for MTP training on ``torch.distributed``: the
model-agnostic parts (each model applies them in its own ``parallelize_<model>``).

* :mod:`.dims`: ``ParallelDims``: the ``(dp_replicate, dp_shard, cp, tp)`` sizes, mesh, groups
  and this rank's coordinates.
* :mod:`.rendezvous`: joining the process group (a store namespace per restart).
* :mod:`.plan`: the load-balanced split of a batch over the CP ranks.
* :mod:`.halo`: the MTP halo of every stripe, and who owns it.
* :mod:`.context`: CP shards with halos and the one-collective fallback exchange.
* :mod:`.row_halo`: ``RowHalo``: the rows of ``h^0`` past a stripe (the distillation teacher).
* :mod:`.reduce`: the step's collectives (global normaliser, gradient sum, metrics).
* :mod:`.kv_gather`: ``apply_cp(model, cp_group)``: all-gather-KV attention.
* :mod:`.tensor`: tensor-parallel building blocks (sequence-parallel norms, checks).
* :mod:`.compile`: ``torch.compile`` per module, with a probe.
* :mod:`.vocab_loss`: the vocabulary-parallel chunked cross-entropy.
* :mod:`.vocab_distill`: the acceptance-aware losses and metrics over a vocabulary-parallel head.
* :mod:`.fsdp`: ``apply_fsdp(model, mesh)``: FSDP2 (or HSDP) over the data x context-parallel
  ranks.
* :mod:`.grad_norm`: gradient clipping over parameters sharded on different meshes.
"""

from multitoken.parallel.context import (
    CPShard,
    ShardMismatchError,
    ShardPlan,
    exchange_halo,
    plan_shards,
    shard_batch,
)
from multitoken.parallel.dims import ParallelDims
from multitoken.parallel.fsdp import apply_fsdp
from multitoken.parallel.grad_norm import clip_grad_norm, grad_norm
from multitoken.parallel.kv_gather import apply_cp, gather_sequence
from multitoken.parallel.reduce import MetricSums, global_normalizer, sync_gradients
from multitoken.parallel.rendezvous import init_distributed, local_device
from multitoken.parallel.row_halo import RowHalo
from multitoken.parallel.vocab_loss import VocabParallelCrossEntropy

__all__ = [
    "local_device",
    "init_distributed",
    "ParallelDims",
    "ShardPlan",
    "plan_shards",
    "CPShard",
    "shard_batch",
    "exchange_halo",
    "RowHalo",
    "ShardMismatchError",
    "global_normalizer",
    "sync_gradients",
    "MetricSums",
    "apply_cp",
    "apply_fsdp",
    "clip_grad_norm",
    "grad_norm",
    "VocabParallelCrossEntropy",
    "gather_sequence",
]
