"""The CUDA paths, checked on the CPU (issue 22): what a first GPU run would have hit.

No GPU here: device counts are faked by monkeypatching ``torch.cuda``, and each test checks a
decision (a layout, a dtype, a device, a timeout) that only shows on a GPU.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from multitoken import MTPConfig, MTPModel
from multitoken.errors import ConfigError
from multitoken.models import GPTConfig
from multitoken.parallel import clip_grad_norm, grad_norm
from multitoken.train.config_io import explicit_keys, load_config
from multitoken.train.preflight import fit_to_devices


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ---------------------------------------------------------------- 1: local ranks and devices


def test_explicit_keys_are_the_ones_the_user_set(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[parallel]\ndp = 2\n[model]\ndim = 64\n")
    assert explicit_keys(toml, ["parallel.cp=2", "mtp.depth=1"]) == {
        "parallel.dp",
        "model.dim",
        "parallel.cp",
        "mtp.num_depths",
    }
    assert explicit_keys(None, []) == set()


@pytest.mark.parametrize("gpus, cp", [(0, 2), (1, 1), (2, 2), (8, 2)])
def test_the_default_run_fits_the_gpus_here(monkeypatch, gpus, cp):
    _fake_gpus(monkeypatch, gpus)
    cfg = load_config(None, [])
    fitted = fit_to_devices(cfg, cfg.parallel.world, explicit=set())
    assert fitted.parallel.cp == cp and fitted.parallel.world <= max(gpus, 2)
    assert fitted.data == cfg.data and fitted.model == cfg.model  # the same batches


def test_a_layout_the_user_chose_is_refused_with_one_line_when_gpus_are_missing(monkeypatch):
    _fake_gpus(monkeypatch, 1)
    cfg = load_config(None, ["parallel.cp=2"])
    with pytest.raises(ConfigError, match=r"2 local ranks .* 1 CUDA device\(s\) here.*lower"):
        fit_to_devices(cfg, 2, explicit={"parallel.cp"})
    # Under torchrun the ranks exist already: refused, never refitted.
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES="):
        fit_to_devices(load_config(None, []), 2, explicit=set(), launcher=False)
    # On the CPU any number of gloo ranks runs.
    _fake_gpus(monkeypatch, 0)
    assert fit_to_devices(cfg, 2, explicit={"parallel.cp"}) is cfg


def test_a_local_rank_without_a_gpu_is_one_error_before_set_device(monkeypatch):
    from multitoken.parallel.rendezvous import local_device

    _fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device called"))
    with pytest.raises(ConfigError, match=r"local rank 1 needs cuda:1 .* 1 CUDA device"):
        local_device()


def test_the_cli_trains_the_default_run_in_one_process_on_one_gpu(monkeypatch, capsys):
    from multitoken import cli

    _fake_gpus(monkeypatch, 1)
    seen = {}

    def stop(cfg, ranks_here):  # the preflight, reached with the fitted layout: stop there
        seen["world"], seen["ranks"] = cfg.parallel.world, ranks_here
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(cli, "_preflight", stop)
    assert cli.main(["train"]) == 2
    assert seen == {"world": 1, "ranks": 1}
    assert "1 CUDA device(s) here: training with parallel.cp=1" in capsys.readouterr().err
    assert cli.main(["train", "parallel.cp=2"]) == 2
    assert "error: 2 local ranks" in capsys.readouterr().err


# ---------------------------------------------------------------- 3: the collective timeout


def test_the_collective_timeout_reaches_init_process_group(monkeypatch):
    from multitoken.parallel import rendezvous
    from multitoken.train.ranks import setup_dims

    cfg = load_config(None, ["parallel.cp=2", "parallel.timeout_s=5400"])
    assert load_config(None, []).parallel.timeout_s == 3600  # NCCL's own default is 600
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: seen.update(kw))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rendezvous.init_distributed(timeout=timedelta(seconds=5400))
    assert seen["timeout"] == timedelta(seconds=5400)
    # ... from the config, through setup_dims.
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("multitoken.train.ranks.init_distributed", lambda **kw: calls.append(kw))
    monkeypatch.setattr(type(cfg.parallel.dims), "build", lambda self, device_type: self)
    setup_dims(cfg, torch.device("cpu"))
    assert calls == [{"timeout": timedelta(seconds=5400)}]
    with pytest.raises(ConfigError, match="timeout_s must be >= 1"):
        load_config(None, ["parallel.timeout_s=0"])


# ---------------------------------------------------------------- 7: FSDP2 in bf16 on CUDA


def _tiny_model() -> MTPModel:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32)
    return MTPModel.from_config(config, MTPConfig(num_depths=1))


def test_fsdp2_gathers_bf16_parameters_when_the_step_runs_under_bf16_autocast(monkeypatch):
    from multitoken.models import parallelize
    from multitoken.train.model import build_model, mixed_precision

    cfg = load_config(None, [])
    assert mixed_precision(cfg, torch.device("cuda")) is torch.bfloat16
    assert mixed_precision(cfg, torch.device("cpu")) is None  # CPU: unchanged, fp32
    off = load_config(None, ["train.bf16=false"])
    assert mixed_precision(off, torch.device("cuda")) is None
    # parallelize_gpt hands it to FSDP2.
    calls = []
    monkeypatch.setattr(parallelize, "apply_fsdp", lambda m, mesh, **kw: calls.append(kw))
    dims = SimpleNamespace(pp=1, tp=1, cp=1, token_world_size=2, fsdp_mesh=None)
    parallelize.parallelize_gpt(_tiny_model(), dims, mixed_precision=torch.bfloat16)
    assert calls == [{"param_dtype": torch.bfloat16}]
    # build_model threads it from the config and the device.
    seen = {}
    monkeypatch.setattr(
        "multitoken.train.model.parallelize_gpt", lambda m, d, **kw: seen.update(kw)
    )
    build_model(cfg, 64, 0, cfg.parallel.dims, torch.device("cpu"))
    assert seen["mixed_precision"] is None


@pytest.fixture
def one_rank_group():
    store = dist.FileStore(tempfile.mktemp(prefix="multitoken-test-"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_policy_on_a_one_rank_mesh(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    from multitoken.parallel.fsdp import apply_fsdp

    model = _tiny_model()
    apply_fsdp(model, init_device_mesh("cpu", (1,)), param_dtype=torch.bfloat16)
    policy = model._get_fsdp_state()._mp_policy
    assert policy.param_dtype is torch.bfloat16 and policy.reduce_dtype is torch.float32
    seen = []
    layer = model.decoder.layers[0]
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.attention.wq.weight.dtype))
    ids = torch.randint(1, 64, (1, 16))
    model(ids)
    assert seen == [torch.bfloat16]  # gathered in bf16: half the bytes, no re-cast per use
    # The layer is resharded after its forward: what stays is the fp32 shard.
    assert all(p.dtype is torch.float32 for p in layer.parameters())


# ---------------------------------------------------------------- 11: the norm of no gradient


def test_the_gradient_norm_of_no_gradient_is_on_the_models_device():
    params = [torch.nn.Parameter(torch.ones(3, device="meta"))]
    assert grad_norm(params).device.type == "meta"
    assert grad_norm([], device="meta").device.type == "meta"
    assert clip_grad_norm(params, 1.0).device.type == "meta"
    norm = grad_norm([], device=torch.device("cpu"))
    assert norm.dtype is torch.float32 and norm.item() == 0.0
    # ... so that it stacks with the guard's flags on that device.
    from multitoken.train.guard import NonFiniteGuard

    guard = NonFiniteGuard(5, None, torch.device("cpu"), False)
    assert guard.check(torch.tensor(1.0), grad_norm([], device="cpu"), False) == (False, False)


# ---------------------------------------------------------------- 2: Flex or SDPA, once


def test_the_backend_is_chosen_once_by_head_size_and_probe(monkeypatch):
    from multitoken.models import attention

    probes = []

    def probe(device_type, head_dim=None):
        probes.append((device_type, head_dim))
        return None  # compiled FlexAttention works (as on a GPU with Triton)

    monkeypatch.setattr(attention, "flex_unavailable", probe)
    resolve = attention.resolve_backend
    assert resolve("auto", "cuda", 64) == "flex"
    assert resolve("auto", "cuda", 8) == "sdpa"  # Inductor refuses heads under 16
    assert resolve("flex", "cuda", 8) == "sdpa"
    assert resolve("auto", "cpu", 64) == "sdpa"
    assert resolve("sdpa", "cuda", 64) == "sdpa"
    assert probes == [("cuda", 64)]  # the probe only where Flex is a candidate
    monkeypatch.setattr(attention, "flex_unavailable", lambda *a: "no Triton")
    assert resolve("auto", "cuda", 64) == "sdpa"  # no compiler: SDPA, never an error


def test_a_model_resolves_its_backend_from_its_head_size(monkeypatch):
    from multitoken.models import attention

    monkeypatch.setattr(attention, "flex_unavailable", lambda *a: None)
    small = GPTConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4)  # head size 8
    large = GPTConfig(vocab_size=64, dim=128, n_layers=1, n_heads=2)  # head size 64
    assert MTPModel.from_config(small, MTPConfig()).decoder.backend("cuda") == "sdpa"
    assert MTPModel.from_config(large, MTPConfig()).decoder.backend("cuda") == "flex"
    assert MTPModel.from_config(large, MTPConfig()).decoder.backend("cpu") == "sdpa"


# ---------------------------------------------------------------- 5: the block mask's cost


def _packed_layout(batch: int, seqlen: int, seed: int = 0):
    """Packed documents of random lengths with padding runs (doc id -1), as the sharder makes."""
    from multitoken import SequenceLayout

    gen = torch.Generator().manual_seed(seed)
    rows, doc = [], 0
    for _ in range(batch):
        row = []
        while len(row) < seqlen:
            n = int(torch.randint(1, seqlen // 3 + 2, (1,), generator=gen))
            pad = int(torch.randint(0, 2, (1,), generator=gen)) * 3
            row += [doc] * n + [-1] * pad
            doc += 1
        rows.append(row[:seqlen])
    return SequenceLayout.from_doc_ids(torch.tensor(rows))


def _sharded_layouts(seqlen: int):
    from multitoken import next_token_labels
    from multitoken.parallel import shard_batch

    layout = _packed_layout(2, seqlen, seed=1)
    ids = torch.randint(1, 50, (2, seqlen))
    shard = shard_batch(ids, next_token_labels(ids, layout), layout, 2, 1, 1, 0)
    return shard.layout, shard.step_batch(torch.zeros(2, dtype=torch.long)).kv_layout


@pytest.mark.parametrize("mode", ["document", "causal"])
@pytest.mark.parametrize("block", [4, 16])
def test_the_block_mask_from_block_ranges_equals_the_dense_one(mode, block):
    from torch.nn.attention.flex_attention import create_block_mask

    from multitoken.models.attention import AttentionMask
    from multitoken.models.block_mask import document_block_mask

    for q, kv in [(_packed_layout(3, 70), None), _sharded_layouts(96)]:
        rule = AttentionMask(q, kv, mode=mode, backend="flex")
        kv = rule.kv
        dense = rule.dense()[:, 0]  # (B, Tq, Tk) the rule, pair by pair
        mask_mod = rule.block_mask().mask_mod
        mine = document_block_mask(q, kv, mode == "causal", mask_mod, block)
        ref = create_block_mask(
            mask_mod, q.shape[0], None, q.shape[1], kv.shape[1], BLOCK_SIZE=block
        )
        # Block level: the same full blocks; every block the rule touches is kept.
        full, kept = _block_sets(mine), _block_sets(ref)
        assert full[1] == kept[1]
        assert full[0] | full[1] >= kept[0] | kept[1]
        # Every full block is all allowed, every dropped block all forbidden.
        for b, i, j in full[1]:
            assert dense[b, i * block : (i + 1) * block, j * block : (j + 1) * block].all()
        nq, nk = -(-q.shape[1] // block), -(-kv.shape[1] // block)
        for b in range(q.shape[0]):
            for i in range(nq):
                for j in range(nk):
                    if (b, i, j) not in full[0] | full[1]:
                        assert not dense[
                            b, i * block : (i + 1) * block, j * block : (j + 1) * block
                        ].any()


def _block_sets(mask) -> tuple[set, set]:
    """``(partial, full)`` block pairs ``(b, i, j)`` of a BlockMask."""
    out = []
    for count, indices in (
        (mask.kv_num_blocks, mask.kv_indices),
        (mask.full_kv_num_blocks, mask.full_kv_indices),
    ):
        pairs = set()
        for b in range(count.shape[0]):
            for i in range(count.shape[2]):
                for j in indices[b, 0, i, : int(count[b, 0, i])].tolist():
                    pairs.add((b, i, j))
        out.append(pairs)
    return out[0], out[1]


def test_flex_with_the_range_block_mask_equals_sdpa():
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from multitoken.models.attention import AttentionMask

    q_layout, kv_layout = _sharded_layouts(320)  # several 128-blocks, a ragged tail
    gen = torch.Generator().manual_seed(0)
    b, tq, tk = q_layout.shape[0], q_layout.shape[1], kv_layout.shape[1]
    q = torch.randn(b, 2, tq, 16, generator=gen)
    k, v = torch.randn(b, 1, tk, 16, generator=gen), torch.randn(b, 1, tk, 16, generator=gen)
    for mode in ("document", "causal"):
        expected = AttentionMask(q_layout, kv_layout, mode, "sdpa").attend(q, k, v)
        mask = AttentionMask(q_layout, kv_layout, mode, "flex").block_mask()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _largest_allocation(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Largest.peak = max(Largest.peak, t.numel() * t.element_size())
            return out

    with Largest():
        fn()
    return Largest.peak


def test_the_block_mask_never_allocates_per_pair():
    from torch.nn.attention.flex_attention import create_block_mask

    from multitoken.models.attention import AttentionMask

    layout = _packed_layout(2, 2048)
    pairs = 2 * 2048 * 2048
    rule = AttentionMask(layout, backend="flex")
    ours = _largest_allocation(rule.block_mask)
    mask_mod = rule.block_mask().mask_mod
    dense = _largest_allocation(lambda: create_block_mask(mask_mod, 2, None, 2048, 2048))
    assert dense >= pairs  # the dense path: at least one byte per (query, key) pair
    assert ours * 100 < pairs  # ranges: B * T values and a block table


# ---------------------------------------------------------------- 8: host syncs of a step

# Ops that make the host wait for a GPU: a value read back, or an output whose size depends
# on the values (the host must learn it).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select", "item"}


class _SyncCounter:
    """Counts host syncs while active, except inside the host's preparation of a batch and
    reads of host scalars (``ignore``: AdamW's step counts, CPU tensors even on a GPU)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.calls: list[str] = []
        self.paused = False
        self.ignore: set[int] = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                host_scalar = name == "_local_scalar_dense" and id(args[0]) in counter.ignore
                if (
                    not counter.paused
                    and not host_scalar
                    and (
                        name in SYNC_OPS
                        or (name == "repeat_interleave" and "output_size" not in (kwargs or {}))
                    )
                ):
                    counter.calls.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def host(self, fn):
        def run(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False

        return run


def _trainer(counter, overrides):
    from multitoken import SequenceLayout, next_token_labels
    from multitoken.train import trainer as trainer_module
    from multitoken.train.batching import BatchFeed
    from multitoken.train.guard import NonFiniteGuard
    from multitoken.train.model import build_model
    from multitoken.train.optim import build_optimizer, build_scheduler

    cfg = load_config(None, ["model.dim=32", "model.n_layers=1", "train.steps=9", *overrides])
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)
    trainer.cfg, trainer.dims, trainer.device = cfg, cfg.parallel.dims, torch.device("cpu")
    trainer.model, trainer.cross_entropy = build_model(cfg, 64, 0, trainer.dims, trainer.device)
    trainer.optimizer = build_optimizer(trainer.model, cfg)
    trainer.scheduler = build_scheduler(trainer.optimizer, cfg)
    trainer.guard = NonFiniteGuard(5, None, trainer.device, False)
    trainer.autocast = False
    trainer.pipeline = None

    class Loader:  # the loader's interface (it runs on the host)
        gen, step = torch.Generator().manual_seed(0), 0

        def __next__(self):
            self.step += 1
            layout = SequenceLayout.from_lengths([[5, 11], [16]])
            ids = torch.randint(1, 64, (2, 16), generator=self.gen)
            labels = next_token_labels(ids, layout)
            return {"input_ids": ids, "labels": labels, "cu_seqlens": layout.cu_seqlens()}

        def state_dict(self):
            return {"step": self.step}

    trainer.feed = BatchFeed(Loader(), trainer.prepare)
    trainer.feed.prefetch = counter.host(trainer.feed.prefetch)  # the host's part
    return trainer


@pytest.mark.parametrize("checks", [False, True])
def test_host_syncs_of_a_training_step(monkeypatch, checks):
    """With train.check_inputs=false a step reads one thing back from the device: the guard's
    two flags (apply the update? stop?), which the host needs to decide what to run next."""
    from multitoken.errors import validation

    counter = _SyncCounter()
    # cp = 1 here (one process): the CP plan runs on the host like the rest of the preparation,
    # see test_a_cp_batch_is_cut_on_the_host.
    trainer = _trainer(counter, [f"train.check_inputs={str(checks).lower()}", "parallel.cp=1"])
    with validation(checks):
        trainer.train_step(1, 0.3, False)  # AdamW makes its state
        counter.ignore = {id(s["step"]) for s in trainer.optimizer.state.values()}
        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            if not counter.paused:
                counter.calls.append("tolist")
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        with counter.mode:
            trainer.train_step(2, 0.3, False)
    if checks:  # the value checks read values back (ids and targets in range)
        assert "_local_scalar_dense" in counter.calls
    else:
        assert counter.calls == ["tolist"]


def test_a_cp_batch_is_cut_on_the_host_and_copied_once(monkeypatch):
    """The CP plan reads its own sizes (nonzero, repeat_interleave, max): on the host they cost
    nothing, so the batch is cut there and only the result goes to the device."""
    from multitoken import SequenceLayout, next_token_labels
    from multitoken.train import batching

    seen = []
    shard_batch = batching.shard_batch

    def record(ids, *args, **kwargs):
        seen.append(ids.device.type)
        return shard_batch(ids, *args, **kwargs)

    monkeypatch.setattr(batching, "shard_batch", record)
    layout = SequenceLayout.from_lengths([[5, 11], [16]])
    ids = torch.randint(1, 64, (2, 16))
    global_batch = {
        "input_ids": ids,
        "labels": next_token_labels(ids, layout),
        "cu_seqlens": layout.cu_seqlens(),
    }
    dims = SimpleNamespace(
        pp=1, dp=1, dp_rank=0, cp=2, cp_rank=1, tp=1, token_group=None, cp_group=None
    )
    batch = batching.rank_batch(global_batch, dims, 2, 0, torch.device("meta"))
    assert seen == ["cpu"]  # cut on the host ...
    tensors = [batch.input_ids, batch.mtp_input_ids, batch.depth_labels, batch.normalizer]
    tensors += [batch.layout.doc_ids, batch.kv_layout.positions]
    assert {t.device.type for t in tensors} == {"meta"}  # ... then copied to the device


# ---------------------------------------------------------------- 4: the preflight's count


def test_the_preflight_counts_what_the_chosen_attention_allocates(monkeypatch):
    from multitoken.models import attention
    from multitoken.train.preflight import check_memory, memory_estimate

    # 32 heads at 32k tokens, cp 1: fp32 scores would be 128 GiB per sequence.
    cfg = load_config(
        None,
        [
            "model.dim=4096", "model.n_heads=32", "model.n_kv_heads=8", "model.n_layers=2",
            "model.max_seq_len=32768", "data.seq_len=32768", "data.batch_size=1",
            "parallel.cp=1", "data.vocab_size=32000",
        ],
    )  # fmt: skip
    key = "attention scores of one layer"
    t = 32768
    assert memory_estimate(cfg, "cpu")[key] == 32 * t * t * 4  # SDPA's math kernel
    assert memory_estimate(cfg, "cuda", "flex")[key] == 32 * t * 4  # the log-sum-exp only
    assert memory_estimate(cfg, "cuda", "sdpa")[key] == t * t  # the boolean mask
    # The backend it would choose: Flex where it compiles, for heads of 128.
    monkeypatch.setattr(attention, "flex_unavailable", lambda *a: None)
    assert memory_estimate(cfg, "cuda")[key] == 32 * t * 4
    check_memory(cfg, 80 << 30, "cuda")  # fits an 80 GiB GPU: not refused
    with pytest.raises(ConfigError, match="attention scores of one layer: 128.0 GiB"):
        check_memory(cfg, 80 << 30, "cpu")


# ---------------------------------------------------------------- 6: loss chunks by device


def test_loss_chunks_are_sized_for_the_device(monkeypatch):
    from multitoken import loss
    from multitoken.loss import chunk_elements_for, chunk_rows, linear_cross_entropy

    assert chunk_elements_for(torch.device("cpu")) == 1 << 23  # as before on the CPU
    assert chunk_elements_for(torch.device("cuda")) == 1 << 26
    assert chunk_elements_for(torch.device("cuda"), 1000) == 1000  # an explicit size wins
    assert chunk_rows(128_000, 1 << 26) == 524  # tokens per chunk at a 128k vocabulary
    assert MTPConfig().loss_chunk_elements == 0  # by device
    with pytest.raises(ConfigError, match="loss_chunk_elements"):
        MTPConfig(loss_chunk_elements=-1)
    seen = []
    apply = loss._LinearCrossEntropy.apply
    monkeypatch.setattr(
        loss._LinearCrossEntropy, "apply", lambda *a: seen.append(a[4]) or apply(*a)
    )
    h, w, t = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, -100, 3, 4, 5])
    linear_cross_entropy(h, w, t)
    linear_cross_entropy(h, w, t, chunk_elements=20)
    assert seen == [1 << 23, 20]


