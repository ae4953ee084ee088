"""Reference models: the decoder MTP sits on, and its parts."""

from multitoken.models.attention import Attention, AttentionMask
from multitoken.models.gpt import GPT, PRESETS, Block, GPTConfig
from multitoken.models.kv_cache import LayerKVCache

__all__ = ["GPT", "GPTConfig", "Block", "PRESETS", "Attention", "AttentionMask", "LayerKVCache"]
