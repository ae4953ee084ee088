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
    dims = SimpleNamespace(tp=1, cp=1, token_world_size=2, fsdp_mesh=None)
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
