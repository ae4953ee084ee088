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
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
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
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)
from transformers.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers.models.qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

__all__ = ["ARCHITECTURES", "tiny_config", "tiny_model", "save_tiny"]

# Routed experts of the MoE architectures: 4 experts, 2 per token, 16 wide (4 x 16 >= the
# dense layers' 64, so the memory estimate's dense-layer bound stays a lower bound).
_MOE = {"moe_intermediate_size": 16, "num_experts_per_tok": 2}
# DeepSeek-V3 / GLM-4.5 routing: sigmoid scores + e_score_correction_bias, experts in groups,
# a shared expert, the first layer dense (first_k_dense_replace), so an MTP layer is MoE.
_GROUPED = {**_MOE, "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1}
# What each architecture brings that the others do not, so the tests cover it: Mistral a
# sliding window (small enough to bite at T = 24), Qwen2 q/k/v biases, Qwen3 QK-norm;
# DeepSeek-V3 MLA (low-rank q and kv, a decoupled rotary part, interleaved RoPE) and grouped
# routing with a correction bias; GLM-4.5 partial rotary, q/k/v biases and the same routing;
# Qwen3-MoE softmax top-k routing without shared experts; Qwen3-Next a gated-DeltaNet linear
# attention layer (recurrent state, causal convolution) before a gated full-attention one,
# zero-centred norms and a gated shared expert; Qwen3.5 (text) the same hybrid with a dense MLP,
# separate in_proj_{qkv,z,b,a} projections and (text-only) multimodal RoPE.
ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 6}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    "deepseek_v3": (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        {
            **_GROUPED,
            "n_group": 2,
            "topk_group": 1,
            "q_lora_rank": 24,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "num_key_value_heads": 4,
            "routed_scaling_factor": 2.5,
        },
    ),
    "glm4_moe": (
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        {**_GROUPED, "n_group": 1, "topk_group": 1, "head_dim": 8, "attention_bias": True},
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        {**_MOE, "num_experts": 4, "head_dim": 8, "norm_topk_prob": True},
    ),
    "qwen3_next": (
        Qwen3NextConfig,
        Qwen3NextForCausalLM,
        {
            **_MOE,
            "num_experts": 4,
            "shared_expert_intermediate_size": 16,
            "head_dim": 8,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 4,
        },
    ),
    "qwen3_5_text": (
        Qwen3_5TextConfig,
        Qwen3_5ForCausalLM,
        {
            "head_dim": 8,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 4,
        },
    ),
    "qwen3_5_moe_text": (
        Qwen3_5MoeTextConfig,
        Qwen3_5MoeForCausalLM,
        {
            **_MOE,
            "num_experts": 4,
            "shared_expert_intermediate_size": 16,
            "head_dim": 8,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 4,
        },
    ),
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
    # transformers zero-initialises some biases, every norm at 1 and DeepSeek's routing
    # correction bias (a buffer) at 0: randomise them so that a bias, norm or routing bias the
    # adapter dropped would show in the tests.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.add_(0.1 * torch.randn_like(buffer))
    return model.eval()


def save_tiny(model_type: str, folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny model to ``folder`` with ``save_pretrained``; returns the folder."""
    folder = Path(folder)
    tiny_model(model_type, seed, **overrides).save_pretrained(folder)
    return folder
