"""Issue 22, item 9: an HF model is built on the meta device and materialised shard by shard.

``build_model`` with FSDP2 builds the model from its config on the meta device (no storage, no
weight read), shards it, then each rank reads its own rows (multitoken.hf.meta). What it must
give is exactly ``load_hf_mtp_model``'s model: every parameter, buffer and MTP depth (the same
seed's initialisation, or the folder's MTP weights), tied embeddings still tied, the generator
left in the same state. Here on a 1-rank gloo group with FSDP2; the 2-rank shards, the rows
each rank reads and the bit-identical step are in tests/distributed/test_hf_meta_shards.py.
"""

import tempfile

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import multitoken.hf.meta as meta
from multitoken import MTPConfig
from multitoken.errors import CheckpointError
from multitoken.hf.meta import materialize_hf_mtp_model, meta_hf_mtp_model
from multitoken.hf.weights import load_hf_mtp_model, save_pretrained
from multitoken.parallel.fsdp import apply_fsdp
from multitoken.testing.tiny_hf import save_tiny


@pytest.fixture
def one_rank_group():
    store = dist.FileStore(tempfile.mktemp(prefix="multitoken-test-"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class _Allocations(TorchDispatchMode):
    """Bytes of every tensor an op returns off the meta device."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _assert_same(eager, built) -> None:
    """Every parameter and buffer, by name, bit-equal; the same tie."""
    want, got = eager.state_dict(), built.state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(_full(got[name]), value), name
    for (name, value), (_, other) in zip(eager.named_buffers(), built.named_buffers()):
        assert torch.equal(_full(other), value), name
    for model in (eager, built):
        assert model.num_depths == eager.num_depths
    tied = eager.head_weight is eager.decoder.base.embed_tokens.weight
    assert (built.head_weight is built.decoder.base.embed_tokens.weight) == tied


def _sharded(folder, mtp, mesh):
    model = meta_hf_mtp_model(folder, mtp)
    apply_fsdp(model, mesh)
    return model


def test_the_build_allocates_and_reads_nothing_before_sharding(one_rank_group, monkeypatch):
    folder = save_tiny("qwen3", tempfile.mkdtemp() + "/qwen3")
    monkeypatch.setattr(meta, "safe_open", None)  # no weight may be read before materialising
    monkeypatch.setattr("multitoken.hf.weights.safe_open", None)
    with _Allocations() as seen:
        model = _sharded(folder, MTPConfig(num_depths=2), one_rank_group)
    assert seen.bytes == 0
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert all(isinstance(p, DTensor) for p in model.parameters())


@pytest.mark.parametrize(
    "model_type, depths, overrides",
    [
        ("llama", 2, {}),
        ("llama", 1, {"tie_word_embeddings": True}),
        ("mistral", 0, {}),
        ("qwen2", 1, {}),
        ("qwen3", 2, {}),
        ("deepseek_v3", 2, {}),  # stacked experts read from per-expert tensors; routing bias
        ("glm4_moe", 1, {}),
        ("qwen3_moe", 1, {}),
        ("qwen3_next", 1, {}),
    ],
)
def test_the_materialised_model_equals_the_eager_one(
    one_rank_group, tmp_path, model_type, depths, overrides
):
    folder = save_tiny(model_type, tmp_path / model_type, **overrides)
    mtp = MTPConfig(num_depths=depths)
    eager = load_hf_mtp_model(folder, mtp, seed=5)
    after_eager = torch.get_rng_state()
    torch.manual_seed(123)  # the materialisation seeds the depths itself, as the eager build
    model = _sharded(folder, mtp, one_rank_group)
    materialize_hf_mtp_model(model, folder, device="cpu", seed=5)
    assert torch.equal(torch.get_rng_state(), after_eager)
    _assert_same(eager, model)
    assert not any(p.is_meta for p in model.parameters())
    # And it trains: a forward and backward through FSDP2 (which re-pads the shards).
    ids = torch.randint(1, 97, (2, 12))
    out = model.loss(ids, ids.roll(-1, 1))
    out.loss.backward()
    assert torch.equal(out.loss, eager.loss(ids, ids.roll(-1, 1)).loss)


def test_unsharded_materialisation_equals_too(tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")
    mtp = MTPConfig(num_depths=2)
    model = materialize_hf_mtp_model(meta_hf_mtp_model(folder, mtp), folder, device="cpu")
    _assert_same(load_hf_mtp_model(folder, mtp), model)


@pytest.mark.parametrize("fmt", ["deepseek", "mimo", "qwen3_next"])
def test_the_folders_mtp_weights_are_loaded(one_rank_group, tmp_path, fmt):
    """Depths from the folder (DeepSeek's copies of the embedding and head checked against the
    folder's own), not from the seed."""
    depths = 1 if fmt == "qwen3_next" else 2
    mtp = MTPConfig(num_depths=depths)
    trained = load_hf_mtp_model(save_tiny("llama", tmp_path / "base"), mtp, seed=9)
    folder = save_pretrained(trained, tmp_path / fmt, fmt)
    model = _sharded(folder, mtp, one_rank_group)
    materialize_hf_mtp_model(model, folder, device="cpu", seed=0)
    _assert_same(load_hf_mtp_model(folder, mtp, seed=0), model)
    _assert_same(trained, model)


def test_bf16_weights_are_cast_as_transformers_casts_them(one_rank_group, tmp_path):
    folder = save_tiny("qwen2", tmp_path / "qwen2")
    file = folder / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(file).items()}, file, {"format": "pt"})
    mtp = MTPConfig(num_depths=1)
    model = _sharded(folder, mtp, one_rank_group)
    materialize_hf_mtp_model(model, folder, device="cpu")
    _assert_same(load_hf_mtp_model(folder, mtp), model)
    assert all(p.dtype is torch.float32 for p in model.parameters())


def test_a_tensor_the_folder_lacks_is_refused(one_rank_group, tmp_path):
    """Qwen2's q/k/v biases are not among the tensors the folder's gate requires: a folder
    without one is refused by name (never left at the empty storage's values)."""
    folder = save_tiny("qwen2", tmp_path / "qwen2")
    file = folder / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, file, {"format": "pt"})
    model = _sharded(folder, MTPConfig(num_depths=1), one_rank_group)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        materialize_hf_mtp_model(model, folder, device="cpu")
