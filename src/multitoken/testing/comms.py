"""Count the messages a piece of code sends: ``with count_comms() as log: ...``.

Wraps the ``torch.distributed`` functions for the duration of the block and records, for every
call made through the module (``dist.all_reduce(...)``), its name, kind (collective or
point-to-point), group and the bytes this rank hands to it. Used by the tests (to prove that
the sharding halo sends nothing and the fallback one collective) and by the benchmark.

DTensor (tensor parallelism) and FSDP2's gradient hooks may call the *functional* collectives
(``torch.ops._c10d_functional.*``), which never go through those Python functions: a dispatch
mode records them too, named as the ``dist`` function that does the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommRecord", "CommLog", "count_comms"]

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)
POINT_TO_POINT = ("send", "recv", "isend", "irecv")


@dataclass
class CommRecord:
    """One call: ``kind`` is ``"collective"`` or ``"p2p"``; ``nbytes`` what this rank sent."""

    name: str
    kind: str
    group: object
    nbytes: int


@dataclass
class CommLog:
    records: list[CommRecord] = field(default_factory=list)

    def count(self, kind: str | None = None, name: str | None = None) -> int:
        return sum(
            1
            for r in self.records
            if (kind is None or r.kind == kind) and (name is None or r.name == name)
        )

    def nbytes(self, kind: str | None = None) -> int:
        return sum(r.nbytes for r in self.records if kind is None or r.kind == kind)


def _sent_bytes(name: str, args: tuple, kwargs: dict) -> int:
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors:
        return 0
    if name in ("send", "isend", "broadcast", "all_reduce", "reduce"):
        sent = tensors[0]
    elif name == "recv" or name == "irecv":
        return 0
    else:  # (output, input, ...): the input is what this rank contributes
        sent = tensors[1] if len(tensors) > 1 else tensors[0]
    return sent.numel() * sent.element_size()


def _group_of(args: tuple, kwargs: dict):
    if "group" in kwargs:
        return kwargs["group"]
    groups = [a for a in args if isinstance(a, dist.ProcessGroup)]
    return groups[0] if groups else None


class _Counted:
    """A recording stand-in for a ``torch.distributed`` function. It compares equal to the
    function it wraps, so ``P2POp(dist.isend, ...)`` built inside the block still validates."""

    def __init__(self, name: str, kind: str, fn, log: CommLog, batching: list[bool]):
        self.name, self.kind, self.fn, self.log, self.batching = name, kind, fn, log, batching
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        if not self.batching[0]:  # ops of a batch are recorded once, by the batch
            group = _group_of(args, kwargs)
            self.log.records.append(
                CommRecord(self.name, self.kind, group, _sent_bytes(self.name, args, kwargs))
            )
        return self.fn(*args, **kwargs)

    def __eq__(self, other) -> bool:
        return other is self or other is self.fn

    def __hash__(self) -> int:
        return hash(self.fn)


# Functional collectives, by the name of the ``dist`` call that does the same thing.
FUNCTIONAL = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather_into_tensor": "all_gather_into_tensor",
    "all_gather_into_tensor_coalesced": "all_gather_into_tensor",
    "reduce_scatter_tensor": "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced": "reduce_scatter_tensor",
    "all_to_all_single": "all_to_all_single",
    "broadcast": "broadcast",
}


class _FunctionalCollectives(TorchDispatchMode):
    """Records ``torch.ops._c10d_functional`` collectives (their last argument is the group)."""

    def __init__(self, log: CommLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor lower the op first: its collectives then reach this mode on the
            # local tensors.
            return NotImplemented
        if func.namespace == "_c10d_functional":
            name = FUNCTIONAL.get(func.overloadpacket.__name__)
            if name is not None:
                group = args[-1] if args else kwargs["group_name"]
                if not isinstance(group, dist.ProcessGroup):
                    group = _resolve_process_group(group)
                first = args[0]
                tensors = first if isinstance(first, (list, tuple)) else [first]
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                self.log.records.append(CommRecord(name, "collective", group, nbytes))
        return func(*args, **kwargs)


@contextmanager
def count_comms() -> Iterator[CommLog]:
    """Record every ``torch.distributed`` communication call made inside the block.

    Example::

        >>> with count_comms() as log:
        ...     dist.all_reduce(torch.ones(4), group=cp_group)
        >>> log.count("collective"), log.nbytes()
        (1, 16)
    """
    log = CommLog()
    batching = [False]
    saved = {}

    def counted_batch(ops, *args, **kwargs):
        for op in ops:
            name = getattr(op.op, "__name__", str(op.op))
            sent = op.tensor.numel() * op.tensor.element_size() if "send" in name else 0
            log.records.append(CommRecord(name, "p2p", op.group, sent))
            if isinstance(op.op, _Counted):  # torch tells sends from receives by identity
                op.op = op.op.fn
        batching[0] = True
        try:
            return saved["batch_isend_irecv"](ops, *args, **kwargs)
        finally:
            batching[0] = False

    for kind, names in (("collective", COLLECTIVES), ("p2p", POINT_TO_POINT)):
        for name in names:
            if hasattr(dist, name):
                saved[name] = getattr(dist, name)
                setattr(dist, name, _Counted(name, kind, saved[name], log, batching))
    saved["batch_isend_irecv"] = dist.batch_isend_irecv
    dist.batch_isend_irecv = counted_batch
    try:
        with _FunctionalCollectives(log):
            yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
