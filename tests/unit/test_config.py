from pathlib import Path

import pytest
import torch

from multitoken import MTPConfig
from multitoken.models import GPTConfig
from multitoken.mtp import DepthLosses
from multitoken.parallel import MetricSums
from multitoken.train.config import ConfigError, TrainConfig
from multitoken.train.config_io import (
    config_help,
    fixed_keys,
    load_config,
    load_saved_config,
    to_toml,
)
from multitoken.train.optim import lr_lambda
from multitoken.train.run_dir import (
    check_resume_config,
    check_run_dir,
    clear_run_dir,
    is_run_folder,
)


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\ndim = 96\nn_heads = 4\n[run]\nname = "x"\n[mtp]\ndepth = 3\n')
    cfg = load_config(str(path), ["model.dim=64", "train.resume=true", "mtp.loss_weight=0.1"])
    assert cfg.model.dim == 64 and cfg.mtp.num_depths == 3 and cfg.run.name == "x"
    assert cfg.train.resume is True and cfg.mtp.loss_weight == 0.1
    assert str(cfg.run_dir) == "runs/x"


def test_toml_round_trip(tmp_path):
    cfg = load_config(None, ["run.name=a b", "data.path=/tmp/x", "parallel.cp=1"])
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_config(str(tmp_path / "c.toml")) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dimm=3"], "unknown config key 'model.dimm'; did you mean model.dim"),
        (["optim.lr=3"], "unknown config key 'optim.lr'"),
        (["train.steps=ten"], "train.steps must be int, got 'ten'"),
        (["train.resume=maybe"], 'train.resume must be true, false or "auto"'),
        (["train.lr=fast"], "train.lr must be float"),
        (["model.dim"], "must look like section.key=value"),
        (["data.seq_len=250", "parallel.cp=2"], "data.seq_len=250 is not compatible with"),
        (["data.batch_size=3", "parallel.dp=2"], "cannot be split over parallel.dp=2"),
        (["data.align=6", "parallel.cp=2"], "which data.align=6 does not divide: set data.align=4"),
        (["mtp.targets=base", "parallel.tp=2"], "mtp.targets=base takes the decoder's greedy"),
        (["features.mode=offline", "parallel.cp=1"], "features.mode=offline reads a frozen"),
        (["features.dtype=half"], "features.dtype must be"),
        (["mtp.loss=js"], "mtp.loss must be one of"),
        (
            ["data.seq_len=24", "parallel.cp=4", "parallel.tp=4", "model.n_kv_heads=4"],
            "splits the 6 positions .* parallel.tp=4 .* multiple of cp \\* tp = 16",
        ),
        (
            ["parallel.tp=2", "data.vocab_size=401", "model.n_kv_heads=2"],
            "401 rows are not divisible by parallel.tp=2.*set data.vocab_size=402",
        ),
        (["parallel.cp=8"], "parallel.cp=8 cuts .* 16 stripes, .*: set data.align=16"),
        (["parallel.halo_fill=ring"], 'parallel.halo_fill must be "sharding" or "exchange"'),
        (["parallel.dp_replicate=0"], "parallel.dp_replicate must be >= 1"),
        (
            ["parallel.dp=4", "parallel.dp_replicate=3"],
            "parallel.dp_replicate must divide parallel.dp=4 .*choose among 1, 2, 4",
        ),
        (["data.seq_len=2048"], "exceeds model.max_seq_len"),
        # Values that used to get past validation and crash (a traceback) or mislead later.
        (["train.log_every=0"], "train.log_every must be >= 1"),
        (["model.n_heads=0"], "model.n_heads must be >= 1"),
        (["model.n_layers=0"], "model.n_layers must be >= 1"),
        (["model.dim=0"], "model.dim must be >= 2"),
        (["model.n_kv_heads=-1"], "model.n_kv_heads must be >= 0"),
        (["model.ffn_dim=-5"], "model.ffn_dim must be >= 0"),
        (["model.rope_theta=0"], "model.rope_theta must be > 0"),
        (["mtp.loss_weight=-1"], "mtp.loss_weight must be >= 0"),
        (["train.lr=0"], "train.lr must be a finite number > 0"),
        (["train.min_lr=-1"], "train.min_lr must be >= 0"),
        (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
        (["train.stop_after=-1"], "train.stop_after must be >= 0"),
        (["train.eval_batches=0"], "train.eval_batches must be >= 1"),
        (["train.beta1=2"], "train.beta1 must be in \\[0, 1\\)"),
        # Accepted silently before the restructure.
        (["train.weight_decay=-1"], "train.weight_decay must be >= 0"),
        (["train.min_lr=1", "train.lr=0.1"], "train.min_lr must be <= train.lr=0.1"),
        (["train.lr=inf"], "train.lr must be a finite number > 0"),
        (["mtp.loss_weight=inf"], "mtp.loss_weight must be a finite number"),
        (["model.init_std=-1"], "model.init_std must be > 0"),
        (
            ["mtp.num_depths=8", "data.seq_len=8", "parallel.cp=1"],
            "mtp.num_depths=8 leaves no target",
        ),
        (["run.name=a\nb"], "run.name must not contain control characters"),
        (["model.n_heads=3"], "model.n_heads must split dim=128 into heads of an even size"),
        (["train.grad_clip=-1"], "train.grad_clip must be >= 0"),
        (["data.max_files=-3"], "data.max_files must be >= 0"),
        (["data.tokenizer_sample_mb=0"], "data.tokenizer_sample_mb must be >= 1"),
        (["data.workers=-1"], "data.workers must be >= 0"),
        (["data.verify=md5"], 'data.verify must be "size" or "full"'),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_toml_type_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsteps = "10"\n')
    with pytest.raises(ConfigError, match="train.steps must be int, got '10'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_help_documents_every_field():
    text = config_help()
    for key in (
        "model.dim",
        "mtp.num_depths",
        "mtp.loss_weight",
        "data.path",
        "train.steps",
        "train.log_every",
        "train.save_every",
        "train.resume",
        "train.seed",
        "parallel.cp",
        "parallel.dp",
        "parallel.dp_replicate",
        "run.name",
    ):
        line = next(line for line in text.splitlines() if line.strip().startswith(key + "="))
        assert len(line.split(": ", 1)[1]) > 5, line


def test_schedules():
    cfg = load_config(
        None,
        [
            "train.steps=100",
            "train.warmup_steps=10",
            "train.lr=1e-3",
            "train.min_lr=1e-4",
            "mtp.loss_weight_final=0.1",
        ],
    )
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1) and 0.1 < f(50) < 1.0
    assert cfg.mtp.weight_at(70, 100) == 0.3 and cfg.mtp.weight_at(71, 100) == 0.1


def test_the_model_config_is_nested_not_mirrored():
    # One dataclass per concept: the training config holds the library's own configs.
    cfg = load_config(None, ["model.dim=64", "mtp.num_depths=3"])
    assert type(cfg.model) is GPTConfig and type(cfg.mtp) is MTPConfig
    model = cfg.model_config(vocab_size=512)
    assert model.vocab_size == 512 and model.dim == 64 and model.ffn_hidden % 64 == 0
    assert cfg.model.vocab_size == 0  # the config is not mutated
    with pytest.raises(ConfigError, match="model.vocab_size is 300 but the tokenizer has 512"):
        load_config(None, ["model.vocab_size=300"]).model_config(512)
    # The same check whether the library or the CLI builds the config.
    with pytest.raises(ConfigError, match="n_heads must be >= 1, got 0"):
        GPTConfig(n_heads=0)
    with pytest.raises(ConfigError, match="num_depths must be an int >= 0"):
        MTPConfig(num_depths=-1)


def test_the_batches_do_not_depend_on_cp():
    # One data stream: every layout with the same global batch packs the same rows.
    from multitoken.train.config import alignment

    aligns = {alignment(load_config(None, [f"parallel.cp={cp}"])) for cp in (1, 2, 4)}
    assert aligns == {8}


def test_fixed_keys_come_from_the_dataclasses():
    keys = fixed_keys(TrainConfig())
    assert {
        "model.dim",
        "model.n_layers",
        "mtp.num_depths",
        "mtp.hidden_first",
        "data.path",
    } <= set(keys)
    assert not {"model.recompute", "model.backend", "mtp.loss_weight", "train.steps"} & set(keys)


def test_shipped_configs_parse():
    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        cfg = load_config(str(path))
        assert cfg.run.name == path.stem


def test_run_dir_protection(tmp_path):
    check_run_dir(tmp_path / "new", resume=False, overwrite=False)  # nothing there: fine
    (tmp_path / "config.toml").write_text(to_toml(TrainConfig()))
    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run: continue it with train.resume"):
        check_run_dir(tmp_path, resume=False, overwrite=False)
    check_run_dir(tmp_path, resume=True, overwrite=False)
    check_run_dir(tmp_path, resume=False, overwrite=True)
    clear_run_dir(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_resume_refuses_a_changed_model(tmp_path):
    # Resuming with other model settings failed inside the checkpoint load (a traceback) after
    # config.toml had been overwritten, or, with fewer MTP depths, silently dropped weights.
    saved = load_config(None, ["model.dim=64", "mtp.num_depths=2"])
    (tmp_path / "config.toml").write_text(to_toml(saved))
    check_resume_config(tmp_path, load_config(None, ["model.dim=64", "mtp.num_depths=2"]))
    # Schedule, logging and recompute settings may change on resume.
    check_resume_config(
        tmp_path,
        load_config(
            None, ["model.dim=64", "mtp.num_depths=2", "train.steps=500", "model.recompute=1"]
        ),
    )
    with pytest.raises(ConfigError, match="model.dim=32, .*was trained with model.dim=64"):
        check_resume_config(tmp_path, load_config(None, ["model.dim=32", "mtp.num_depths=2"]))
    with pytest.raises(ConfigError, match="mtp.num_depths=1, .*was trained with mtp.num_depths=2"):
        check_resume_config(tmp_path, load_config(None, ["model.dim=64", "mtp.num_depths=1"]))
    check_resume_config(tmp_path / "elsewhere", saved)  # no saved config: nothing to compare


def test_metric_sums_are_reduced_on_the_training_device(monkeypatch):
    # An NCCL group reduces only CUDA tensors: the metric sums must stay on the device of the
    # model's outputs (here "meta" stands in for cuda) and be all-reduced there.
    class Reduced(Exception):
        pass

    def all_reduce(tensor, group=None):
        raise Reduced(tensor.device)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    device = torch.device("meta")
    meter = MetricSums(1, device)
    ones = torch.ones(2, dtype=torch.long, device=device)
    out = DepthLosses(torch.ones((), device=device), ones.float(), ones, ones, ones.float())
    meter.add(out)
    with pytest.raises(Reduced) as reduced:
        meter.reduce(group=object())
    assert reduced.value.args[0] == device


def test_a_saved_run_is_read_whatever_its_layout(tmp_path):
    """A run saved at a layout that a later check refuses (here tp 4 x cp 4 with 6 positions
    per CP rank, which sequence parallelism cannot split) still reads for resume and decoding,
    which may use any layout: its layout is reset to one process."""
    layout = ["data.seq_len=24", "parallel.cp=4", "parallel.tp=4", "model.n_kv_heads=4"]
    saved = load_config(None, [*layout, "parallel.sequence_parallel=false"])
    text = to_toml(saved).replace("sequence_parallel = false\n", "")  # an older run's file
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match="splits the 6 positions"):
        load_config(str(tmp_path / "config.toml"))
    cfg = load_saved_config(tmp_path / "config.toml")
    assert (cfg.parallel.world, cfg.data.seq_len, cfg.model.n_kv_heads) == (1, 24, 4)
    assert is_run_folder(tmp_path)


def test_the_memory_estimate_divides_what_tensor_parallelism_splits():
    """A lower bound under TP too: heads, feed-forward and (SP) activations split over tp."""
    from multitoken.train.preflight import memory_estimate

    heads = ["parallel.cp=1", "model.n_heads=2", "model.n_kv_heads=2"]
    one = memory_estimate(load_config(None, heads))
    two = memory_estimate(load_config(None, [*heads, "parallel.tp=2"]))
    for key in ("attention scores of one layer", "activations", "model and optimiser state"):
        assert two[key] == one[key] // 2, key


def test_a_renamed_key_still_works_for_one_version_with_one_line(capsys):
    cfg = load_config(None, ["parallel.lookahead=exchange"])
    assert cfg.parallel.halo_fill == "exchange"
    assert load_config(None, ["parallel.lookahead=halo"]).parallel.halo_fill == "sharding"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: parallel.lookahead is deprecated") and len(err) == 2
    assert "use parallel.halo_fill" in err[0]


def test_mtp_depth_is_read_as_num_depths_for_one_version(capsys):
    assert load_config(None, ["mtp.depth=3"]).mtp.num_depths == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: mtp.depth is deprecated") and "use mtp.num_depths" in line
