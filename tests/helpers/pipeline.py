"""The pipeline tests' model, batch, one-process reference and per-rank steps.

A pipeline rank holds only its stages' parameters, under the one-process names: every test
compares each rank's gradients with the reference's of the same names, and the losses
(broadcast from the last stage) on every rank with the reference's.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from multitoken import SequenceLayout, StepBatch
from multitoken.models.parallelize import parallelize_gpt, pipeline_gpt
from multitoken.parallel import ParallelDims, global_normalizer, shard_batch
from multitoken.testing.comms import count_comms

from .batches import packed_batch, random_rows
from .distributed import ATOL, RTOL, grads
from .models import tiny_model

VOCAB, PAD, IGNORE = 61, 0, -100
TP_VOCAB = 64  # rows that tp = 2 splits (the batch's ids stay below VOCAB)
# Eight layers: up to eight stages (pp = 4 with two stages per rank).
PP_GPT = dict(vocab_size=VOCAB, n_layers=8, dim=32, n_heads=4, n_kv_heads=2)
# Eight packed rows of 24 tokens, mostly documents of 1 to 3 tokens (shorter than D + 1).
PP_ROWS = random_rows(7, seqlen=24, rows=8, lengths=(1, 1, 2, 3, 5, 13))
STEPS, LR = 2, 1e-2

_DIMS: dict[tuple[int, ...], ParallelDims] = {}


def pp_dims(pp: int, dp: int = 1, cp: int = 1, tp: int = 1) -> ParallelDims:
    key = (pp, dp, cp, tp)
    if key not in _DIMS:
        _DIMS[key] = ParallelDims(pp=pp, dp=dp, cp=cp, tp=tp).build("cpu")
    return _DIMS[key]


def pp_model(depth: int, tie: bool = True, vocab: int = VOCAB, mtp: dict | None = None):
    """``mtp``: other ``MTPConfig`` fields."""
    gpt = {**PP_GPT, "vocab_size": vocab}
    return tiny_model(depth, pad_id=PAD, tie_embeddings=tie, mtp=mtp, **gpt)


def pp_reference(depth: int, tie: bool = True, vocab: int = VOCAB, mtp: dict | None = None):
    """Two AdamW steps of the whole model on the whole batch: each step's losses and
    gradients."""
    model = pp_model(depth, tie, vocab, mtp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, labels, layout = packed_batch(PP_ROWS, vocab=VOCAB)
    records = []
    for _ in range(STEPS):
        out = model.loss(ids, labels, layout)
        out.loss.backward()
        records.append(dict(loss=out.loss.detach(), depth_loss=out.depth_loss.detach(),
                            depth_tokens=out.depth_tokens, grads=grads(model)))  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
    return records


def local_batch(depth: int, dims: ParallelDims | None = None) -> StepBatch:
    """This rank's rows of the step (its DP rank's, then its CP shard with halos), the
    normaliser counted over the DP x CP ranks; the whole batch without ``dims``."""
    ids, labels, _ = packed_batch(PP_ROWS, vocab=VOCAB)
    dp, dp_rank = (1, 0) if dims is None else (dims.dp, dims.dp_rank)
    per = len(PP_ROWS) // dp
    mine = slice(per * dp_rank, per * (dp_rank + 1))
    layout = SequenceLayout.from_lengths(PP_ROWS[mine])
    group = None if dims is None or dims.token_world_size == 1 else dims.token_group
    if dims is None or dims.cp == 1:
        batch = StepBatch.build(ids[mine], labels[mine], layout, depth, PAD)
        return replace(batch, normalizer=global_normalizer(batch.depth_labels, group))
    shard = shard_batch(ids[mine], labels[mine], layout, dims.cp, dims.cp_rank, depth, PAD, IGNORE)
    return shard.step_batch(global_normalizer(shard, group, tp_size=dims.tp))


def run_pp(
    pp: int, schedule: str, depth: int, microbatches: int, tie: bool = True, mtp: dict | None = None
) -> dict:
    """Two steps on every rank of a pp-rank pool; the second one's messages counted."""
    dims = pp_dims(pp)
    model = pp_model(depth, tie, mtp=mtp)
    pipe = pipeline_gpt(model, dims, schedule, microbatches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = local_batch(depth)
    records = []
    for step in range(STEPS):
        if step == STEPS - 1:
            with count_comms() as log:
                out = pipe.step(batch, model.config.loss_weight)
        else:
            out = pipe.step(batch, model.config.loss_weight)
        records.append(dict(loss=out.loss, depth_loss=out.depth_loss,
                            depth_tokens=out.depth_tokens, grads=grads(model)))  # fmt: skip
        pipe.grad_norm()
        optimizer.step()
        optimizer.zero_grad()
    embed = model.decoder.tok_embeddings
    p2p = [r for r in log.records if r.kind == "p2p"]
    return dict(
        records=records,
        sends=sum(r.name in ("send", "isend") for r in p2p),
        recvs=sum(r.name in ("recv", "irecv") for r in p2p),
        seq_len=batch.input_ids.shape[1],
        sent_bytes=sum(r.nbytes for r in p2p),
        collectives=[r.name for r in log.records if r.kind == "collective"],
        embedding=None if embed is None else embed.weight.detach().clone(),
        rank=dist.get_rank(),
    )


def run_pp_grid(
    pp: int, dp: int, cp: int, tp: int, schedule: str, depth: int, microbatches: int,
    sp: bool = True,
) -> dict:  # fmt: skip
    """One step of pp x dp x cp x tp, built as the trainer builds it (TP, CP, then the stages
    with FSDP2 over each stage's DP x CP ranks): this rank's share of the loss (its tokens
    over the global counts), its stages' whole gradients, the gradient norm, the bytes its
    point-to-point messages carried."""
    dims = pp_dims(pp, dp, cp, tp)
    model = pp_model(depth, vocab=TP_VOCAB if tp > 1 else VOCAB)
    cross_entropy = parallelize_gpt(model, dims, sequence_parallel=sp, verbose=False)
    pipe = pipeline_gpt(model, dims, schedule, microbatches, cross_entropy=cross_entropy)
    batch = local_batch(depth, dims)
    with count_comms() as log:
        out = pipe.step(batch, model.config.loss_weight)
    norm = pipe.grad_norm()
    return dict(
        loss=out.loss, depth_loss=out.depth_loss, depth_tokens=out.depth_tokens,
        grads=grads(model), norm=norm,
        coords=(dims.pp_rank, dims.dp_rank, dims.cp_rank, dims.tp_rank),
        seq_len=batch.input_ids.shape[1],
        # The schedule's messages (the first step's shape inference adds a blocking one).
        sent_bytes=sum(r.nbytes for r in log.records if r.name == "isend"),
    )  # fmt: skip


def assert_pipeline_matches(results: list[dict], ref: list[dict], what: str) -> set[str]:
    """Every rank's step records (``run_pp``'s or ``run_hf_pp``'s) equal one process's ``ref``:
    loss, per-depth losses and tokens, each gradient the rank holds; together the ranks hold
    every gradient of ``ref``. Returns the gradients' names."""
    names = set()
    for r in results:
        for step, (got, want) in enumerate(zip(r["records"], ref)):
            label = f"{what} rank {r['rank']} step {step}"
            torch.testing.assert_close(got["loss"], want["loss"], rtol=RTOL, atol=ATOL, msg=label)
            torch.testing.assert_close(got["depth_loss"], want["depth_loss"], rtol=RTOL, atol=ATOL)
            assert torch.equal(got["depth_tokens"], want["depth_tokens"]), label
            for name, grad in got["grads"].items():
                torch.testing.assert_close(
                    grad, want["grads"][name], rtol=RTOL, atol=ATOL, msg=f"{label} {name}"
                )
            names |= set(got["grads"])
    assert names == set(ref[0]["grads"]), what  # every gradient is on some stage
    return names
