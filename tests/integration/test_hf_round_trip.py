"""The round trip a user does, through the command line's main() (in process): train the
reference GPT, export it, train MTP heads only on the export (model.hf), decode speculatively;
and bad HF input."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers  # noqa: F401  (make setup installs the [hf] extra; fail loudly without it)
from tests.helpers.cli import cli_ok
from transformers import AutoModelForCausalLM

from multitoken.cli import main

TINY = [
    "mtp.num_depths=2",
    "data.max_files=24",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.val_fraction=0.1",
    "data.align=4",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.save_every=0",
    "parallel.cp=1",
]
GPT = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
       "model.max_seq_len=128", "data.vocab_size=400"]  # fmt: skip


cli = cli_ok


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cwd = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(cwd)


@pytest.fixture(scope="module")
def exported(workdir):
    cli("train", *TINY, *GPT, f"run.dir={workdir}", "run.name=ref")
    cli("export", str(workdir / "out"), "--run", str(workdir / "ref"))
    return workdir / "out"


@pytest.fixture(scope="module")
def heads_run(workdir, exported):
    cli(
        "train", *TINY, f"model.hf={exported}", "mtp.freeze_base=true", "mtp.targets=base",
        f"run.dir={workdir}", "run.name=heads",
    )  # fmt: skip
    return workdir / "heads"


def test_export_loads_in_transformers_with_mtp_weights(exported):
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "LlamaForCausalLM"
    config = json.loads((exported / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2


def test_heads_only_run_changes_only_the_heads(exported, heads_run):
    from multitoken.train.checkpoint import latest_checkpoint, load_for_inference

    metadata = torch.distributed.checkpoint.FileSystemReader(
        str(latest_checkpoint(heads_run))
    ).read_metadata()
    model_keys = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(k.startswith("model.mtp.") for k in model_keys)
    # (That the backbone stays bit-identical while the heads train is checked in memory by
    # test_hf_heads_only.py; load_for_inference rebuilds the backbone from `exported` anyway.)
    model, _ = load_for_inference(heads_run)
    assert model.num_depths == 2
    records = [json.loads(line) for line in (heads_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records[-1]["loss_mtp"]) == 2


def test_speculative_generation_on_the_hf_run_equals_greedy(heads_run):
    common = ["generate", "--run", str(heads_run), "--prompt", "def ", "--max-new-tokens", "24"]
    plain = json.loads(cli(*common, "--json").strip().splitlines()[-1])
    spec = json.loads(cli(*common, "--json", "--speculative").strip().splitlines()[-1])
    assert spec["token_ids"] == plain["token_ids"]
    assert len(spec["acceptance"]) == 2 and spec["forwards"] <= plain["forwards"]


@pytest.mark.parametrize(
    "setup,match",
    [
        ("not_hf", "is not a Hugging Face model folder"),
        ("gpt2", "does not support: supported model types are llama"),
        ("vocab", "has shape [400, 32] but config.json gives [300, 32]"),  # weights disagree
        ("other_format", "the checkpoint mixes MTP formats ['qwen3_next', 'mimo']"),
    ],
)
def test_bad_hf_input_is_one_error_line_and_writes_nothing(workdir, exported, setup, match, capsys):
    import shutil

    folder = workdir / f"bad_{setup}"
    if setup == "not_hf":
        folder.mkdir()
    elif setup == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97)).save_pretrained(
            folder
        )
    else:
        shutil.copytree(exported, folder)
        config = json.loads((folder / "config.json").read_text())
        if setup == "vocab":
            config["vocab_size"] = 300  # the tokenizer has 400
        else:
            from safetensors.torch import load_file, save_file

            tensors = load_file(folder / "model.safetensors")
            renamed = {}
            for key, value in tensors.items():
                if key.startswith("model.mtp_layers.0.token_layernorm"):
                    key = "mtp.pre_fc_norm_embedding.weight"
                renamed[key] = value
            save_file(renamed, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
    code = main(
        ["train", *TINY, f"model.hf={folder}", f"run.dir={workdir}", f"run.name=run_{setup}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and match in err[-1], err
    assert not (workdir / f"run_{setup}").exists()  # nothing written
