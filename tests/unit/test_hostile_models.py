"""Hostile Hugging Face model folders (issue 21): every one is refused by the folder's gate
(:func:`multitoken.hf.folder.check_model_folder`) with one ``error:`` line and exit 2, before
anything is written; no folder's code runs, whatever a prompt would be answered.

Each case runs ``multitoken train model.hf=...`` (or ``generate --run``) through ``main()`` in
this process, on a tiny model from :func:`multitoken.testing.tiny_hf.save_tiny` with a small
byte-level BPE beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file
from tests.helpers.cli import HF_TINY_RUN
from tokenizers import models, pre_tokenizers, trainers

from multitoken.cli import main
from multitoken.testing.tiny_hf import save_tiny

TINY = HF_TINY_RUN
EVIL = """from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import {base}
class {name}({base}):
    model_type = "llama"
"""


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_refused(code: int, err: str, message: str, run: Path) -> None:
    """One ``error:`` line naming ``message``, exit 2, no traceback, no run folder."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert not run.exists(), sorted(p.name for p in run.iterdir())


def make_folder(folder: Path) -> Path:
    """A tiny Llama with a fast tokenizer (vocabulary 300) that ``model.hf`` trains on."""
    save_tiny("llama", folder, vocab_size=300, max_position_embeddings=128)
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        [f"def f{i}(x):\n    return x + {i}\n" for i in range(200)], trainer
    )
    backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_models")
    make_folder(root / "good")
    return root


@pytest.fixture
def folder(root, request):
    """A fresh copy of the good folder for one test to damage."""
    path = root / f"m_{request.node.name}".replace("[", "_").replace("]", "")
    shutil.copytree(root / "good", path)
    return path


