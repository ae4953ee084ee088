"""One generation as a JSON-ready record (``multitoken generate --json``)."""

from __future__ import annotations

from multitoken.decoding.generate import Generation, teacher_forced_accuracy
from multitoken.mtp_model import MTPModel

__all__ = ["generation_record"]


def generation_record(model: MTPModel, result: Generation, text: str) -> dict:
    """The JSON record of one generation (``multitoken generate --json``): the text, ids,
    counters, acceptance per draft step and teacher-forced accuracy per depth."""
    stats = result.stats
    accuracy = [
        hits / total if total else None
        for hits, total in teacher_forced_accuracy(
            model, result.prompt_ids + result.tokens, len(result.prompt_ids)
        )
    ]
    return {
        "text": text,
        "tokens": stats.new_tokens,
        "token_ids": result.tokens,
        "forwards": stats.forwards,
        "tokens_per_forward": round(stats.tokens_per_forward, 4),
        "acceptance": [None if a is None else round(a, 4) for a in stats.acceptance],
        "teacher_forced_accuracy": [None if a is None else round(a, 4) for a in accuracy],
        "tokens_per_s": round(stats.tokens_per_s, 2),
        "prompt_tokens": len(result.prompt_ids),
    }
