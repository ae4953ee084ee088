"""The EAGLE-1 draft block, as a choice of MTP depth (``mtp.block = "eagle"``).

vLLM (``llama_eagle.py``) and SGLang (``llama_eagle.py``, ``qwen2_eagle.py``) serve a draft for
dense models as EAGLE-1: ``fc`` over ``[embedding; hidden]``, then one decoder layer whose input
norm is removed, and the head on its output with no final norm. multitoken's depth has two input
norms, a layer with its input norm and a final norm; with ``block = "eagle"`` those four are
identities, so the depth computes exactly the engines' draft (docs/serving.md#eagle).
"""

from __future__ import annotations

from torch import nn

from multitoken.errors import ConfigError

__all__ = ["BLOCKS", "drop_input_norm"]

BLOCKS = ("mtp", "eagle")
# The first norm of a layer, by the name each supported layer kind gives it.
_INPUT_NORMS = ("input_layernorm", "attention_norm")


def drop_input_norm(layer: nn.Module) -> None:
    """Replace ``layer``'s input norm (HF ``input_layernorm``, reference ``attention_norm``) by
    an identity, as EAGLE-1's draft layer 0 has none."""
    for name in _INPUT_NORMS:
        if isinstance(getattr(layer, name, None), nn.Module):
            setattr(layer, name, nn.Identity())
            return
    raise ConfigError(
        f"{type(layer).__name__} has no input norm named {' or '.join(_INPUT_NORMS)}: the "
        "eagle block needs one to remove; use mtp.block=mtp",
        "block",
    )
