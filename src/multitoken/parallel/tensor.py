"""Tensor-parallel building blocks on DTensor, for any model's ``parallelize_<model>``.

What is not tied to a model's attribute names: the sequence dim of ``[B, T, H]`` activations
(:data:`SEQ`), norms that run on sequence shards and hand the full sequence back
(:func:`gathered_norm`), the one all-reduce per sequence-parallel norm weight
(:func:`sum_weight_gradients`), the check that a row's length splits over the TP ranks
(:func:`check_sequence`). The reference GPT's plan, which names its projections, lives beside
it (:mod:`multitoken.models.parallelize`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    PrepareModuleOutput,
    SequenceParallel,
    parallelize_module,
)

from multitoken.errors import InputError

__all__ = ["SEQ", "check_sequence", "gathered_norm", "sum_weight_gradients"]


# The sequence dimension of the [B, T, H] activations.
SEQ = Shard(1)


def _summed(grad: Tensor) -> Tensor:
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        return grad.redistribute(placements=[Replicate()] * len(grad.placements))
    return grad


def sum_weight_gradients(norm: nn.Module) -> None:
    """A sequence-parallel norm's weight gradient comes out of the backward as pending sums
    over TP (each rank saw its own positions): sum them there, one all-reduce per weight, so
    the gradient is the replicated full one (FSDP2 would do the same; plain TP needs it)."""
    for param in norm.parameters():
        if param.requires_grad:  # a frozen norm (mtp.freeze_base) has no gradient
            param.register_hook(_summed)


def gathered_norm(module: nn.Module, mesh) -> None:
    """``module`` (a norm) runs on sequence shards; its output is the full sequence again, as
    a plain tensor: one all-gather forward, a local slice of the gradient backward."""
    parallelize_module(module, mesh, SequenceParallel())
    gather = PrepareModuleOutput(
        output_layouts=SEQ, desired_output_layouts=Replicate(), use_local_output=True
    )
    parallelize_module(module, mesh, gather)


def check_sequence(tp_size: int):
    def hook(module: nn.Module, args: tuple) -> None:
        length = args[0].shape[1]
        if length % tp_size:
            raise InputError(
                f"sequence parallelism splits each row's {length} positions over tp={tp_size} "
                f"ranks, which does not divide them: make the sequence length per CP rank "
                f"(data.seq_len / parallel.cp) a multiple of parallel.tp, or set "
                f"parallel.sequence_parallel=false"
            )

    return hook
