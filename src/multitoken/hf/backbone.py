"""The backbone tensors a model folder's config.json promises, checked against its
safetensors headers (part of :func:`multitoken.hf.folder.check_model_folder`'s gate).

For the Llama family (Llama, Mistral, Qwen2, Qwen3) the names and shapes are spelled out here
from the config; for the others (DeepSeek-V3's MLA, the MoE models) they are those of the model
transformers builds from the config on the meta device (no storage, no weight read), under the
names its checkpoints use (:mod:`multitoken.hf.block_names`: one tensor per expert).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitoken.errors import ConfigError

__all__ = ["check_backbone"]

_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def _expected(shape, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The backbone tensors the config promises, with their shapes."""
    if config["model_type"] not in _LLAMA_FAMILY:
        return _expected_of_built(config)
    dim, q, kv = shape.dim, shape.n_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out = {"model.embed_tokens.weight": (shape.vocab, dim), "model.norm.weight": (dim,)}
    if not shape.tied:
        out["lm_head.weight"] = (shape.vocab, dim)
    layer = {
        "self_attn.q_proj.weight": (q, dim),
        "self_attn.k_proj.weight": (kv, dim),
        "self_attn.v_proj.weight": (kv, dim),
        "self_attn.o_proj.weight": (dim, q),
        "mlp.gate_proj.weight": (shape.ffn, dim),
        "mlp.up_proj.weight": (shape.ffn, dim),
        "mlp.down_proj.weight": (dim, shape.ffn),
        "input_layernorm.weight": (dim,),
        "post_attention_layernorm.weight": (dim,),
    }
    for i in range(shape.n_layers):
        out.update({f"model.layers.{i}.{key}": size for key, size in layer.items()})
    return out


def _expected_of_built(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of the model transformers builds from ``config`` on the meta
    device (no storage), under the names its checkpoints use (MoE experts one by one)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from multitoken.hf.block_names import to_checkpoint_names

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            CONFIG_MAPPING[config["model_type"]](**config), trust_remote_code=False
        )
    names = to_checkpoint_names(model, model.state_dict())
    if model.config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    return {name: tuple(value.shape) for name, value in names.items()}


def check_backbone(folder: Path, shape, config: dict, tensors: dict) -> None:
    for name, size in _expected(shape, config).items():
        if name not in tensors:
            raise ConfigError(
                f"{folder} lacks the tensor {name!r} that its config.json describes (it would "
                "be left at random values): the weights and config.json do not belong together"
            )
        if tensors[name][1] != size:
            raise ConfigError(
                f"{folder}: tensor {name!r} has shape {list(tensors[name][1])} but config.json "
                f"gives {list(size)}: the weights and config.json do not belong together"
            )
