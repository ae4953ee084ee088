"""Export of a multitoken model to an HF folder: transformers loads it, logits equal, the
tokenizer round-trips, the MTP weights come back through the adapter."""

import pytest
import torch
import transformers  # noqa: F401  (make setup installs the [hf] extra; fail loudly without it)
from tests.helpers.models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from multitoken import MTPConfig
from multitoken.data import Document, train_tokenizer
from multitoken.errors import CheckpointError
from multitoken.hf.export import export_model
from multitoken.hf.weights import load_hf_mtp_model

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé, emoji 🙂 and tabs\t!",
    "import os\nprint(os.getcwd())\n" * 3,
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [Document(f"d{i}", t) for i, t in enumerate(TEXTS * 4)]
    return train_tokenizer(docs, 300, tmp_path_factory.mktemp("tok"), verbose=False)


def reference(tokenizer, depth=2, tie=True, hidden_first=False):
    model = tiny_model(
        depth, vocab_size=tokenizer.vocab_size, tie_embeddings=tie, rope_theta=500.0,
        norm_eps=1e-6, mtp=dict(hidden_first=hidden_first),
    )  # fmt: skip
    with torch.no_grad():  # norms away from 1, so a dropped or misnamed one would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("tie,fmt", [(True, "mimo"), (False, "deepseek"), (True, "qwen3_next")])
def test_transformers_loads_the_export_with_equal_logits(tmp_path, tokenizer, tie, fmt):
    depth = 1 if fmt == "qwen3_next" else 2
    model = reference(tokenizer, depth, tie)
    export_model(model, tokenizer, tmp_path / "out", fmt)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(2, tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.logits(ids), rtol=1e-5, atol=1e-5)
        # The MTP weights come back through the adapter: every depth's hidden state equal.
        back = load_hf_mtp_model(tmp_path / "out", MTPConfig(num_depths=depth))
        for ours, theirs in zip(model(ids), back(ids)):
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_the_exported_tokenizer_round_trips_text(tmp_path, tokenizer):
    export_model(reference(tokenizer), tokenizer, tmp_path / "out")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text)
        assert hf_tok.decode(ids) == text
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id) == (tokenizer.pad_id, tokenizer.eos_id)


def test_hidden_first_run_exports_to_every_format(tmp_path, tokenizer):
    model = reference(tokenizer, depth=1, hidden_first=True)
    export_model(model, tokenizer, tmp_path / "out", "deepseek")
    back = load_hf_mtp_model(tmp_path / "out", MTPConfig(num_depths=1))
    ids = torch.randint(2, tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[1], model(ids)[1], rtol=1e-5, atol=1e-5)


def test_refused_export_writes_nothing(tmp_path, tokenizer):
    model = reference(tokenizer, depth=2)
    with pytest.raises(CheckpointError, match="holds one depth"):
        export_model(model, tokenizer, tmp_path / "out", "qwen3_next")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        export_model(model, tokenizer, tmp_path / "full")
