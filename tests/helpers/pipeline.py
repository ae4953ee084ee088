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
from multitoken.models.parallelize import pipeline_gpt
from multitoken.parallel import ParallelDims, global_normalizer
from multitoken.testing.comms import count_comms

from .batches import packed_batch, random_rows
from .distributed import grads
from .models import tiny_model

VOCAB, PAD = 61, 0
# Eight layers: up to eight stages (pp = 4 with two stages per rank).
PP_GPT = dict(vocab_size=VOCAB, n_layers=8, dim=32, n_heads=4, n_kv_heads=2)
# Eight packed rows of 24 tokens, mostly documents of 1 to 3 tokens (shorter than D + 1).
PP_ROWS = random_rows(7, seqlen=24, rows=8, lengths=(1, 1, 2, 3, 5, 13))
STEPS, LR = 2, 1e-2

_DIMS: dict[tuple[int, int], ParallelDims] = {}


def pp_dims(pp: int, dp: int = 1) -> ParallelDims:
    key = (pp, dp)
    if key not in _DIMS:
        _DIMS[key] = ParallelDims(pp=pp, dp=dp).build("cpu")
    return _DIMS[key]


def pp_model(depth: int, tie: bool = True):
    return tiny_model(depth, pad_id=PAD, tie_embeddings=tie, **PP_GPT)


def pp_reference(depth: int, tie: bool = True) -> list[dict]:
    """Two AdamW steps of the whole model on the whole batch: each step's losses and
    gradients."""
    model = pp_model(depth, tie)
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


def local_batch(depth: int, dp: int, dp_rank: int, group) -> StepBatch:
    ids, labels, _ = packed_batch(PP_ROWS, vocab=VOCAB)
    per = len(PP_ROWS) // dp
    mine = slice(per * dp_rank, per * (dp_rank + 1))
    layout = SequenceLayout.from_lengths(PP_ROWS[mine])
    batch = StepBatch.build(ids[mine], labels[mine], layout, depth, PAD)
    return replace(batch, normalizer=global_normalizer(batch.depth_labels, group))


def run_pp(pp: int, schedule: str, depth: int, microbatches: int, tie: bool = True) -> dict:
    """Two steps on every rank of a pp-rank pool; the second one's messages counted."""
    dims = pp_dims(pp)
    model = pp_model(depth, tie)
    pipe = pipeline_gpt(model, dims, schedule, microbatches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = local_batch(depth, 1, 0, None)
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
        sent_bytes=sum(r.nbytes for r in p2p),
        collectives=[r.name for r in log.records if r.kind == "collective"],
        embedding=None if embed is None else embed.weight.detach().clone(),
        rank=dist.get_rank(),
    )


def run_pp_layout(pp: int, dp: int, schedule: str, depth: int, microbatches: int) -> dict:
    """One step of pp x dp (FSDP2 over each stage's DP ranks): this rank's share of the loss
    (its DP rank's rows over the global counts) and its stages' whole gradients."""
    dims = pp_dims(pp, dp)
    model = pp_model(depth)
    pipe = pipeline_gpt(model, dims, schedule, microbatches)
    batch = local_batch(depth, dp, dims.dp_rank, dims.token_group)
    out = pipe.step(batch, model.config.loss_weight)
    norm = pipe.grad_norm()
    return dict(loss=out.loss, depth_loss=out.depth_loss, depth_tokens=out.depth_tokens,
                grads=grads(model), norm=norm, coords=(dims.pp_rank, dims.dp_rank))  # fmt: skip
