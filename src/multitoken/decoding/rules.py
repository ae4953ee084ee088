"""How a serving engine drafts with MTP heads, as a rule :func:`~multitoken.decoding.generate`
can follow, so that acceptance measured here predicts acceptance there (docs/serving.md).

Example::

    >>> rule = DraftRule("sglang:deepseek_v3", depths=1)
    >>> generate(model, prompt, 64, speculative=True, draft_steps=3, draft_rule=rule)

The engines' rules for each released architecture are in :data:`multitoken.hf.engines.SPECS`
(each spec's ``rule``); the fields are what those engines' sources do:

* ``depths``: how many of the model's depths the engine drafts with (SGLang loads one MTP
  layer; vLLM's MiMo draft runs layer 0 only); step s runs depth ``((s - 1) mod depths) + 1``,
  which is vLLM's ``spec_step_idx % num_mtp_layers``.
* ``zero_first_position``: the depths' token embedding is zeroed at position 0 (vLLM's
  ``deepseek_mtp``, ``glm4_moe_mtp``, ``mimo_mtp``; SGLang's ``MiMoMTP``).
"""

from __future__ import annotations

from dataclasses import dataclass

from multitoken.errors import InputError

__all__ = ["DraftRule", "rule_depths"]


@dataclass(frozen=True)
class DraftRule:
    """A serving engine's drafting rule.

    Attributes:
        name: what it is the rule of (``"vllm:deepseek_v3"``), for messages.
        depths: the model depths the engine drafts with, counted from depth 1 (None = all).
        zero_first_position: zero the depths' token embedding at position 0.
    """

    name: str
    depths: int | None = None
    zero_first_position: bool = False

    def __post_init__(self) -> None:
        if self.depths is not None and (isinstance(self.depths, bool) or self.depths < 1):
            raise InputError(f"draft rule {self.name}: depths must be >= 1, got {self.depths}")


def rule_depths(rule: DraftRule | None, draft_depths: int | None, num_depths: int) -> int | None:
    """``draft_depths`` under ``rule``: the engine's count (at most the model's D), refused where
    the caller asked for more depths than the engine drafts with."""
    if rule is None or rule.depths is None:
        return draft_depths
    engine = min(rule.depths, num_depths)
    if draft_depths is not None and draft_depths > engine:
        raise InputError(
            f"draft_depths={draft_depths} but {rule.name} drafts with {engine} MTP depth(s): "
            f"drop draft_depths or set it <= {engine}"
        )
    return engine if draft_depths is None else draft_depths
