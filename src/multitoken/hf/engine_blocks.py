"""The weight names and shapes of the decoder block each serving engine builds for an MTP or
EAGLE draft layer, from a folder's ``config.json`` (the names a checkpoint must carry for the
engine's loader to fill every parameter). Used by :mod:`multitoken.hf.engines`.

Each family is the block class named in the engine spec: vLLM's ``DeepseekV2DecoderLayer`` /
SGLang's ``DeepseekV2DecoderLayer`` (MLA, MoE), ``Glm4MoeDecoderLayer``, ``Qwen2DecoderLayer``
(MiMo), ``Qwen3NextDecoderLayer`` / Qwen3.5's (gated full attention, MoE or dense), and the
EAGLE-1 ``LlamaDecoderLayer`` with no input norm. Both engines read the checkpoint's per-matrix
names (``q_proj``, ``gate_proj``, ``experts.{e}.up_proj``) and fuse them themselves.

:data:`IMPLIED_CONFIG` holds the config fields an engine reads to build a block that
transformers' class neither reads nor writes, at the value built into transformers' code (what
multitoken trained); an export writes them (:func:`implied_config`).
"""

from __future__ import annotations

from typing import Any

from multitoken.errors import CheckpointError

__all__ = ["BLOCK_FAMILIES", "IMPLIED_CONFIG", "block_shapes", "implied_config"]

Shapes = dict[str, tuple[int, ...]]


def _dense_mlp(h: int, inter: int, prefix: str = "mlp.") -> Shapes:
    return {
        f"{prefix}gate_proj.weight": (inter, h),
        f"{prefix}up_proj.weight": (inter, h),
        f"{prefix}down_proj.weight": (h, inter),
    }


def _experts(h: int, inter: int, count: int) -> Shapes:
    out: Shapes = {}
    for e in range(count):
        out |= _dense_mlp(h, inter, f"mlp.experts.{e}.")
    return out


def _head_dim(c: dict[str, Any]) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _gqa(c: dict[str, Any], qkv_bias: bool, o_bias: bool = False, q_mult: int = 1) -> Shapes:
    h, d = c["hidden_size"], _head_dim(c)
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    out: Shapes = {
        "self_attn.q_proj.weight": (heads * d * q_mult, h),
        "self_attn.k_proj.weight": (kv * d, h),
        "self_attn.v_proj.weight": (kv * d, h),
        "self_attn.o_proj.weight": (h, heads * d),
    }
    if qkv_bias:
        out |= {
            "self_attn.q_proj.bias": (heads * d * q_mult,),
            "self_attn.k_proj.bias": (kv * d,),
            "self_attn.v_proj.bias": (kv * d,),
        }
    if o_bias:
        out["self_attn.o_proj.bias"] = (h,)
    return out


def _norms(h: int, input_norm: bool = True) -> Shapes:
    out: Shapes = {"post_attention_layernorm.weight": (h,)}
    if input_norm:
        out["input_layernorm.weight"] = (h,)
    return out


def _llama(c: dict[str, Any], input_norm: bool) -> Shapes:
    bias = bool(c.get("attention_bias", False))
    # SGLang's Qwen2ForCausalLMEagle (model_type qwen2) is Qwen2's layer: q/k/v biases always.
    qkv_bias = c.get("model_type") == "qwen2" or bool(c.get("qkv_bias", bias))
    h = c["hidden_size"]
    return (
        _gqa(c, qkv_bias, o_bias=bias)
        | _dense_mlp(h, c["intermediate_size"])
        | _norms(h, input_norm)
    )


def _qwen2(c: dict[str, Any]) -> Shapes:
    # vLLM's and SGLang's Qwen2Attention build q/k/v with bias=True whatever the config says.
    h = c["hidden_size"]
    return _gqa(c, qkv_bias=True) | _dense_mlp(h, c["intermediate_size"]) | _norms(h)


def _deepseek_v2(c: dict[str, Any]) -> Shapes:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_rank, kv_rank = c.get("q_lora_rank"), c["kv_lora_rank"]
    out: Shapes = {
        "self_attn.kv_a_proj_with_mqa.weight": (kv_rank + rope, h),
        "self_attn.kv_a_layernorm.weight": (kv_rank,),
        "self_attn.kv_b_proj.weight": (heads * (nope + v), kv_rank),
        "self_attn.o_proj.weight": (h, heads * v),
    }
    if q_rank:
        out |= {
            "self_attn.q_a_proj.weight": (q_rank, h),
            "self_attn.q_a_layernorm.weight": (q_rank,),
            "self_attn.q_b_proj.weight": (heads * (nope + rope), q_rank),
        }
    else:
        out["self_attn.q_proj.weight"] = (heads * (nope + rope), h)
    return out | _deepseek_moe(c) | _norms(h)


