"""The ``(dp, cp)`` device mesh and the process groups every collective takes explicitly.

Ranks are laid out data-parallel-major: world rank ``= dp_rank * cp + cp_rank``, so the ranks of
one CP group are neighbours (on one node when ``cp`` divides the GPUs per node). Three groups
are used: the CP group (K/V all-gather, halo exchange), the DP group, and the flattened DP x CP
group (loss normaliser, gradient sum, metrics).

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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["local_device", "init_distributed", "build_mesh", "ParallelGroups"]


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
    runs go through the same code. The backend is NCCL when CUDA is available, gloo otherwise.

    Returns:
        This rank's device (``cuda:<LOCAL_RANK>`` or ``cpu``).
    """
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    device = local_device() if use_cuda else torch.device("cpu")
    if dist.is_initialized():
        return device
    backend = backend or ("nccl" if use_cuda else "gloo")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="multitoken-store-"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    return device


def build_mesh(dp: int | None, cp: int, device_type: str = "cpu") -> DeviceMesh:
    """A ``(dp, cp)`` mesh with dim names ``("dp", "cp")`` over the whole world.

    Args:
        dp: data-parallel size; None or -1 = ``world_size // cp``.
        cp: context-parallel size.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL).

    Raises:
        ValueError: before any collective, the same on every rank, when the sizes are not
            positive ints or ``dp * cp`` is not the world size.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed: call init_distributed() first")
    world = dist.get_world_size()
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        raise ValueError(f"cp must be an int >= 1, got {cp!r}")
    if world % cp:
        raise ValueError(
            f"cp={cp} does not divide the world size {world}: choose cp among "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if dp is None or dp == -1:
        dp = world // cp
    if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
        raise ValueError(f"dp must be an int >= 1 (or None / -1 to infer it), got {dp!r}")
    if dp * cp != world:
        raise ValueError(
            f"dp * cp = {dp} * {cp} = {dp * cp} but the world has {world} ranks: use "
            f"dp={world // cp} (or dp=None)"
        )
    return init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"))


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups and coordinates of this rank on a ``(dp, cp)`` mesh.

    Attributes:
        mesh: the device mesh.
        dp_group, cp_group, dp_cp_group: dedicated groups (never the default world group).
        dp_rank, dp_size, cp_rank, cp_size: this rank's coordinates.
        dp_cp_mesh: a 1-D mesh over ``dp_cp_group``: FSDP2 shards the parameters over every
            rank that holds different tokens (data and context parallel alike, as torchtitan
            does), so CP ranks also share the memory of parameters and optimiser state.
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

    @classmethod
    def build(cls, dp: int | None, cp: int, device_type: str = "cpu") -> ParallelGroups:
        """:func:`build_mesh` then :meth:`from_mesh`."""
        return cls.from_mesh(build_mesh(dp, cp, device_type))

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> ParallelGroups:
        """Groups of a mesh with dims ``("dp", "cp")``; collective over the world (setup)."""
        if mesh.mesh_dim_names != ("dp", "cp"):
            raise ValueError(f"expected mesh dims ('dp', 'cp'), got {mesh.mesh_dim_names}")
        world_group: list[dist.ProcessGroup] = []

        def own(group: dist.ProcessGroup) -> dist.ProcessGroup:
            # Every rank takes the same branches (the sizes are global), so new_group, itself a
            # collective on the world, is called in the same order everywhere.
            if dist.get_world_size(group) != dist.get_world_size():
                return group
            if not world_group:
                world_group.append(dist.new_group(list(range(dist.get_world_size()))))
            return world_group[0]

        dp_group, cp_group = own(mesh.get_group("dp")), own(mesh.get_group("cp"))
        # The flattened mesh always spans the world: use the dedicated world-sized group.
        dp_cp_group = own(dist.group.WORLD)
        return cls(
            mesh=mesh,
            dp_group=dp_group,
            cp_group=cp_group,
            dp_cp_group=dp_cp_group,
            dp_rank=mesh.get_local_rank("dp"),
            dp_size=mesh.size(0),
            cp_rank=mesh.get_local_rank("cp"),
            cp_size=mesh.size(1),
            dp_cp_mesh=DeviceMesh.from_group(
                dp_cp_group, mesh.device_type, mesh_dim_names=("dp_cp",)
            ),
        )
