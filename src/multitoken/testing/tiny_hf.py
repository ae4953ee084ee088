"""Tiny random transformers models of every supported architecture (tests, bench, examples).

No hub access is needed or made: a model is built from a config and written with
``save_pretrained`` into a local folder, which is what ``model.hf=PATH`` reads.

Example::

    >>> folder = save_tiny("qwen3", tmp_path / "qwen3")      # config.json + model.safetensors
    >>> decoder = HFDecoder.from_pretrained(folder)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = ["ARCHITECTURES", "tiny_config", "tiny_model", "save_tiny"]

# What each architecture brings that the others do not, so the tests cover it: Mistral a
# sliding window (small enough to bite at T = 24), Qwen2 q/k/v biases, Qwen3 QK-norm.
ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 6}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A 2-layer, 32-wide config of ``model_type`` (vocabulary 97 unless overridden)."""
    config_cls, _, extra = ARCHITECTURES[model_type]
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    values.update(extra)
    values.update(overrides)
    return config_cls(**values)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny model (fp32, eval mode)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = ARCHITECTURES[model_type][1](config)
    # transformers zero-initialises some biases and every norm at 1: randomise them so that
    # a bias or norm the adapter dropped would show in the tests.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def save_tiny(model_type: str, folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny model to ``folder`` with ``save_pretrained``; returns the folder."""
    folder = Path(folder)
    tiny_model(model_type, seed, **overrides).save_pretrained(folder)
    return folder
