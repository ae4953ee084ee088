"""Reference models."""

from multitoken.models.attention import Attention, AttentionMask
from multitoken.models.gpt import GPT, PRESETS, Block, GPTConfig, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput", "Block", "PRESETS", "Attention", "AttentionMask"]
