"""The ``[parallel]`` section of the training configuration: the layout of the ranks
(pipeline, data, context and tensor parallel sizes) and how each parallelism runs."""

from __future__ import annotations

from dataclasses import dataclass

from multitoken.errors import require
from multitoken.parallel.dims import ParallelDims
from multitoken.parallel.pipeline import parse_layers, stages_per_rank

__all__ = ["ParallelSection", "HALO_FILLS"]

# How CP stripes get their halos (parallel.halo_fill).
HALO_FILLS = ("sharding", "exchange")


@dataclass
class ParallelSection:
    """Parallelism over local or torchrun-launched ranks (world = pp * dp * cp * tp).

    Attributes:
        dp: data-parallel ranks.
        dp_replicate: HSDP: split the dp ranks into this many replicas of dp / dp_replicate
            ranks each; FSDP2 shards parameters, gradients and optimiser state over the ranks
            of one replica (times cp) and all-reduces gradients across replicas. Must divide
            dp; 1 = shard over all dp * cp ranks. Same data and losses for every value.
        cp: context-parallel ranks (each row is sharded over them).
        halo_fill: how each CP stripe gets the up-to-D values that follow it in its document:
            "sharding" (read from the global batch when it is sharded, no message) or
            "exchange" (one all-to-all per step from local shards). Was parallel.lookahead.
        tp: tensor-parallel ranks (heads, feed-forward and vocabulary split over them).
        sequence_parallel: with tp > 1, split the activations between blocks (norms,
            residual adds) by sequence over the TP ranks; data.seq_len / cp must then be a
            multiple of tp. False: replicated norms and activations.
        timeout_s: seconds a collective waits for the slowest rank before the run fails
            (the others wait while rank 0 prepares the data or hashes a checkpoint).
        pp: pipeline-parallel ranks (the outermost dim): the main layers are cut into stages,
            the MTP depths and the head sit on the last one (docs/parallelism.md).
        pp_schedule: PyTorch's pipeline schedule: "GPipe", "1F1B", "Interleaved1F1B",
            "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble" or "DualPipeV" (the last
            five run two stages per rank).
        pp_microbatches: microbatches per step (they divide each DP rank's rows); 0 = one
            per stage.
        pp_layers: main layers per stage, comma-separated (e.g. "3,3,2"), each >= 1 but the
            last (a 0 gives the MTP depths and the head a stage of their own); "" = an even
            split.
    """

    dp: int = 1
    dp_replicate: int = 1
    cp: int = 2
    halo_fill: str = "sharding"
    tp: int = 1
    sequence_parallel: bool = True
    timeout_s: int = 3600
    pp: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 0
    pp_layers: str = ""

    def __post_init__(self) -> None:
        self.dims  # the sizes are checked once, by ParallelDims  # noqa: B018
        require(
            [
                (self.halo_fill in HALO_FILLS, "halo_fill", 'must be "sharding" or "exchange"'),
                (self.timeout_s >= 1, "timeout_s", "must be >= 1"),
                (self.pp_microbatches >= 0, "pp_microbatches", "must be >= 0 (0 = one a stage)"),
            ],
            self,
        )
        stages_per_rank(self.pp_schedule)  # a schedule torch has
        parse_layers(self.pp_layers)

    @property
    def dims(self) -> ParallelDims:
        """The layout these sizes describe (not yet built)."""
        return ParallelDims(
            dp=self.dp, cp=self.cp, tp=self.tp, dp_replicate=self.dp_replicate, pp=self.pp
        )

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def microbatches(self) -> int:
        """``pp_microbatches``, or one per pipeline stage."""
        return self.pp_microbatches or self.pp * stages_per_rank(self.pp_schedule)