@pytest.fixture
def answer_yes(monkeypatch):
    """Any "Do you wish to run the custom code? [y/N]" is answered yes (and counted)."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a, **k: asked.append(a) or "y")
    return asked


def train(root: Path, folder: Path, name: str, *extra: str) -> tuple[int, str, str]:
    return cli(
        "train", *TINY, f"model.hf={folder}", f"run.dir={root / 'runs'}", f"run.name={name}",
        f"data.cache_dir={root / 'cache'}", *extra,
    )  # fmt: skip


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_custom_tokenizer_code_never_runs_nor_prompts(root, folder, answer_yes):
    marker = root / "ran_tokenizer"
    code = EVIL.format(marker=str(marker), base="PreTrainedTokenizerFast", name="EvilTokenizer")
    (folder / "tokenization_evil.py").write_text(code)
    auto_map = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer", auto_map=auto_map)
    code, _, err = train(root, folder, "evil_tokenizer")
    assert not marker.exists() and not answer_yes
    assert_refused(code, err, "names custom code (auto_map", root / "runs" / "evil_tokenizer")


def test_custom_config_code_is_refused(root, folder, answer_yes):
    marker = root / "ran_config"
    code = EVIL.format(marker=str(marker), base="LlamaConfig", name="EvilConfig")
    (folder / "configuration_evil.py").write_text(code)
    _edit_json(folder / "config.json", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    code, _, err = train(root, folder, "evil_config")
    assert not marker.exists() and not answer_yes
    assert_refused(code, err, "config.json names custom code", root / "runs" / "evil_config")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"vocab_size": 1 << 40}, "vocab_size=1099511627776 is not an integer in [1, 16777216]"),
        ({"hidden_size": 1 << 40}, "hidden_size=1099511627776 is not an integer"),
        ({"num_hidden_layers": 1 << 30}, "num_hidden_layers=1073741824 is not an integer"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers='2' is not an integer"),
        ({"hidden_size": ...}, "lacks 'hidden_size'"),
        ({"num_attention_heads": 3}, "num_attention_heads=3 is not a multiple"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' is not true or false"),
        ({"rms_norm_eps": -1}, "rms_norm_eps=-1 is not a number in (0, 1)"),
        ({"hidden_act": "no_such_activation"}, "hidden_act='no_such_activation' is not an"),
        ({"intermediate_size": 96}, "has shape [64, 32] but config.json gives [96, 32]"),
        ({"num_hidden_layers": 3}, "lacks the tensor 'model.layers.2.self_attn.q_proj.weight'"),
        ({"rope_parameters": {"rope_type": "nonsense"}}, "names rope_type 'nonsense'"),
    ],
    ids=["vocab", "width", "layers", "layers_str", "no_width", "heads", "tie", "eps", "act",
         "ffn_shape", "missing_layer", "rope"],
)  # fmt: skip
def test_bad_config_is_one_line_before_anything_is_written(root, folder, changes, message):
    _edit_json(folder / "config.json", **changes)
    name = f"config_{next(iter(changes))}"
    code, _, err = train(root, folder, name)
    assert_refused(code, err, message, root / "runs" / name)


def test_a_tokenizer_larger_than_the_model_is_one_line(root, tmp_path):
    """(test_hf_round_trip's case now fails the folder's shape check first: kept here.)"""
    folder = make_folder(tmp_path / "small")
    save_tiny("llama", folder, vocab_size=200, max_position_embeddings=128)
    code, _, err = train(root, folder, "small_vocab")
    assert_refused(code, err, "tokens but the model's vocabulary", root / "runs" / "small_vocab")


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return length, json.loads(raw[8 : 8 + length])


def _damage(folder: Path, how: str) -> None:
    weights = folder / "model.safetensors"
    if how == "header":
        raw = weights.read_bytes()
        weights.write_bytes(b"\xff" * 8 + raw[8:])
    elif how == "header_json":
        raw = bytearray(weights.read_bytes())
        raw[8:12] = b"\x00\x01\x02\x03"
        weights.write_bytes(bytes(raw))
    elif how == "truncated":
        raw = weights.read_bytes()
        weights.write_bytes(raw[:-100])
    elif how == "dtype":
        tensors = load_file(weights)
        tensors["model.norm.weight"] = torch.ones_like(
            tensors["model.norm.weight"], dtype=torch.int32
        )
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "offsets":  # a header whose tensors overlap: sizes agree, offsets lie
        length, header = _header(weights)
        raw = weights.read_bytes()
        name = next(k for k in header if k != "__metadata__")
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 4, end + 4]
        text = json.dumps(header).encode().ljust(length)
        weights.write_bytes(raw[:8] + text + raw[8 + length :])


@pytest.mark.parametrize(
    "how,message",
    [
        ("header", "is not a safetensors file (its header is damaged)"),
        ("header_json", "is not a safetensors file (its header is not a JSON object)"),
        ("truncated", "is truncated or damaged"),
        ("dtype", "tensor 'model.norm.weight' is I32; model weights must be one of"),
        ("offsets", "is truncated or damaged"),
    ],
)
def test_damaged_safetensors_are_one_line(root, folder, how, message):
    _damage(folder, how)
    code, _, err = train(root, folder, f"weights_{how}")
    assert_refused(code, err, message, root / "runs" / f"weights_{how}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "device_link"])
def test_a_weights_file_that_is_not_a_regular_file_is_refused_not_read(root, folder, kind):
    """A FIFO hung the run (safe_open blocks on it) with the run lock held."""
    target = folder / "extra.safetensors"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to("/dev/zero")
        target = folder / "model.safetensors"
    code, _, err = train(root, folder, f"special_{kind}")
    assert_refused(code, err, f"{target} (", root / "runs" / f"special_{kind}")
    assert "is not a regular file" in err


def test_a_shard_index_may_not_leave_the_folder(root, folder):
    """A ``weight_map`` naming ``../elsewhere/...`` was followed (and read) before."""
    elsewhere = root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(folder / "model.safetensors", elsewhere / "model.safetensors")
    keys = load_file(folder / "model.safetensors")
    weight_map = {key: "../elsewhere/model.safetensors" for key in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = train(root, folder, "index_outside")
    assert_refused(code, err, "which is not a file in", root / "runs" / "index_outside")


def _huge_sparse_folder(folder: Path) -> None:
    """A consistent Llama of ~2^38 parameters whose weights file is sparse (nothing on disk):
    every check of its files passes, and only the memory estimate can refuse it."""
    dim, vocab, ffn = 1 << 15, 1 << 22, 1 << 16
    _edit_json(
        folder / "config.json", hidden_size=dim, vocab_size=vocab, intermediate_size=ffn,
        num_hidden_layers=1, num_attention_heads=256, num_key_value_heads=256, head_dim=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    shapes = {
        "model.embed_tokens.weight": [vocab, dim],
        "model.norm.weight": [dim],
        "model.layers.0.input_layernorm.weight": [dim],
        "model.layers.0.post_attention_layernorm.weight": [dim],
        **{f"model.layers.0.self_attn.{p}_proj.weight": [dim, dim] for p in "qkvo"},
        "model.layers.0.mlp.gate_proj.weight": [ffn, dim],
        "model.layers.0.mlp.up_proj.weight": [ffn, dim],
        "model.layers.0.mlp.down_proj.weight": [dim, ffn],
    }
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    weights = folder / "model.safetensors"
    with weights.open("wb") as stream:
        stream.write(struct.pack("<Q", len(text)) + text)
        stream.truncate(8 + len(text) + offset)


def test_a_model_too_large_for_memory_is_refused_before_loading(root, folder):
    _huge_sparse_folder(folder)
    code, _, err = train(root, folder, "huge")
    assert_refused(code, err, "GiB per rank (model and optimiser state", root / "runs" / "huge")
    assert "config.json of model.hf" in err


@pytest.fixture(scope="module")
def hf_run(root):
    """A completed model.hf run on its own copy of the good folder."""
    folder = shutil.copytree(root / "good", root / "for_generate")
    code, out, err = train(root, folder, "hf_run")
    assert code == 0, err[-3000:]
    return root / "runs" / "hf_run", folder


def test_generate_on_a_run_whose_folder_gained_custom_code(root, hf_run, answer_yes):
    run, folder = hf_run
    code, out, _ = cli("generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("def ")
    marker = root / "ran_generate"
    source = EVIL.format(marker=str(marker), base="PreTrainedTokenizerFast", name="EvilTokenizer")
    (folder / "tokenization_evil.py").write_text(source)
    auto_map = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer", auto_map=auto_map)
    before = sorted(p.name for p in run.rglob("*"))
    code, _, err = cli("generate", "--run", str(run), "--prompt", "def ")
    assert not marker.exists() and not answer_yes
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert "names custom code (auto_map" in lines[0]
    assert sorted(p.name for p in run.rglob("*")) == before