def _deepseek_moe(c: dict[str, Any]) -> Shapes:
    """The MoE of an MTP layer (its index L + k is past ``first_k_dense_replace``)."""
    h, inter, experts = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    out = {"mlp.gate.weight": (experts, h)} | _experts(h, inter, experts)
    if c.get("topk_method", "noaux_tc") == "noaux_tc":
        out["mlp.gate.e_score_correction_bias"] = (experts,)
    shared = c.get("n_shared_experts") or 0
    if shared:
        out |= _dense_mlp(h, inter * shared, "mlp.shared_experts.")
    return out


def _glm4_moe(c: dict[str, Any]) -> Shapes:
    h, d = c["hidden_size"], _head_dim(c)
    out = _gqa(c, qkv_bias=bool(c.get("attention_bias", False)))
    if c.get("use_qk_norm", False):
        out |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    return out | _deepseek_moe(c) | _norms(h)


def _qwen3_next(c: dict[str, Any]) -> Shapes:
    """Gated full attention (q_proj doubled for the gate), QK norms, then MoE with one shared
    expert and its gate, or a dense MLP where the config has no experts (dense Qwen3.5)."""
    h, d = c["hidden_size"], _head_dim(c)
    out = _gqa(c, qkv_bias=False, q_mult=2)
    out |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    experts = c.get("num_experts") or 0
    if experts:
        inter = c["moe_intermediate_size"]
        out |= {"mlp.gate.weight": (experts, h)} | _experts(h, inter, experts)
        shared = c.get("shared_expert_intermediate_size") or 0
        if shared:
            out |= _dense_mlp(h, shared, "mlp.shared_expert.")
            out["mlp.shared_expert_gate.weight"] = (1, h)
    else:
        out |= _dense_mlp(h, c["intermediate_size"])
    return out | _norms(h)


BLOCK_FAMILIES = {
    "llama": lambda c: _llama(c, input_norm=True),
    "llama_eagle": lambda c: _llama(c, input_norm=False),
    "qwen2": _qwen2,
    "deepseek_v2": _deepseek_v2,
    "glm4_moe": _glm4_moe,
    "qwen3_next": _qwen3_next,
}


def block_shapes(family: str, config: dict[str, Any]) -> Shapes:
    """The block's weight names (relative to the layer) and shapes for ``config``."""
    return BLOCK_FAMILIES[family](config)


# transformers' DeepseekV3 routes every layer from first_k_dense_replace on (moe_layer_freq 1)
# with sigmoid scores plus e_score_correction_bias ("noaux_tc"), whatever config.json says, and
# DeepseekV3Config writes none of the three. vLLM 0.34.0's DeepseekV2MoE reads
# ``getattr(config, "topk_method", None)`` (otherwise no correction-bias parameter: its loader
# then fails on the checkpoint's) and ``getattr(config, "scoring_func", "softmax")``; SGLang
# 0.5.23's deepseek_v2.py reads ``config.topk_method``, ``config.scoring_func`` and
# ``config.moe_layer_freq`` as attributes (an AttributeError without them). Released DeepSeek-V3
# folders carry all three; a folder made with transformers' config class does not.
IMPLIED_CONFIG: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1},
}


def implied_config(config: dict[str, Any]) -> dict[str, Any]:
    """The :data:`IMPLIED_CONFIG` entries an export of ``config`` (a config.json) must add.

    Raises:
        CheckpointError: config.json sets one to another value (the engine would then build a
            block that computes something else than the model that was trained).
    """
    implied = IMPLIED_CONFIG.get(config.get("model_type"), {})
    for name, value in implied.items():
        if name in config and config[name] != value:
            raise CheckpointError(
                f"config.json has {name}={config[name]!r}, but transformers' "
                f"{config['model_type']} (the model trained) always computes with {value!r}, and "
                f"vLLM and SGLang build their block from {name}: set it to {value!r} in the "
                "model folder's config.json"
            )
    return {name: value for name, value in implied.items() if name not in config}
