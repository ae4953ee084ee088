"""``ParallelDims``: the one description of how ranks are laid out (torchtitan's shape).

It holds the sizes (``pp``, ``dp_replicate x dp_shard = dp``, ``cp``, ``tp``), checked once with the
errors a user sees; after :meth:`ParallelDims.build`, the device mesh, its named sub-meshes and
process groups, and this rank's coordinates. Nothing else in multitoken computes a coordinate:
the rank order is written once, in :meth:`ParallelDims.coordinates`.

Ranks are laid out pipeline-major, tensor-parallel innermost (as torchtitan does):
world rank ``= ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``, so the ranks of one
TP group, whose collectives run on every layer, are neighbours, then those of a CP group; the
pipeline stages, which exchange one activation per microbatch, are farthest apart. The data-parallel
axis is two mesh dims, ``dp_replicate`` outside ``dp_shard`` (``dp_rank = replicate_rank *
dp_shard + shard_rank``), so the rows a rank reads do not depend on the split.

Groups (each collective takes one explicitly; none is ever the default world group, where a
library collective could interleave with a user's own):

* ``tp_group``: DTensor's all-reduces and all-gathers, the vocabulary-parallel loss;
* ``cp_group``: the K/V all-gather, the halo exchange;
* ``dp_group``: every data-parallel rank (replicas and shards alike);
* ``token_group``: the flattened DP x CP ranks, every rank with other tokens and the same
  tensor shard: the loss normaliser, the gradient sum (FSDP2's, on ``fsdp_mesh``) and the
  metrics reduce over it (TP peers hold the same tokens, so they are never in it);
* ``pp_group``: this rank's pipeline stages (the point-to-point activations and gradients,
  the step's losses broadcast from the last stage, the gradient norm);
* ``embed_group``: the first and the last pipeline rank of this rank's (dp, cp, tp) place,
  which hold the two copies of the embedding the MTP depths read (their gradients summed);
* ``world_group``: every rank (checkpoints, data preparation, the step's stop flags).

``fsdp_mesh`` is the mesh FSDP2 takes: the 1-D token mesh with ``dp_replicate = 1`` (parameters
sharded over every rank that holds different tokens, data and context parallel alike), else
2-D ``(dp_replicate, dp_shard x cp)`` (HSDP: sharded inside a replica, all-reduced across).

In one process (nothing launched) :meth:`build` builds nothing: the groups are None and every
coordinate is 0, so single-process code runs the same lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from multitoken.errors import ConfigError

__all__ = ["MESH_DIMS", "ParallelDims"]

# The root mesh's dims, outermost first.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def _check_size(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"must be an int, got {value!r}", key)
    if value < 1:
        raise ConfigError(f"must be >= 1, got {value!r}", key)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class _Groups:
    """What :meth:`ParallelDims.build` made (one object, so a ParallelDims is built once)."""

    mesh: DeviceMesh
    dp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    token_group: dist.ProcessGroup
    world_group: dist.ProcessGroup
    token_mesh: DeviceMesh
    fsdp_mesh: DeviceMesh
    pp_group: dist.ProcessGroup
    embed_group: dist.ProcessGroup | None


@dataclass
class ParallelDims:
    """Sizes of the ``(pp, dp_replicate, dp_shard, cp, tp)`` layout; after :meth:`build`, its
    mesh, groups and this rank's coordinates.

    Attributes:
        dp: data-parallel ranks (``dp_replicate * dp_shard``).
        cp: context-parallel ranks (each row is sharded over them).
        tp: tensor-parallel ranks.
        dp_replicate: HSDP replicas of the FSDP2 shards; must divide ``dp``.
        pp: pipeline-parallel ranks (the outermost dim; each holds its stages' layers).

    Raises:
        ConfigError: a size that is not an int >= 1, or ``dp_replicate`` not dividing ``dp``,
            with the ``parallel.*`` key to change.

    Example::

        >>> dims = ParallelDims(dp=2, cp=2)          # 4 ranks; checks the sizes only
        >>> dims.build("cpu")                         # under torchrun: mesh and groups
        >>> dims.cp_rank, dims.token_group            # this rank's place, the loss's group
    """

    dp: int = 1
    cp: int = 1
    tp: int = 1
    dp_replicate: int = 1
    pp: int = 1
    _groups: _Groups | None = field(default=None, init=False, repr=False, compare=False)
    _rank: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("dp", "cp", "tp", "dp_replicate", "pp"):
            _check_size(key, getattr(self, key))
        if self.dp % self.dp_replicate:
            raise ConfigError(
                f"must divide parallel.dp={self.dp} (each replica shards over dp / "
                f"dp_replicate ranks; choose among {_divisors(self.dp)}), got "
                f"{self.dp_replicate!r}",
                "dp_replicate",
            )

    @classmethod
    def for_world(
        cls, world_size: int, cp: int = 1, tp: int = 1, dp_replicate: int = 1, pp: int = 1
    ) -> ParallelDims:
        """The layout of ``world_size`` ranks with data parallelism over what pp, cp and tp
        leave.

        Raises:
            ConfigError: when ``pp``, ``cp`` or ``cp * tp`` does not divide the world size.
        """
        _check_size("cp", cp)
        _check_size("tp", tp)
        _check_size("pp", pp)
        if world_size % pp:
            raise ConfigError(
                f"pp={pp} does not divide the world size {world_size}: choose pp among "
                f"{_divisors(world_size)}"
            )
        world_size //= pp
        if world_size % cp:
            raise ConfigError(
                f"cp={cp} does not divide the world size {world_size}: choose cp among "
                f"{_divisors(world_size)}"
            )
        if world_size % (cp * tp):
            raise ConfigError(
                f"cp * tp = {cp} * {tp} does not divide the world size {world_size}: choose tp "
                f"among {_divisors(world_size // cp)}"
            )
        return cls(dp=world_size // (cp * tp), cp=cp, tp=tp, dp_replicate=dp_replicate, pp=pp)

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def dp_shard(self) -> int:
        """Data-parallel ranks in one HSDP replica."""
        return self.dp // self.dp_replicate

    @property
    def world_size(self) -> int:
        """Processes: ``pp * dp * cp * tp``."""
        return self.pp * self.dp * self.cp * self.tp

    @property
    def token_world_size(self) -> int:
        """Ranks holding different tokens (the size of :attr:`token_group`): ``dp * cp``."""
        return self.dp * self.cp

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """The mesh's shape, dims :data:`MESH_DIMS`."""
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    def check_world(self, world_size: int) -> None:
        """Refuse, before any collective, a world of another size than the layout's."""
        if world_size != self.world_size:
            always = ("dp", "cp")
            names = [n for n in ("pp", "dp", "cp", "tp") if n in always or getattr(self, n) > 1]
            product = f"{' * '.join(names)} = {' * '.join(str(getattr(self, n)) for n in names)}"
            inner = self.pp * self.cp * self.tp
            hint = (
                f"use dp={world_size // inner}"
                if world_size % inner == 0
                else f"launch {self.world_size} ranks"
            )
            raise ConfigError(
                f"{product} = {self.world_size} but the world has {world_size} ranks: {hint}"
            )

    @staticmethod
    def coordinates(world_rank: int, cp: int, tp: int) -> tuple[int, int, int]:
        """``(dp_rank, cp_rank, tp_rank)`` of a world rank: the one place the order is written.

        Under pipeline parallelism the first entry is ``pp_rank * dp + dp_rank`` (the stages
        are the outermost dim): :attr:`dp_rank` and :attr:`pp_rank` split it."""
        return world_rank // (tp * cp), world_rank // tp % cp, world_rank % tp

    # ---- building ----------------------------------------------------------------------------

    def build(self, device_type: str = "cpu") -> ParallelDims:
        """Build the mesh and its groups over the initialised world (a collective on every
        rank: call it everywhere, in the same order); a no-op in one process. Returns self."""
        if self._groups is not None:
            return self
        if not dist.is_initialized():
            if self.world_size == 1:
                return self
            raise RuntimeError("ParallelDims.build needs torch.distributed: init it first")
        self.check_world(dist.get_world_size())
        self._groups = _build_groups(
            init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        )
        self._rank = dist.get_rank()
        return self

    @property
    def built(self) -> bool:
        """Whether a mesh exists (False in one process)."""
        return self._groups is not None

    def _get(self, name: str):
        return None if self._groups is None else getattr(self._groups, name)

    # The groups and meshes; None in one process.
    mesh = property(lambda self: self._get("mesh"), doc="The root mesh (dims MESH_DIMS).")
    dp_group = property(lambda self: self._get("dp_group"), doc="Every data-parallel rank.")
    cp_group = property(lambda self: self._get("cp_group"), doc="This rank's CP peers.")
    tp_group = property(lambda self: self._get("tp_group"), doc="This rank's TP peers.")
    token_group = property(
        lambda self: self._get("token_group"),
        doc="The DP x CP ranks: every rank with other tokens and the same tensor shard.",
    )
    world_group = property(lambda self: self._get("world_group"), doc="Every rank.")
    token_mesh = property(lambda self: self._get("token_mesh"), doc="1-D mesh of token_group.")
    fsdp_mesh = property(lambda self: self._get("fsdp_mesh"), doc="The mesh FSDP2 shards over.")
    pp_group = property(lambda self: self._get("pp_group"), doc="This rank's pipeline peers.")
    embed_group = property(
        lambda self: self._get("embed_group"),
        doc="The first and last pipeline ranks of this place (None unless pp > 1).",
    )

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The 1-D tensor-parallel mesh (DTensor's)."""
        return None if self._groups is None else self._groups.mesh["tp"]

    # ---- this rank's coordinates ---------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's world rank."""
        return self._rank

    @property
    def is_main(self) -> bool:
        return self._rank == 0

    @property
    def dp_rank(self) -> int:
        """``replicate_rank * dp_shard + shard_rank``."""
        return self.coordinates(self._rank, self.cp, self.tp)[0] % self.dp

    @property
    def pp_rank(self) -> int:
        """This rank's place in its pipeline (0 = the first stages)."""
        return self.coordinates(self._rank, self.cp, self.tp)[0] // self.dp

    @property
    def cp_rank(self) -> int:
        return self.coordinates(self._rank, self.cp, self.tp)[1]

    @property
    def tp_rank(self) -> int:
        return self.coordinates(self._rank, self.cp, self.tp)[2]


def _build_groups(mesh: DeviceMesh) -> _Groups:
    """The dedicated groups of a mesh with dims :data:`MESH_DIMS` (collective over the world).

    ``DeviceMesh`` hands out the default world group for an axis that spans the whole world;
    each such group is replaced by one dedicated world-sized group, and the mesh is rebuilt
    over them (DTensor's collectives run on ``mesh["tp"]``).
    """
    world = dist.get_world_size()
    dedicated: list[dist.ProcessGroup] = []

    # Every rank takes the same branches below (the sizes are global), so new_group, itself
    # a collective on the world, is called in the same order everywhere.
    def own(group: dist.ProcessGroup) -> dist.ProcessGroup:
        if dist.get_world_size(group) != world:
            return group
        if not dedicated:
            dedicated.append(dist.new_group(list(range(world))))
        return dedicated[0]

    axis_groups = [own(mesh.get_group(name)) for name in MESH_DIMS]
    root = DeviceMesh.from_group(axis_groups, mesh.device_type, mesh.mesh, mesh_dim_names=MESH_DIMS)
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
    if size["tp"] == 1 and size["pp"] == 1:
        # The flattened mesh spans the world: use the dedicated world-sized group.
        token_group = own(dist.group.WORLD)
        token_mesh = DeviceMesh.from_group(token_group, mesh.device_type, mesh_dim_names=("dp_cp",))
    else:
        # A strict subset of the world (tp > 1 or pp > 1), so DeviceMesh makes it a new group. FSDP2
        # composes with DTensor parameters only when both meshes come from one root.
        token_mesh = root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        token_group = token_mesh.get_group()
    if size["dp_replicate"] == 1:
        fsdp_mesh = token_mesh
    else:
        # HSDP: (replicate, shard). The shard dim is dp_shard x cp, flattened only when both
        # are > 1 (else the wider axis is the shard dim, and no group is added). It never spans
        # the world (dp_replicate > 1), so no flattened group is the world group.
        shard_axis = only_wide(("dp_shard", "cp"))
        shard_mesh = (
            root["dp_shard", "cp"]._flatten("dp_shard_cp")
            if shard_axis is None
            else root[shard_axis]
        )
        # Joined as FSDP2 joins its own meshes (slicing a flattened dim out of the root is
        # deprecated).
        fsdp_mesh = DeviceMesh._concatenate([root["dp_replicate"], shard_mesh])
    return _Groups(
        mesh=root,
        dp_group=dp_group,
        cp_group=group["cp"],
        tp_group=group["tp"],
        token_group=token_group,
        world_group=own(dist.group.WORLD),
        token_mesh=token_mesh,
        fsdp_mesh=fsdp_mesh,
        pp_group=group["pp"],
        embed_group=_embed_group(root, group["pp"]),
    )


def _embed_group(root: DeviceMesh, pp_group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """The group of this rank's first and last pipeline ranks (collective over the world):
    the pipeline group itself at pp = 2, a new two-rank group per place beyond."""
    pp = root.size(0)
    if pp == 1:
        return None
    if pp == 2:
        return pp_group
    ranks = root.mesh.reshape(pp, -1)  # (pp, places)
    mine = None
    for place in range(ranks.shape[1]):  # every rank creates every group, in the same order
        members = [int(ranks[0, place]), int(ranks[-1, place])]
        group = dist.new_group(members)
        if dist.get_rank() in members:
            mine = group
    return mine
