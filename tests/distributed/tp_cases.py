"""Models, groups and per-rank steps shared by the tensor-parallel tests.

The reference is the plain model on the global batch in the pytest process (no
``multitoken.parallel``); the ranks report their losses, full gradients and the collectives of
one step, each tagged with the role of its group.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from cp_cases import IGNORE, PAD, make_batch, step_record

from multitoken import MTPConfig, MTPModel, SequenceLayout, StepBatch, step_loss
from multitoken.models import GPTConfig
from multitoken.models.parallelize import apply_tp, compile_gpt
from multitoken.parallel import (
    ParallelDims,
    apply_cp,
    apply_fsdp,
    global_normalizer,
    grad_norm,
    shard_batch,
    sync_gradients,
)
from multitoken.testing.comms import count_comms

# 64 tokens, 8 query and 4 key/value heads, a feed-forward of 128: tp in {1, 2, 4} splits all.
TP_VOCAB = 64
N_LAYERS = 2

_GROUPS: dict[tuple[int, int, int, int], ParallelDims] = {}


def tp_groups(dp: int, cp: int, tp: int, dp_replicate: int = 1) -> ParallelDims:
    """The (dp, cp, tp) groups of this pool (dp split into ``dp_replicate`` HSDP replicas),
    built once per shape (new_group is collective)."""
    key = (dp, cp, tp, dp_replicate)
    if key not in _GROUPS:
        _GROUPS[key] = ParallelDims(dp=dp, cp=cp, tp=tp, dp_replicate=dp_replicate).build("cpu")
    return _GROUPS[key]


def make_tp_model(depth: int, seed: int = 0, tie: bool = True, **overrides) -> MTPModel:
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=TP_VOCAB,
        dim=32,
        n_layers=N_LAYERS,
        n_heads=8,
        n_kv_heads=4,
        max_seq_len=64,
        tie_embeddings=tie,
    )
    config = GPTConfig(**{**fields, **overrides})
    return MTPModel.from_config(config, MTPConfig(num_depths=depth, loss_weight=0.3), pad_id=PAD)


def tp_reference(depth: int, rows, tie: bool = True) -> dict:
    """The single process on the global batch."""
    model = make_tp_model(depth, tie=tie)
    ids, labels, layout = make_batch(True, rows=rows)
    out = model.loss(ids, labels, layout)
    out.loss.backward()
    return dict(
        **step_record(model, out),
        grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")),
    )


def group_roles(g: ParallelDims) -> dict[str, str]:
    """Group name -> role of the groups of ``g``, and a role by member ranks for the rest.

    The default world group is "WORLD" by name. Other groups are named by their member ranks:
    torch compares device meshes by layout, not by group, so DTensor's caches may hand a step
    the equal TP mesh of another ``ParallelDims`` built earlier in this pool (same ranks,
    another group object). With ``dp = 1`` the DP x CP ranks are the CP ranks: "cp".

    Under HSDP the groups of the FSDP2 mesh are named exactly (by group name, before any
    match by ranks): "dp_replicate" for the replicas' all-reduce, and for the shard dim
    "dp_shard" (cp = 1), "dp_shard_cp" (flattened), or "cp" by its ranks (dp_shard = 1).
    """
    roles = {dist.group.WORLD.group_name: "WORLD"}
    for role in ("tp", "cp", "dp_cp"):
        group = getattr(g, f"{role}_group")
        if dist.get_world_size(group) > 1:
            roles.setdefault(tuple(dist.get_process_group_ranks(group)), role)
    if g.fsdp_mesh.ndim == 2:
        replicate, shard = g.fsdp_mesh.get_group(0), g.fsdp_mesh.get_group(1)
        roles[replicate.group_name] = "dp_replicate"
        if shard.group_name == g.mesh.get_group("dp_shard").group_name:
            roles[shard.group_name] = "dp_shard"
        elif shard.group_name != g.cp_group.group_name:
            roles[shard.group_name] = "dp_shard_cp"
    return roles


def role_of(group: dist.ProcessGroup, roles: dict) -> str:
    if group.group_name in roles:
        return roles[group.group_name]
    return roles.get(tuple(dist.get_process_group_ranks(group)), "other")


def _local_batch(g: ParallelDims, rows, depth: int) -> StepBatch:
    """This rank's batch: its data-parallel rows, then its CP shard; TP peers get the same."""
    ids, labels, layout = make_batch(True, rows=rows)
    per_replica = len(rows) // g.dp
    mine = slice(per_replica * g.dp_rank, per_replica * (g.dp_rank + 1))
    ids, labels = ids[mine], labels[mine]
    layout = SequenceLayout.from_lengths(rows[mine])
    reduce_group = g.token_group if g.dp * g.cp > 1 else None
    if g.cp == 1:
        batch = StepBatch.build(ids, labels, layout, depth, PAD)
        normalizer = global_normalizer(batch.depth_labels, reduce_group)
        return replace(batch, normalizer=normalizer)
    shard = shard_batch(ids, labels, layout, g.cp, g.cp_rank, depth, PAD, IGNORE)
    return shard.step_batch(global_normalizer(shard, reduce_group, tp_size=g.tp))


def run_tp(
    dp: int,
    cp: int,
    tp: int,
    depth: int,
    rows,
    fsdp: bool = False,
    tie: bool = True,
    sp: bool = True,
    compiled: bool = False,
    dp_replicate: int = 1,
):
    """One counted step on every rank: TP (sequence-parallel when ``sp``), then CP hooks,
    then (optionally) train.compile's per-layer compile, then (optionally) FSDP2 on the
    groups' FSDP mesh (HSDP when ``dp_replicate > 1``)."""
    g = tp_groups(dp, cp, tp, dp_replicate)
    model = make_tp_model(depth, tie=tie)
    cross_entropy = apply_tp(model, g.tp_mesh, sequence_parallel=sp)
    apply_cp(model, g.cp_group)
    if compiled:
        assert compile_gpt(model, verbose=False)
    if fsdp:
        apply_fsdp(model, g.fsdp_mesh)
    roles = group_roles(g)
    with count_comms() as log:
        batch = _local_batch(g, rows, depth)
        out = step_loss(model, batch, model.config.loss_weight, cross_entropy=cross_entropy)
        out.loss.backward()
        if not fsdp:
            sync_gradients(model, g.token_group if dp * cp > 1 else None)
    calls: dict[tuple[str, str], int] = {}
    for record in log.records:
        key = (record.name, role_of(record.group, roles))
        calls[key] = calls.get(key, 0) + 1
    return dict(
        **step_record(model, out),
        grad_norm=grad_norm(model.parameters()),  # mixed meshes (TP, FSDP2 + TP)
        calls=calls,
        coords=(g.dp_rank, g.cp_rank, g.tp_rank),
    )
