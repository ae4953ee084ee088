"""The distributed tests' reference and per-rank steps.

The reference of every test is the plain model on the global batch in one process (no
``multitoken.parallel`` involved), computed by the pytest process itself; the ranks (a
``RankPool``, see ``rank_pool.py``) only report what they computed: their losses, their full
gradients and, for TP, the collectives of one step tagged with the role of their group.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from multitoken import MTPModel, SequenceLayout, StepBatch, step_loss
from multitoken.models.parallelize import apply_tp, compile_gpt
from multitoken.parallel import (
    ParallelDims,
    apply_cp,
    apply_fsdp,
    exchange_halo,
    global_normalizer,
    grad_norm,
    shard_batch,
    sync_gradients,
)
from multitoken.testing.comms import count_comms

from .batches import packed_batch, unpacked_batch
from .models import tiny_model

RTOL, ATOL = 1e-5, 1e-6
VOCAB, PAD, IGNORE = 61, 0, -100
# 64 tokens, 8 query and 4 key/value heads, a feed-forward of 128: tp in {1, 2, 4} splits all.
TP_VOCAB = 64
N_LAYERS = 2
# Packed rows of 40 tokens: documents shorter than 2 * cp (1, 2, 3 tokens) and shorter than D,
# lengths that are not multiples of 2 * cp (padding), and a long one.
PACKED_ROWS = [[1, 9, 2, 13, 3, 7, 5], [17, 1, 1, 6, 15]]
UNPACKED_SHAPE = (2, 21)  # 21 is not a multiple of 4 or 8: every row is padded
# Four rows of 24 tokens for data parallelism (one or two rows per replica).
DP_ROWS = [[1, 9, 2, 12], [24], [3, 3, 3, 3, 3, 9], [5, 1, 17, 1]]

_GROUPS: dict[tuple[int, int, int, int], ParallelDims] = {}


def groups(dp: int, cp: int, tp: int = 1, dp_replicate: int = 1) -> ParallelDims:
    """The (dp, cp, tp) groups of this pool (dp split into ``dp_replicate`` HSDP replicas),
    built once per shape (new_group is collective)."""
    key = (dp, cp, tp, dp_replicate)
    if key not in _GROUPS:
        _GROUPS[key] = ParallelDims(dp=dp, cp=cp, tp=tp, dp_replicate=dp_replicate).build("cpu")
    return _GROUPS[key]


def make_model(depth: int, seed: int = 0, attention: str = "document") -> MTPModel:
    """The CP tests' model: the tiny GPT over ``VOCAB`` tokens."""
    return tiny_model(depth, seed=seed, vocab_size=VOCAB, attention=attention, pad_id=PAD)


def make_tp_model(depth: int, seed: int = 0, tie: bool = True, **overrides) -> MTPModel:
    """The TP tests' model: 8 query and 4 key/value heads, so that tp 2 and 4 split them."""
    fields = dict(vocab_size=TP_VOCAB, n_heads=8, n_kv_heads=4, tie_embeddings=tie)
    return tiny_model(depth, seed=seed, pad_id=PAD, **{**fields, **overrides})


