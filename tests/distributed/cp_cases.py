"""Models, batches and per-rank steps shared by the distributed tests.

The reference of every test is the plain model on the global batch in one process (no
``multitoken.parallel`` involved), computed by the pytest process itself; the ranks only
report what they computed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from multitoken import MTPConfig, MTPModel, SequenceLayout, next_token_labels, step_loss
from multitoken.models import GPTConfig
from multitoken.parallel import (
    ParallelDims,
    apply_cp,
    exchange_halo,
    global_normalizer,
    shard_batch,
    sync_gradients,
)

VOCAB, PAD, IGNORE = 61, 0, -100
# Packed rows of 40 tokens: documents shorter than 2 * cp (1, 2, 3 tokens) and shorter than D,
# lengths that are not multiples of 2 * cp (padding), and a long one.
PACKED_ROWS = [[1, 9, 2, 13, 3, 7, 5], [17, 1, 1, 6, 15]]
UNPACKED_SHAPE = (2, 21)  # 21 is not a multiple of 4 or 8: every row is padded

_GROUPS: dict[tuple[int, int, int], ParallelDims] = {}


def groups(dp: int, cp: int, dp_replicate: int = 1) -> ParallelDims:
    """The (dp, cp) groups of this pool (dp split into ``dp_replicate`` HSDP replicas), built
    once per shape (new_group is collective)."""
    key = (dp, cp, dp_replicate)
    if key not in _GROUPS:
        _GROUPS[key] = ParallelDims(dp=dp, cp=cp, dp_replicate=dp_replicate).build("cpu")
    return _GROUPS[key]


def make_model(depth: int, seed: int = 0, attention: str = "document") -> MTPModel:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        attention=attention,
    )
    return MTPModel.from_config(config, MTPConfig(num_depths=depth, loss_weight=0.3), pad_id=PAD)


def make_batch(packed: bool, seed: int = 0, rows: list[list[int]] | None = None):
    """``(input_ids, labels, layout)``; layout None when unpacked."""
    gen = torch.Generator().manual_seed(seed)
    if not packed:
        ids = torch.randint(1, VOCAB, UNPACKED_SHAPE, generator=gen)
        return ids, next_token_labels(ids), None
    layout = SequenceLayout.from_lengths(rows or PACKED_ROWS)
    ids = torch.randint(1, VOCAB, layout.shape, generator=gen)
    return ids, next_token_labels(ids, layout), layout


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


def reference(depth: int, packed: bool, rows=None, attention: str = "document") -> dict:
    """The CP = 1 run: the plain model on the global batch, in this process."""
    model = make_model(depth, attention=attention)
    ids, labels, layout = make_batch(packed, rows=rows)
    out = model.loss(ids, labels, layout)
    out.loss.backward()
    return step_record(model, out)


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