# ---------------------------------------------------------------- 9: HF models and FSDP2


@pytest.mark.parametrize(
    "device, token_world, meta",
    [("cuda", 2, True), ("cuda", 1, False), ("cpu", 2, True), ("cpu", 1, False)],
)
def test_a_sharded_hf_model_is_built_on_meta_and_materialised_after_fsdp2(
    monkeypatch, device, token_world, meta
):
    """Sharded by FSDP2 (on any device), the HF model is built on the meta device, made
    parallel, then materialised shard by shard where it trains; unsharded, it is built there
    (tests/unit/test_hf_meta_build.py checks what the meta build gives)."""
    import multitoken.hf.parallelize as hf_parallelize
    import multitoken.train.hf as train_hf
    from multitoken.train.model import build_model

    cfg = load_config(None, [])
    cfg.model.hf = "some/folder"
    calls, precision = [], []
    model = object()

    def build(c, p, d, *, meta=False):
        calls.append(("build", d, meta))
        return model

    monkeypatch.setattr(train_hf, "build_hf_model", build)
    monkeypatch.setattr(
        train_hf, "materialize_hf_model", lambda m, c, d: calls.append(("materialize", m, d))
    )
    monkeypatch.setattr(
        hf_parallelize,
        "parallelize_hf",
        lambda m, dims, **kw: (
            calls.append(("parallelize", m, kw["device_type"]))
            or precision.append(kw["mixed_precision"])
            or "ce"
        ),
    )
    dims = SimpleNamespace(token_world_size=token_world, is_main=True)
    where = torch.device(device)
    assert build_model(cfg, 64, 0, dims, where) == (model, "ce")
    expected = [("build", where, meta), ("parallelize", model, device)]
    assert calls == expected + ([("materialize", model, where)] if meta else [])
    assert precision == [torch.bfloat16 if device == "cuda" else None]


