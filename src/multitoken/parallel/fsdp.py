"""Data parallelism with FSDP2: parameters, gradients and optimiser state sharded over ranks.

``apply_fsdp(model, mesh)`` wraps every transformer layer of the decoder and every MTP depth
in its own FSDP2 unit and the model itself in the root unit, following torchtitan: a unit's
parameters are all-gathered just before it runs and freed after, and its gradients are
reduce-scattered as soon as its backward is done, overlapping with the layers still to go.

Two choices specific to MTP:

* The shared embedding and output head live in the **root** unit, whose parameters FSDP2 keeps
  unsharded from the forward through the backward: every MTP depth reads the embedding, and
  the loss reads the head after the forward returns (:func:`~multitoken.mtp_model.step_loss`).
* Gradients are **summed**, not averaged, over the mesh: every rank's loss is already divided
  by the valid-target count of the whole global batch (docs/design.md#loss-normalisation), so
  the sum of the ranks' gradients is the gradient of the global loss.

The mesh is :attr:`~multitoken.parallel.dims.ParallelDims.fsdp_mesh`. By default it is the
flattened data x context-parallel one (``token_mesh``): CP ranks hold different tokens of the
same rows, so their gradients are summed exactly like DP ranks', and they share the parameter
memory too.
With ``parallel.dp_replicate > 1`` it is 2-D, ``(dp_replicate, dp_shard x cp)``, and FSDP2 runs
HSDP: each replica group holds one sharded copy, gradients are reduce-scattered inside it
(skipped when it has one rank) and then all-reduced across the replicas, both as plain sums.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from multitoken.errors import InputError

__all__ = ["apply_fsdp", "apply_fsdp_stages", "fsdp_units", "decoder_layers"]


def decoder_layers(model: nn.Module, who: str) -> list[nn.Module]:
    """``model.decoder.layers`` as a list: the main transformer layers that ``who`` (the
    function applying a parallelism) rewrites, or one error saying the model has none."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(
            f"{who} needs model.decoder.layers (an nn.ModuleList of transformer layers); "
            f"{type(decoder).__name__} has none"
        )
    return list(layers)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP2 unit: the decoder's layers, the MTP depths."""
    mtp = getattr(model, "mtp", None)
    return decoder_layers(model, "apply_fsdp") + ([] if mtp is None else list(mtp.depths))


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` (an :class:`~multitoken.mtp_model.MTPModel`) over ``mesh`` in place.

    Args:
        model: the model, already on its device, with identical weights on every rank.
        mesh: the ranks whose gradients are summed (data x context parallel): 1-D (FSDP,
            shard over all of them) or 2-D ``(replicate, shard)`` (HSDP).
        param_dtype: compute dtype of the gathered parameters (bf16 on CUDA); None = the
            parameters' own. Gradients are reduced in fp32.
        reshard_after_forward: free every layer's gathered parameters after its forward
            (less memory, one more all-gather in the backward).

    Returns:
        The same module, now an ``FSDPModule``.
    """
    if mesh.ndim not in (1, 2):
        raise InputError(
            f"apply_fsdp takes a 1-D (FSDP) or 2-D (replicate, shard: HSDP) mesh, got "
            f"{mesh.ndim} dimensions"
        )
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Under sequence parallelism the hidden states the root and the MTP depths return are
    # views (of the gathered final norms' DTensors); FSDP2 warns on every step that an
    # in-place op on such a view would skip its hook. Nothing writes into them (the next depth
    # and the loss only read them): silence that one warning, for these modules only.
    units = fsdp_units(model)
    names = "|".join(sorted({type(m).__name__ for m in (model, *units)}))
    warnings.filterwarnings(
        "ignore", message=rf"FSDP2-wrapped module \(FSDP({names})\) returned a view tensor"
    )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root keeps the shared embedding and head unsharded through forward and backward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    assert isinstance(model, FSDPModule)
    _sum_gradients(model)
    return model


def _sum_gradients(root: nn.Module) -> None:
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Sum over ranks: each rank's loss is already divided by the global target count.
            # Under HSDP the factor covers both the reduce-scatter and the replicas' all-reduce.
            module.set_gradient_divide_factor(1.0)
            # A plain SUM for both (gloo has no PREMUL_SUM, and there is nothing to scale).
            module.set_force_sum_reduction_for_comms(True)


def apply_fsdp_stages(
    stages: list[nn.Module], mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None
) -> None:
    """FSDP2 under pipeline parallelism: each stage's main layers and MTP depths a unit, the
    stage itself the root unit (its embedding, final norm, head), as :func:`apply_fsdp` does
    for a whole model. The pipeline schedule reduces the gradients after the last microbatch.

    Raises:
        InputError: a parameter in two stages of this rank (the V-shaped schedules put the
            first and the last stage, both holding the embedding, on one rank).
    """
    seen: set[int] = set()
    for stage in stages:
        own = {id(p) for p in stage.parameters()}
        if own & seen:
            raise InputError(
                "FSDP2 cannot shard a parameter that two pipeline stages of one rank share "
                "(the embedding under a V-shaped schedule): use parallel.pp_schedule=1F1B, "
                "Interleaved1F1B or InterleavedZeroBubble with parallel.dp > 1 or parallel.cp > 1"
            )
        seen |= own
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for stage in stages:
        mtp = getattr(stage, "mtp", None)
        units = list(stage.layers.values()) + ([] if mtp is None else list(mtp.depths))
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(stage, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        _sum_gradients(stage)
