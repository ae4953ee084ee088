"""This process's place in a run: the layout it joins, and decisions rank 0 makes for all.

:func:`setup_dims` joins the process group (when the layout has more than one rank) and builds
the :class:`~multitoken.parallel.dims.ParallelDims` every other part asks for its groups and
coordinates. :func:`on_rank0` runs a decision on rank 0 and hands every rank its result, or its
error, so that no rank is left waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from multitoken.errors import CheckpointError, ConfigError, UserError
from multitoken.parallel import ParallelDims, init_distributed
from multitoken.train.config import TrainConfig

__all__ = ["setup_dims", "on_rank0"]


def setup_dims(cfg: TrainConfig, device: torch.device) -> ParallelDims:
    """The run's layout, built: the process group joined (when ``pp * dp * cp * tp > 1``; each
    attempt in a store namespace of its own, see :func:`~multitoken.parallel.init_distributed`)
    and the mesh's groups made. In one process nothing is joined."""
    dims = cfg.parallel.dims
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and dims.world_size == 1:
        return dims
    if world != dims.world_size:  # before any collective: no rank hangs
        raise ConfigError(
            f"{world} ranks were started but parallel.pp * parallel.dp * parallel.cp * "
            f"parallel.tp = {dims.world_size}: launch pp * dp * cp * tp ranks"
        )
    init_distributed(timeout=timedelta(seconds=cfg.parallel.timeout_s))
    return dims.build(device.type)


def on_rank0(dims: ParallelDims, device: torch.device, decide: Callable[[], int]) -> int:
    """Run ``decide`` on rank 0 only and hand every rank its result.

    A :class:`UserError` on rank 0 is raised on every rank (the others with a pointer to rank
    0's message) instead of leaving them waiting in the next collective.
    """
    value, error = 0, None
    if dims.is_main:
        try:
            value = decide()
        except UserError as err:
            error = err
    if dims.world_group is not None:
        sent = torch.tensor([value, error is not None], dtype=torch.int64, device=device)
        dist.broadcast(sent, group=dims.world_group, group_src=0)
        value, failed = (int(x) for x in sent.tolist())
        if failed and error is None:
            raise CheckpointError("rank 0 refused to start this run (its error says why)")
    if error is not None:
        raise error
    return value