# ---------------------------------------------------------------- 10: decoding on a GPU


def test_generate_takes_a_device_and_cuda_decoding_is_graph_captured(monkeypatch):
    from multitoken.cli import build_parser, generate_device
    from multitoken.decoding.static import compile_mode
    from multitoken.errors import InputError

    parser = build_parser()
    assert parser.parse_args(["generate"]).device is None
    assert parser.parse_args(["generate", "--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--device", "tpu"])
    _fake_gpus(monkeypatch, 1)
    assert generate_device(None) == torch.device("cuda")  # the default where there is one
    assert generate_device("cpu") == torch.device("cpu")
    _fake_gpus(monkeypatch, 0)
    assert generate_device(None) == torch.device("cpu")
    with pytest.raises(InputError, match="--device cuda but CUDA is not available"):
        generate_device("cuda")
    assert compile_mode("cuda") == "reduce-overhead"  # CUDA graphs
    assert compile_mode("cpu") is None


def test_generate_decodes_on_the_device_it_is_given(monkeypatch, capsys):
    from multitoken import cli

    model = MTPModel.from_config(GPTConfig.preset("tiny", vocab_size=64), MTPConfig()).eval()
    moved = []
    to = MTPModel.to

    def record(self, device):
        moved.append(torch.device(device))
        return to(self, device)

    class Tokenizer:
        eos_id = 0

        def encode(self, text):
            return [1, 2, 3]

        def decode(self, ids):
            return " ".join(map(str, ids))

    monkeypatch.setattr(MTPModel, "to", record)
    monkeypatch.setattr(cli, "load_for_inference", lambda run: (model, Tokenizer()))
    args = ["generate", "--device", "cpu", "--max-new-tokens", "2", "--json"]
    assert cli.main(args) == 0
    assert moved == [torch.device("cpu")]
