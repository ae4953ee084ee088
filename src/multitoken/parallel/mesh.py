"""The ``(dp, cp, tp)`` device mesh (dp split into HSDP replicas and shards) and the process
groups every collective takes explicitly.

Ranks are laid out data-parallel-major, tensor-parallel innermost (as torchtitan does):
world rank ``= (dp_rank * cp + cp_rank) * tp + tp_rank``, so the ranks of one TP group, whose
collectives run on every layer, are neighbours, then those of a CP group. Four groups are
used: the TP group (DTensor's all-reduces and all-gathers, the vocabulary-parallel loss), the
CP group (K/V all-gather, halo exchange), the DP group, and the flattened DP x CP group (loss
normaliser, gradient sum, metrics), which holds every rank with other tokens and the same
tensor shard. With ``tp = 1`` the layout is the ``(dp, cp)`` one: world rank
``= dp_rank * cp + cp_rank``.

The data-parallel axis is itself two mesh dims, ``dp_replicate`` outside ``dp_shard``
(``dp_rank = replicate_rank * dp_shard + shard_rank``, so the rows a rank reads are the same
whatever the split). With ``dp_replicate = 1`` (the default) FSDP2 shards over every DP x CP
rank; with ``dp_replicate > 1`` it runs HSDP on the 2-D ``fsdp_mesh``: parameters sharded over
the ``dp_shard x cp`` ranks of one replica, gradients reduce-scattered there and all-reduced
across the replicas (fewer ranks in each all-gather and reduce-scatter, more memory per rank).

``DeviceMesh`` hands out the default world group for a mesh axis that spans the whole world;
:class:`ParallelGroups` replaces it by a dedicated group, so that no library collective ever
runs on the world group (where it could interleave with a user's own collectives).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from multitoken.parallel.rendezvous import attempt_store

__all__ = ["MESH_DIMS", "local_device", "init_distributed", "build_mesh", "ParallelGroups"]

# The root mesh's dims, outermost first: the data-parallel axis split into replicas (HSDP) and
# shards, then context and tensor parallelism.
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


def local_device() -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` (made current) when CUDA is available, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group described by ``torchrun``'s environment; idempotent.

    Without ``torchrun`` (no ``WORLD_SIZE``) it starts a one-rank group, so single-process
    runs go through the same code. Under a launcher, every attempt (each restart of
    ``torchrun --max-restarts``) joins in a namespace of the launcher's store of its own
    (:func:`~multitoken.parallel.rendezvous.attempt_store`). The backend is NCCL when CUDA
    is available, gloo otherwise.

    Returns:
        This rank's device (``cuda:<LOCAL_RANK>`` or ``cpu``).
    """
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    device = local_device() if use_cuda else torch.device("cpu")
    if dist.is_initialized():
        return device
    backend = backend or ("nccl" if use_cuda else "gloo")
    if "WORLD_SIZE" in os.environ:
        # torch's own env:// store (a client of the agent's under torchrun, else hosted by
        # rank 0), joined in a namespace of this attempt's own (see .rendezvous): torchrun
        # --max-restarts restarts the ranks on a store that holds the last attempt's keys.
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size))
        store.set_timeout(default_pg_timeout)
        dist.init_process_group(
            backend,
            store=attempt_store(store, rank, world_size),
            rank=rank,
            world_size=world_size,
            device_id=device if use_cuda else None,
        )
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="multitoken-store-"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    return device


