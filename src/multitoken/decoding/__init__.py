"""Decoding with an :class:`~multitoken.mtp_model.MTPModel`: KV-cached greedy and sampled
generation, and self-speculative decoding with the MTP depths as draft models.

* :mod:`.generate`: :func:`generate`, acceptance statistics, teacher-forced accuracy.
* :mod:`.state`: the decoding state: caches of the main layers and the draft steps, rollback.
* :mod:`.stats`: :class:`GenerationStats`, the counters (acceptance per draft step).
* :mod:`.static`: compiled static-shape decode steps for the reference GPT
  (``generate(compile=True)``).
"""

from multitoken.decoding.generate import (
    Generation,
    GenerationStats,
    accept_drafts,
    fit_prompt,
    generate,
    teacher_forced_accuracy,
)

__all__ = [
    "Generation",
    "GenerationStats",
    "accept_drafts",
    "fit_prompt",
    "generate",
    "teacher_forced_accuracy",
]
