"""Issue 22, item 9, on 2 ranks (and HSDP on 4): each rank reads only its shard's rows of the
folder, and the meta-built, materialised model is the eager-built one sharded: every local shard
equal, and one training step gives bit-identical losses and gradients
(tests/unit/test_hf_meta_build.py has the 1-rank cases)."""

import math

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh

import multitoken.hf.meta as meta
from multitoken import MTPConfig
from multitoken.hf.meta import local_rows, materialize_hf_mtp_model, meta_hf_mtp_model
from multitoken.hf.weights import load_hf_mtp_model
from multitoken.parallel.fsdp import apply_fsdp
from multitoken.testing.tiny_hf import save_tiny

_BASE = "decoder.model."


class _Recorded:
    """``safe_open`` whose handles report every row range read and refuse whole reads."""

    def __init__(self, reads: list):
        self.reads = reads

    def __call__(self, path, framework):
        return _Handle(safe_open(path, framework=framework), self.reads)


class _Handle:
    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_slice(self, key):
        return _Slice(key, self.handle.get_slice(key), self.reads)

    def get_tensor(self, key):
        raise AssertionError(f"{key} read whole")


class _Slice:
    def __init__(self, key, inner, reads):
        self.key, self.inner, self.reads = key, inner, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, rows: slice):
        self.reads.append((self.key, rows.start, rows.stop))
        return self.inner[rows]


def _local(tensor):
    """A DTensor's shard; a buffer (FSDP2 leaves them whole) itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _step(model, ids):
    out = model.loss(ids, ids.roll(-1, 1))
    out.loss.backward()
    grads = {n: p.grad.to_local() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def run_meta_build(folder: str, depths: int, shape: tuple[int, ...]) -> dict:
    """On every rank: the eager model sharded, the meta-built one materialised, compared."""
    assert dist.get_world_size() == math.prod(shape)
    names = ("replicate", "shard")[-len(shape) :]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    mtp = MTPConfig(num_depths=depths)
    eager = apply_fsdp(load_hf_mtp_model(folder, mtp, seed=5), mesh)
    reads: list = []
    saved, meta.safe_open = meta.safe_open, _Recorded(reads)
    try:
        model = apply_fsdp(meta_hf_mtp_model(folder, mtp), mesh)
        materialize_hf_mtp_model(model, folder, device="cpu", seed=5)
    finally:
        meta.safe_open = saved
    unequal = [
        name
        for (name, want), (_, got) in zip(eager.state_dict().items(), model.state_dict().items())
        if not torch.equal(_local(want), _local(got))
    ]
    shards = {}
    for name, param in model.named_parameters():
        local, start = local_rows(param)
        shards[name] = (start, start + local.shape[0], param.shape[0])
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 12))
    (loss, grads), (eager_loss, eager_grads) = _step(model, ids), _step(eager, ids)
    return dict(
        reads=reads,
        shards=shards,
        unequal=unequal,
        loss_equal=torch.equal(loss, eager_loss),
        grads_equal=[n for n in eager_grads if not torch.equal(grads[n], eager_grads[n])],
        tied=model.head_weight is model.decoder.base.embed_tokens.weight,
    )


@pytest.mark.parametrize("shape", [(2,), (2, 2)], ids=["fsdp2", "hsdp2x2"])
def test_each_rank_reads_its_rows_and_equals_the_eager_build(rank_pool, tmp_path, shape):
    """FSDP2 over 2 ranks, and HSDP (2 replicas of 2 shards: the placements are (Replicate,
    Shard(0)))."""
    # vocab 97: FSDP2's shards of the embedding are 49 and 48 rows (the second padded).
    folder = str(save_tiny("qwen3", tmp_path / "qwen3", tie_word_embeddings=True))
    results = rank_pool(math.prod(shape)).run(run_meta_build, folder, 2, shape)
    for rank, r in enumerate(results):
        assert r["unequal"] == [] and r["grads_equal"] == [], rank
        assert r["loss_equal"] and r["tied"], rank
        backbone = {
            name.removeprefix(_BASE): (start, stop)
            for name, (start, stop, _) in r["shards"].items()
            if name.startswith(_BASE) and stop > start
        }
        # Exactly this rank's rows of every backbone tensor, once each, nothing else.
        assert sorted(r["reads"]) == sorted((k, a, b) for k, (a, b) in backbone.items()), rank
    embed = "decoder.model.model.embed_tokens.weight"
    assert sorted({r["shards"][embed] for r in results}) == [(0, 49, 97), (49, 97, 97)]
    for name, (_, _, rows) in results[0]["shards"].items():  # the shards tile each tensor
        spans = sorted({r["shards"][name][:2] for r in results})
        assert spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == rows, name


def test_moe_experts_and_routing_bias_equal_the_eager_build(rank_pool, tmp_path):
    """DeepSeek-V3: the stacked experts (4, so 2 rows per rank) come from the folder's
    per-expert tensors, read whole one parameter at a time and cut to the rank's rows; the
    routing biases (buffers) are read whole; the MTP layers are MoE layers too."""
    folder = str(save_tiny("deepseek_v3", tmp_path / "deepseek_v3"))
    results = rank_pool(2).run(run_meta_build, folder, 2, (2,))
    for rank, r in enumerate(results):
        assert r["unequal"] == [] and r["grads_equal"] == [], rank
        assert r["loss_equal"], rank
    experts = "decoder.model.model.layers.1.mlp.experts.gate_up_proj"
    assert sorted(r["shards"][experts] for r in results) == [(0, 2, 4), (2, 4, 4)]
