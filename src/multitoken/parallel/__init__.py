"""Context and data parallelism for MTP training on ``torch.distributed``.

* :mod:`.mesh`: the ``(dp, cp)`` mesh and its process groups.
* :mod:`.plan`: the load-balanced split of a batch over the CP ranks.
* :mod:`.context`: CP shards with halos, the one-collective fallback exchange, the step's
  collectives (global normaliser, gradient sum, metrics).
* :mod:`.apply`: ``parallelize(model, groups)``: all-gather-KV attention.
"""

from multitoken.parallel.apply import gather_sequence, parallelize
from multitoken.parallel.context import (
    CPShard,
    MetricSums,
    ShardMismatchError,
    ShardPlan,
    exchange_halo,
    global_normalizer,
    plan_shards,
    shard_batch,
    sync_gradients,
)
from multitoken.parallel.mesh import ParallelGroups, build_mesh, init_distributed

__all__ = [
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
    "gather_sequence",
]