def _check_size(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def build_mesh(
    dp: int | None, cp: int, device_type: str = "cpu", tp: int = 1, dp_replicate: int = 1
) -> DeviceMesh:
    """A ``(dp_replicate, dp_shard, cp, tp)`` mesh over the whole world, with those dim names.

    Tensor parallelism is innermost (world rank ``= (dp_rank * cp + cp_rank) * tp + tp_rank``),
    as in torchtitan: its collectives run on every layer, forward and backward, so its ranks
    should be the closest (one node, NVLink). The data-parallel axis is split into
    ``dp_replicate`` outer groups of ``dp_shard = dp / dp_replicate`` ranks
    (``dp_rank = replicate_rank * dp_shard + shard_rank``), so the rows a rank reads do not
    depend on the split.

    Args:
        dp: data-parallel size; None or -1 = ``world_size // (cp * tp)``.
        cp: context-parallel size.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL).
        tp: tensor-parallel size.
        dp_replicate: replicas of the FSDP2 shards (HSDP); must divide ``dp``.

    Raises:
        ValueError: before any collective, the same on every rank, when the sizes are not
            positive ints, ``dp * cp * tp`` is not the world size or ``dp_replicate`` does not
            divide ``dp``.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed: call init_distributed() first")
    world = dist.get_world_size()
    _check_size("cp", cp)
    _check_size("tp", tp)
    _check_size("dp_replicate", dp_replicate)
    if world % cp:
        raise ValueError(
            f"cp={cp} does not divide the world size {world}: choose cp among "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if world % (cp * tp):
        raise ValueError(
            f"cp * tp = {cp} * {tp} does not divide the world size {world}: choose tp among "
            f"{[d for d in range(1, world // cp + 1) if world // cp % d == 0]}"
        )
    if dp is None or dp == -1:
        dp = world // (cp * tp)
    if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
        raise ValueError(f"dp must be an int >= 1 (or None / -1 to infer it), got {dp!r}")
    if dp * cp * tp != world:
        product = f"dp * cp = {dp} * {cp}" if tp == 1 else f"dp * cp * tp = {dp} * {cp} * {tp}"
        raise ValueError(
            f"{product} = {dp * cp * tp} but the world has {world} ranks: use "
            f"dp={world // (cp * tp)} (or dp=None)"
        )
    if dp % dp_replicate:
        raise ValueError(
            f"dp_replicate={dp_replicate} does not divide dp={dp}: choose dp_replicate among "
            f"{[d for d in range(1, dp + 1) if dp % d == 0]}"
        )
    shape = (dp_replicate, dp // dp_replicate, cp, tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups and coordinates of this rank on a ``(dp_replicate, dp_shard, cp, tp)``
    mesh.

    Attributes:
        mesh: the root device mesh (dims :data:`MESH_DIMS`), rebuilt over the dedicated groups
            below (DTensor's tensor-parallel collectives run on ``mesh["tp"]``, so it must not
            hold the default world group).
        dp_group, cp_group, tp_group, dp_cp_group: dedicated groups (never the default world
            group). ``dp_group`` holds every data-parallel rank (replicas and shards alike).
            ``dp_cp_group`` holds every rank with different tokens and the same tensor shard:
            the loss normaliser, the gradient sum (FSDP2's, on ``fsdp_mesh``: the same ranks)
            and the metrics reduce over it only (the ranks of a TP group hold the same tokens).
        dp_rank, dp_size, cp_rank, cp_size, tp_rank, tp_size: this rank's coordinates;
            ``dp_rank = replicate_rank * dp_shard + shard_rank`` (the ``dp_replicate`` and
            ``dp_shard`` dims of ``mesh``, whose groups ``mesh.get_group(name)`` gives).
        dp_cp_mesh: a 1-D mesh over ``dp_cp_group``. Under tensor parallelism it is flattened
            from ``mesh``: FSDP2 composes with DTensor parameters only when both meshes come
            from one root.
        tp_mesh: the 1-D tensor-parallel mesh (``mesh["tp"]``).
        world_group: a dedicated group of every rank (checkpoints, data preparation: what
            every rank must join); ``dp_cp_group`` itself when ``tp = 1``.
        fsdp_mesh: the mesh FSDP2 takes. With ``dp_replicate = 1`` it is ``dp_cp_mesh``:
            parameters sharded over every rank that holds different tokens (data and context
            parallel alike, as torchtitan does). Otherwise it is 2-D ``(dp_replicate,
            dp_shard x cp)`` (HSDP): parameters sharded over the ``dp_shard x cp`` ranks of one
            replica, gradients reduce-scattered there then all-reduced across the replicas.
    """

    mesh: DeviceMesh
    dp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    dp_cp_mesh: DeviceMesh
    tp_group: dist.ProcessGroup | None = None
    tp_rank: int = 0
    tp_size: int = 1
    tp_mesh: DeviceMesh | None = None
    world_group: dist.ProcessGroup | None = None
    fsdp_mesh: DeviceMesh | None = None

    @classmethod
    def build(
        cls,
        dp: int | None,
        cp: int,
        device_type: str = "cpu",
        tp: int = 1,
        dp_replicate: int = 1,
    ) -> ParallelGroups:
        """:func:`build_mesh` then :meth:`from_mesh`."""
        return cls.from_mesh(build_mesh(dp, cp, device_type, tp, dp_replicate))

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> ParallelGroups:
        """Groups of a mesh with dims :data:`MESH_DIMS`; collective over the world (setup)."""
        if mesh.mesh_dim_names != MESH_DIMS:
            raise ValueError(f"expected mesh dims {MESH_DIMS}, got {mesh.mesh_dim_names}")
        world = dist.get_world_size()
        world_group: list[dist.ProcessGroup] = []

        # Every rank takes the same branches below (the sizes are global), so new_group, itself
        # a collective on the world, is called in the same order everywhere.
        def own(group: dist.ProcessGroup) -> dist.ProcessGroup:
            if dist.get_world_size(group) != world:
                return group
            if not world_group:
                world_group.append(dist.new_group(list(range(world))))
            return world_group[0]

        axis_groups = [own(mesh.get_group(name)) for name in MESH_DIMS]
        root = DeviceMesh.from_group(
            axis_groups, mesh.device_type, mesh.mesh, mesh_dim_names=MESH_DIMS
        )
        size = dict(zip(MESH_DIMS, root.shape))
        group = dict(zip(MESH_DIMS, axis_groups))

        def only_wide(axes: tuple[str, ...]) -> str | None:
            """The one axis of ``axes`` larger than 1 (or the first when none is); None when
            several are: then a flattened group is needed."""
            wide = [axis for axis in axes if size[axis] > 1]
            return (wide or list(axes))[0] if len(wide) <= 1 else None

        dp_axes = ("dp_replicate", "dp_shard")
        if only_wide(dp_axes) is not None:  # one axis holds every data-parallel rank
            dp_group = group[only_wide(dp_axes)]
        elif size["dp_replicate"] * size["dp_shard"] == world:
            dp_group = own(dist.group.WORLD)
        else:
            dp_group = root[dp_axes]._flatten("dp").get_group()
        if size["tp"] == 1:
            # The flattened mesh spans the world: use the dedicated world-sized group.
            dp_cp_group = own(dist.group.WORLD)
            dp_cp_mesh = DeviceMesh.from_group(
                dp_cp_group, mesh.device_type, mesh_dim_names=("dp_cp",)
            )
        else:
            # A strict subset of the world (tp > 1), so DeviceMesh makes it a new group.
            dp_cp_mesh = root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
            dp_cp_group = dp_cp_mesh.get_group()
        if size["dp_replicate"] == 1:
            fsdp_mesh = dp_cp_mesh  # plain FSDP2: today's one-dimensional mesh
        else:
            # HSDP: (replicate, shard). The shard dim is dp_shard x cp, flattened only when both
            # are > 1 (else the wider axis is the shard dim, and no group is added). It never
            # spans the world (dp_replicate > 1), so no flattened group is the world group.
            shard_axis = only_wide(("dp_shard", "cp"))
            if shard_axis is None:
                shard_mesh = root["dp_shard", "cp"]._flatten("dp_shard_cp")
            else:
                shard_mesh = root[shard_axis]
            # Joined as FSDP2 joins its own meshes (slicing a flattened dim out of the root
            # is deprecated).
            fsdp_mesh = DeviceMesh._concatenate([root["dp_replicate"], shard_mesh])
        replicate_rank = root.get_local_rank("dp_replicate")
        shard_rank = root.get_local_rank("dp_shard")
        return cls(
            mesh=root,
            dp_group=dp_group,
            cp_group=group["cp"],
            dp_cp_group=dp_cp_group,
            dp_rank=replicate_rank * size["dp_shard"] + shard_rank,
            dp_size=size["dp_replicate"] * size["dp_shard"],
            cp_rank=root.get_local_rank("cp"),
            cp_size=size["cp"],
            dp_cp_mesh=dp_cp_mesh,
            tp_group=group["tp"],
            tp_rank=root.get_local_rank("tp"),
            tp_size=size["tp"],
            tp_mesh=root["tp"],
            world_group=own(dist.group.WORLD),
            fsdp_mesh=fsdp_mesh,
        )