def make_batch(packed: bool, seed: int = 0, rows: list[list[int]] | None = None):
    """``(input_ids, labels, layout)`` over ``VOCAB``; layout None when unpacked."""
    if not packed:
        return unpacked_batch(UNPACKED_SHAPE, seed=seed, vocab=VOCAB)
    return packed_batch(rows or PACKED_ROWS, seed=seed, vocab=VOCAB)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (DTensor shards of FSDP2 / TP gathered: a collective,
    so call it outside a counted step)."""
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is not None:
            out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
    return out


def step_record(model: torch.nn.Module, out) -> dict:
    """What the tests compare after a backward: the losses, the counts, every gradient."""
    return dict(
        loss=out.loss.detach(),
        depth_loss=out.depth_loss.detach(),
        depth_tokens=out.depth_tokens,
        grads=grads(model),
    )


def reference_step(model: MTPModel, ids, labels, layout) -> dict:
    """The one-process step every distributed step is compared against: the plain model's
    loss on the global batch, its backward, the record of both."""
    out = model.loss(ids, labels, layout)
    out.loss.backward()
    return step_record(model, out)


def reference(depth: int, packed: bool, rows=None, attention: str = "document") -> dict:
    """The CP = 1 run: the plain model on the global batch, in this process."""
    return reference_step(make_model(depth, attention=attention), *make_batch(packed, rows=rows))


def tp_reference(depth: int, rows, tie: bool = True) -> dict:
    """The TP model in one process on the global batch, with its gradient norm."""
    model = make_tp_model(depth, tie=tie)
    record = reference_step(model, *make_batch(True, rows=rows))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    return dict(**record, grad_norm=norm)


def assert_matches(results: list[dict], ref: dict, what: str) -> None:
    """CP / DP ranks: the losses and token counts sum to the reference's, every rank holds
    every reference gradient."""
    torch.testing.assert_close(sum(r["loss"] for r in results), ref["loss"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        sum(r["depth_loss"] for r in results), ref["depth_loss"], rtol=RTOL, atol=ATOL
    )
    assert torch.equal(sum(r["depth_tokens"] for r in results), ref["depth_tokens"]), what
    for rank, r in enumerate(results):
        assert r["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(
                r["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=f"{what} rank {rank} {name}"
            )


def assert_tp_matches(results: list[dict], ref: dict, what: str) -> None:
    """TP peers hold the same tokens: the loss is summed over one TP rank per token shard."""
    firsts = [r for r in results if r["coords"][2] == 0]
    for r in results:  # every TP peer computed the same loss as its TP rank 0
        peer = next(f for f in firsts if f["coords"][:2] == r["coords"][:2])
        assert torch.equal(r["loss"], peer["loss"]), what
    total = sum(r["loss"] for r in firsts)
    torch.testing.assert_close(total, ref["loss"], rtol=RTOL, atol=ATOL, msg=what)
    depth_loss = sum(r["depth_loss"] for r in firsts)
    torch.testing.assert_close(depth_loss, ref["depth_loss"], rtol=RTOL, atol=ATOL, msg=what)
    assert torch.equal(sum(r["depth_tokens"] for r in firsts), ref["depth_tokens"]), what
    for r in results:
        torch.testing.assert_close(r["grad_norm"], ref["grad_norm"], rtol=RTOL, atol=ATOL)
        assert r["grads"].keys() == ref["grads"].keys(), what
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(
                r["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=f"{what} {r['coords']} {name}"
            )


# ---------------------------------------------------------------- context parallelism


def cp_step(shard, model: MTPModel, g: ParallelDims, norm_group, grad_group) -> dict:
    """One training step of a shard: normaliser, halo exchange if the shard has none, forward,
    backward, gradient sum. The normaliser goes first: it checks that the CP peers agree on
    the plan before any collective whose sizes depend on it."""
    normalizer = global_normalizer(shard, norm_group)
    if not shard.has_halo:
        shard = exchange_halo(shard, group=g.cp_group)
    out = step_loss(model, shard.step_batch(normalizer), model.config.loss_weight)
    out.loss.backward()
    sync_gradients(model, grad_group)
    return {**step_record(model, out), "out": out}


def run_cp(depth: int, packed: bool, way: str, rows=None, attention: str = "document") -> dict:
    """On every rank of a CP-only pool: this rank's loss share and the CP-summed gradients."""
    g = groups(1, dist.get_world_size())
    ids, labels, layout = make_batch(packed, rows=rows)
    model = apply_cp(make_model(depth, attention=attention), g.cp_group)
    halo = way == "halo"
    shard = shard_batch(ids, labels, layout, g.cp, g.cp_rank, depth, PAD, IGNORE, halo=halo)
    result = cp_step(shard, model, g, g.cp_group, g.cp_group)
    result.pop("out")
    return result


# ---------------------------------------------------------------- FSDP2 and HSDP


