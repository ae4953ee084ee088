"""``model.hf=model.gguf`` (issue 18, item 1): a tiny Llama GGUF written here with the ``gguf``
package (F32 tensors, a byte-level BPE in its metadata) loads equal, every tensor and the
logits, to the same weights from safetensors; a heads-only run trains on it, ``generate`` and
``export`` read the run as for a folder; a damaged GGUF is one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import accelerate  # noqa: F401, E402  (make setup installs the [gguf] extra: fail, never skip)
import gguf  # noqa: E402
import pytest
import tokenizers  # noqa: E402
import torch
from tests.helpers.cli import HF_TINY_RUN
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

from multitoken import MTPConfig  # noqa: E402
from multitoken.cli import main  # noqa: E402
from multitoken.errors import ConfigError  # noqa: E402
from multitoken.hf.gguf import check_gguf_file, gguf_folder  # noqa: E402
from multitoken.hf.weights import load_hf_mtp_model, read_tensors  # noqa: E402
from multitoken.testing.tiny_hf import tiny_model  # noqa: E402

VOCAB = 300
# As SmolLM2's: <|endoftext|> begins and is the unknown token, <|im_end|> ends.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = HF_TINY_RUN
# HF Llama names -> llama.cpp's (convert_hf_to_gguf.py), per layer and global.
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def byte_level_bpe() -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        [f"def f{i}(x):\n    return x + {i}\n" for i in range(200)], trainer
    )
    return backend


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved), which transformers undoes."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _gguf_name(key: str) -> str:
    if key in GLOBAL_NAMES:
        return GLOBAL_NAMES[key]
    _, _, index, rest = key.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{index}.{LAYER_NAMES[module]}.{kind}"


def write_gguf(model, backend: tokenizers.Tokenizer, path: Path) -> Path:
    """``model`` (a transformers Llama) and ``backend`` as a llama.cpp-style GGUF."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    vocab = backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    state = json.loads(backend.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3 = CONTROL
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_unk_token_id(vocab["<|endoftext|>"])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for key, value in model.state_dict().items():
        value = value.detach().float()
        if key.endswith("q_proj.weight"):
            value = _permute(value, heads)
        elif key.endswith("k_proj.weight"):
            value = _permute(value, kv_heads)
        writer.add_tensor(_gguf_name(key), value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(root, gguf file, the same weights as a safetensors folder, the tokenizer)``."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=128)
    model.save_pretrained(root / "reference")
    backend = byte_level_bpe()
    return root, write_gguf(model, backend, root / "tiny.gguf"), root / "reference", backend


def test_gguf_loads_equal_to_the_same_weights_from_safetensors(files):
    root, path, reference, backend = files
    folder = gguf_folder(path, root / "cache")
    got, want = read_tensors(folder), read_tensors(reference)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    mtp = MTPConfig(num_depths=1)
    a, b = load_hf_mtp_model(folder, mtp), load_hf_mtp_model(reference, mtp)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.logits(ids), b.logits(ids))
    # The tokenizer from the file's metadata encodes as the one it was written from.
    from multitoken.train.hf import HFTokenizer

    tokenizer = HFTokenizer(folder, VOCAB)
    text = "def f7(x):\n    return x + 7\n  print('ok') \u00e9"
    assert tokenizer.encode(text) == backend.encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_id == backend.token_to_id("<|im_end|>")
    assert tokenizer.vocab_size == VOCAB
    # Found again by content: the second call builds nothing.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_folder(path, root / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_heads_only_run_on_a_gguf_then_generate_and_export(files):
    root, path, _, _ = files
    runs, cache = root / "runs", root / "cli_cache"
    code, out, err = cli(
        "train", *TINY, f"model.hf={path}", "mtp.freeze_base=true", f"run.dir={runs}",
        "run.name=heads", f"data.cache_dir={cache}",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert "final: train" in out
    assert (runs / "heads" / "checkpoints" / "latest").exists()
    code, out, err = cli("generate", "--run", str(runs / "heads"), "--prompt", "def ",
                         "--max-new-tokens", "8", "--draft-depth", "1")  # fmt: skip
    assert code == 0, err[-3000:]
    code, out, err = cli("export", str(root / "exported"), "--run", str(runs / "heads"))
    assert code == 0, err[-3000:]
    assert (root / "exported" / "model.safetensors").is_file()
    assert (root / "exported" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "is not a readable GGUF file (ValueError: cannot reshape"),
        ("garbage", "is not a GGUF file"),
        ("header", "is not a readable GGUF file"),
        ("architecture", "holds a 'gpt2"),
    ],
)
def test_a_damaged_gguf_is_one_error_line(files, damage, message):
    root, path, _, _ = files
    data = path.read_bytes()
    bad = root / f"bad_{damage}.gguf"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        bad.write_bytes(b"not a gguf file at all, just text" * 4)
    elif damage == "header":
        bad.write_bytes(data[:4] + b"\xff" * 60 + data[64:200])
    else:
        bad.write_bytes(data.replace(b"llama", b"gpt2\x00", 1))
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_gguf_file(bad)
    run = root / "runs" / f"bad_{damage}"
    code, _, err = cli("train", *TINY, f"model.hf={bad}", f"run.dir={root / 'runs'}",
                       f"run.name=bad_{damage}", f"data.cache_dir={root / 'cache'}")  # fmt: skip
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert not run.exists()
