"""The released-heads round trip through the command line, on tiny DeepSeek-V3 and GLM-4.5
configs: a folder with its MTP layer in the released layout (``model.layers.{L}``), a heads-only
fine-tune (``multitoken train model.hf=... mtp.freeze_base=true``), ``multitoken export`` (with
no ``--format``: the model's own layout is the default), and the export read back equal to the
trained model. Qwen3-Next exports by default in its own layout too, the others in MiMo's."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # noqa: F401  (make setup installs the [hf] extra; fail loudly without it)
from tests.helpers.cli import cli_ok
from tests.helpers.released import save_released
from transformers import PreTrainedTokenizerFast

from multitoken import MTPConfig
from multitoken.cli import main
from multitoken.data import Document, train_tokenizer
from multitoken.hf.weights import load_hf_mtp_model, read_tensors
from multitoken.testing.tiny_hf import save_tiny

TRAIN = [
    "mtp.num_depths=1",
    "mtp.freeze_base=true",
    "data.max_files=24",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.val_fraction=0.1",
    "train.steps=3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.save_every=0",
    "parallel.cp=1",
]
VOCAB = 320  # the model's; the tokenizer's 300 fit in it
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."]


cli = cli_ok


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [Document(f"d{i}", t) for i, t in enumerate(TEXTS * 4)]
    tok = train_tokenizer(docs, 300, tmp_path_factory.mktemp("tok"), verbose=False)
    backend = tok.backend
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=backend.id_to_token(tok.pad_id),
        eos_token=backend.id_to_token(tok.eos_id),
        clean_up_tokenization_spaces=False,
    )


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_released_heads_fine_tuned_and_exported_in_their_layout(tmp_path, tokenizer, model_type):
    released = save_released(model_type, tmp_path / "released", num_layers=2, vocab_size=VOCAB)
    tokenizer.save_pretrained(released)
    original = read_tensors(released)
    cli("train", *TRAIN, f"model.hf={released}", f"run.dir={tmp_path}", "run.name=heads")
    printed = cli("export", str(tmp_path / "out"), "--run", str(tmp_path / "heads"))
    assert "1 MTP depth(s) in the deepseek format" in printed

    from multitoken.train.checkpoint import load_for_inference

    trained, _ = load_for_inference(tmp_path / "heads")
    again = load_hf_mtp_model(tmp_path / "out", MTPConfig(num_depths=1))
    ours, theirs = trained.state_dict(), again.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key

    exported = read_tensors(tmp_path / "out")
    assert set(exported) == set(original)  # the same layout: every key, no other
    mtp = [k for k in original if k.startswith("model.layers.2.")]
    changed = [k for k in mtp if not torch.equal(exported[k], original[k])]
    assert "model.layers.2.eh_proj.weight" in changed  # the heads trained ...
    assert any(".mlp.experts.0." in k for k in changed)  # ... the block's experts too
    for key in set(original) - set(mtp):
        assert torch.equal(exported[key], original[key]), key  # ... and the backbone did not
    bias = "model.layers.2.mlp.gate.e_score_correction_bias"
    assert torch.equal(exported[bias], original[bias])  # a buffer: no update rule
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == model_type and config["num_hidden_layers"] == 2
    assert config["num_nextn_predict_layers"] == 1


@pytest.mark.parametrize(
    "model_type,fmt,key,count",
    [
        ("qwen3_next", "qwen3_next", "mtp.fc.weight", "mtp_num_hidden_layers"),
        ("qwen3", "mimo", "model.mtp_layers.0.input_proj.weight", "num_nextn_predict_layers"),
        ("qwen3_moe", "mimo", "model.mtp_layers.0.input_proj.weight", "num_nextn_predict_layers"),
    ],
)
def test_export_defaults_to_the_models_own_layout_else_mimo(
    tmp_path, tokenizer, model_type, fmt, key, count
):
    folder = save_tiny(model_type, tmp_path / model_type, vocab_size=VOCAB)
    tokenizer.save_pretrained(folder)
    steps = [a for a in TRAIN if not a.startswith("train.steps")] + ["train.steps=1"]
    cli("train", *steps, f"model.hf={folder}", f"run.dir={tmp_path}", "run.name=heads")
    printed = cli("export", str(tmp_path / "out"), "--run", str(tmp_path / "heads"))
    assert f"1 MTP depth(s) in the {fmt} format" in printed
    exported = read_tensors(tmp_path / "out")
    assert key in exported
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == model_type and config[count] == 1

    from multitoken.train.checkpoint import load_for_inference

    trained, _ = load_for_inference(tmp_path / "heads")
    again = load_hf_mtp_model(tmp_path / "out", MTPConfig(num_depths=1))
    for name, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_qwen3_next_with_context_parallelism_is_one_error_before_anything_runs(
    tmp_path, tokenizer, capsys
):
    folder = save_tiny("qwen3_next", tmp_path / "qwen3_next", vocab_size=VOCAB)
    tokenizer.save_pretrained(folder)
    args = [*TRAIN, "parallel.cp=2", f"model.hf={folder}", f"run.dir={tmp_path}"]
    code = main(["train", *args, "run.name=cp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "recurrent state" in err[-1], err
    assert not (tmp_path / "cp").exists()