def fsdp_step_footprint(dp: int, dp_replicate: int = 1) -> dict:
    """One optimiser step on ``dp`` FSDP2 ranks (HSDP over ``dp_replicate`` replicas): this
    rank's parameter + gradient + AdamW bytes, and the collectives of the step by name and
    group."""
    g = groups(dp, 1, dp_replicate=dp_replicate)
    depth = 2
    ids, labels, layout = make_batch(packed=True, rows=DP_ROWS)
    rows_per_rank = len(DP_ROWS) // dp
    rows = slice(rows_per_rank * g.dp_rank, rows_per_rank * (g.dp_rank + 1))
    model = apply_fsdp(make_model(depth), g.fsdp_mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = StepBatch.build(
        ids[rows], labels[rows], SequenceLayout.from_lengths(DP_ROWS[rows]), depth, PAD
    )
    with count_comms() as log:
        normalizer = global_normalizer(batch.depth_labels, g.token_group)
        batch = replace(batch, normalizer=normalizer)
        step_loss(model, batch, 0.3).loss.backward()
    optimizer.step()

    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state = [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
    footprint = sum(local_bytes(p) + local_bytes(p.grad) for p in model.parameters())
    footprint += sum(local_bytes(v) for v in state)
    # By group name: the groups FSDP2 resolves from the mesh are ours, by name.
    named = {"dp_cp": g.token_group}
    if dp_replicate > 1:
        named.update(
            dp_replicate=g.mesh.get_group("dp_replicate"), dp_shard=g.mesh.get_group("dp_shard")
        )
    names = {group.group_name: role for role, group in named.items()}
    calls = {}
    for r in log.records:
        key = (r.name, names.get(getattr(r.group, "group_name", r.group), "other"))
        calls[key] = calls.get(key, 0) + 1
    return dict(bytes=footprint, calls=calls)


# ---------------------------------------------------------------- tensor parallelism


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
    for role, group in (("tp", g.tp_group), ("cp", g.cp_group), ("dp_cp", g.token_group)):
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
    g = groups(dp, cp, tp, dp_replicate)
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


def expected_calls(
    dp: int,
    cp: int,
    tp: int,
    depth: int,
    fsdp: bool = False,
    sp: bool = True,
    dp_replicate: int = 1,
) -> dict:
    """Collectives of one ``run_tp`` step by (name, group role); n transformer layers, main
    and MTP. Roles as :func:`group_roles` names them."""
    n = N_LAYERS + depth
    calls = {}
    if tp > 1 and sp:
        # Forward: the embedding (main + each depth) all-reduced; per layer the attention's
        # and the feed-forward's input all-gathered from sequence shards and wo's and w2's
        # output reduce-scattered to them; each eh_proj's output reduce-scattered; the final
        # norm of the decoder and of each depth gathered. Backward: the mirror image (an
        # all-gather for each reduce-scatter and back; the first layer's and each depth's
        # entry slices gathered, each eh_proj's feature-split input gathered), one
        # all-reduce per norm weight (two per layer, one per final norm) and the loss's
        # hidden gradient per depth.
        calls[("all_reduce", "tp")] = (1 + depth) + 2 * n + (1 + depth) + (depth + 1)
        calls[("all_gather_into_tensor", "tp")] = (2 * n + 1 + depth) + (2 * n + 1 + 2 * depth)
        calls[("reduce_scatter_tensor", "tp")] = (2 * n + depth) + 2 * n
        calls[("all_gather_single", "tp")] = depth + 1  # the loss statistics
    elif tp > 1:
        # Forward: the embedding (main + each depth), wo and w2 of every layer. Backward: the
        # attention's and feed-forward's input gradient of every layer, each eh_proj's input
        # gradient, the loss's hidden gradient per depth.
        calls[("all_reduce", "tp")] = (1 + depth) + 2 * n + 2 * n + depth + (depth + 1)
        if depth:
            calls[("all_gather_into_tensor", "tp")] = depth  # eh_proj's output
        calls[("all_gather_single", "tp")] = depth + 1  # the loss statistics
    if cp > 1:
        calls[("all_gather_single", "cp")] = n  # K/V forward
        calls[("reduce_scatter_single", "cp")] = n  # their gradient backward
    if dp * cp > 1:
        # With dp = 1 the DP x CP ranks are the CP ranks (see group_roles).
        role = "cp" if dp == 1 else "dp_cp"
        calls[("all_reduce", role)] = 1 if fsdp else 2  # normaliser (+ gradient sum)
        if fsdp and dp_replicate == 1:
            # Every layer gathered forward and backward, the root once; one RS each.
            calls[("all_gather_single", role)] = 2 * n + 1
            calls[("reduce_scatter_single", role)] = n + 1
        elif fsdp:
            # HSDP: the same gathers and reduce-scatters on the shard dim (dp_shard x cp), none
            # when it has one rank; then one all-reduce per unit across the replicas.
            dp_shard = dp // dp_replicate
            if dp_shard * cp > 1:
                shard = "dp_shard" if cp == 1 else "cp" if dp_shard == 1 else "dp_shard_cp"
                for name, count in (
                    ("all_gather_single", 2 * n + 1),
                    ("reduce_scatter_single", n + 1),
                ):
                    calls[(name, shard)] = calls.get((name, shard), 0) + count
            calls[("all_reduce", "dp_replicate")] = n + 1
    return calls
