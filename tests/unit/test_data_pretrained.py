"""An existing tokenizer (tokenizer.json or a Hugging Face model folder) instead of training one,
and prepare_data end to end on the new inputs."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from multitoken.data import DataError, Tokenizer
from multitoken.train.config_io import load_config
from multitoken.train.data import prepare_data

TEXTS = [f"document number {i} says hello to the world {i * i}\n" * (1 + i % 7) for i in range(80)]


def hf_style_backend(specials=("<s>", "</s>", "<unk>")):
    """A tokenizer shaped like a Llama/Mistral one: its own special tokens, no pad token."""
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer)
    return backend


def test_model_folder_with_config(tmp_path):
    backend = hf_style_backend()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": {"content": "</s>", "lstrip": False}, "bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.load(tmp_path)
    assert tokenizer.eos_id == backend.token_to_id("</s>")
    assert tokenizer.pad_id == tokenizer.eos_id  # no pad token: pad with the end token
    assert tokenizer.encode("hello") == backend.encode("hello", add_special_tokens=False).ids
    tokens, lengths = tokenizer.encode_documents(["hello", "world"], np.uint16)
    assert lengths.tolist() == [
        len(tokenizer.encode("hello")) + 1,
        len(tokenizer.encode("world")) + 1,
    ]
    assert tokens[lengths[0] - 1] == tokens[-1] == tokenizer.eos_id


def test_bare_tokenizer_json_detects_the_end_token_and_saves_it(tmp_path):
    backend = hf_style_backend(("<pad>", "<eos>", "<unk>"))
    backend.save(str(tmp_path / "tok.json"))
    tokenizer = Tokenizer.load(tmp_path / "tok.json")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<eos>", "<pad>")
    run = tmp_path / "run"
    run.mkdir()
    tokenizer.save(run / "tokenizer.json")  # what the trainer does with a run's tokenizer
    again = Tokenizer.load(run / "tokenizer.json")
    assert (again.eos_id, again.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)


def test_no_end_token_is_a_clear_error(tmp_path):
    hf_style_backend(("<unk>",)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-document token .*tokenizer_config.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "nothing")


def small_cfg(tmp_path, *overrides):
    return load_config(
        None,
        [
            "data.seq_len=64",
            "data.batch_size=2",
            "data.val_fraction=0.2",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.vocab_size=300",
            *overrides,
        ],
    )


def test_prepare_data_from_jsonl_with_an_existing_tokenizer(tmp_path, capsys):
    backend = hf_style_backend()
    model = tmp_path / "model"
    model.mkdir()
    backend.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS))
    cfg = small_cfg(
        tmp_path, f"data.path={corpus}", "data.text_field=content", f"data.tokenizer={model}"
    )
    data = prepare_data(cfg, verbose=True)
    assert data.tokenizer.eos_id == backend.token_to_id("</s>")
    assert "data: " in capsys.readouterr().out
    batch = next(data.train_loader)
    assert batch["input_ids"].shape == (2, 64)
    assert int(batch["input_ids"].max()) < data.tokenizer.vocab_size
    assert next(data.val_loader)["input_ids"].shape[1] == 64
    # A second preparation opens the same store (no new folder).
    prepare_data(cfg, verbose=False)
    assert len(list((tmp_path / "cache").glob("store-*[0-9a-f]"))) == 1


def test_prepare_data_reports_bad_input(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 7}) + "\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: 'text' is a int, not a string"):
        prepare_data(small_cfg(tmp_path, f"data.path={corpus}"), verbose=False)
