"""Context, tensor and data parallelism for MTP training on ``torch.distributed``.

* :mod:`.mesh`: the ``(dp_replicate, dp_shard, cp, tp)`` mesh and its process groups.
* :mod:`.plan`: the load-balanced split of a batch over the CP ranks.
* :mod:`.halo`: the MTP halo of every chunk, and who owns it.
* :mod:`.context`: CP shards with halos and the one-collective fallback exchange.
* :mod:`.reduce`: the step's collectives (global normaliser, gradient sum, metrics).
* :mod:`.apply`: ``parallelize(model, groups)``: all-gather-KV attention.
* :mod:`.tensor`: ``apply_tp(model, groups)``: tensor parallelism with DTensor.
* :mod:`.vocab_loss`: the vocabulary-parallel chunked cross-entropy.
* :mod:`.fsdp`: ``apply_fsdp(model, mesh)``: FSDP2 (or HSDP) over the data x context-parallel ranks.
* :mod:`.grad_norm`: gradient clipping over parameters sharded on different meshes.
"""

from multitoken.parallel.apply import gather_sequence, parallelize
from multitoken.parallel.context import (
    CPShard,
    ShardMismatchError,
    ShardPlan,
    exchange_halo,
    plan_shards,
    shard_batch,
)
from multitoken.parallel.fsdp import apply_fsdp
from multitoken.parallel.grad_norm import clip_grad_norm, grad_norm
from multitoken.parallel.mesh import ParallelGroups, build_mesh, init_distributed, local_device
from multitoken.parallel.reduce import MetricSums, global_normalizer, sync_gradients
from multitoken.parallel.tensor import apply_tp
from multitoken.parallel.vocab_loss import VocabParallelCrossEntropy

__all__ = [
    "local_device",
    "init_distributed",
    "build_mesh",
    "ParallelGroups",
    "ShardPlan",
    "plan_shards",
    "CPShard",
    "shard_batch",
    "exchange_halo",
    "ShardMismatchError",
    "global_normalizer",
    "sync_gradients",
    "MetricSums",
    "parallelize",
    "apply_fsdp",
    "apply_tp",
    "clip_grad_norm",
    "grad_norm",
    "VocabParallelCrossEntropy",
    "gather_sequence",
]
