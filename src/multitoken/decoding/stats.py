"""The counters of a generation: forwards, and drafts reached and accepted per draft step."""

from __future__ import annotations

from dataclasses import dataclass, field

from multitoken.errors import warn_renamed

__all__ = ["GenerationStats"]


@dataclass
class GenerationStats:
    """Counters of one generation (or, summed with :meth:`merge`, of many).

    Attributes:
        new_tokens: tokens generated.
        forwards: main-model forwards after the prompt's prefill; each yields >= 1 token.
        draft_depths: MTP depths used to draft (0 = plain decoding).
        reached: per draft step k (the depth itself unless ``draft_steps`` exceeds the depths),
            drafts the verifier judged: the step drafted k tokens and accepted the first k - 1.
        accepted: per draft step k, of those, the accepted ones.
        accepted_histogram: index a counts the steps that accepted exactly a drafts.
        seconds: wall-clock time of the prefill and the decoding loop.
        draft_steps: drafts per verification, N (0 = plain decoding); ``reached`` and
            ``accepted`` have length N.
    """

    new_tokens: int = 0
    forwards: int = 0
    draft_depths: int = 0
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    accepted_histogram: list[int] = field(default_factory=list)
    seconds: float = 0.0
    draft_steps: int = 0

    @property
    def draft_depth(self) -> int:
        """Deprecated: :attr:`draft_depths`."""
        warn_renamed("GenerationStats.draft_depth", "GenerationStats.draft_depths")
        return self.draft_depths

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.forwards, 1)

    @property
    def acceptance(self) -> list[float | None]:
        """Per draft step: P(draft k accepted | drafts 1..k-1 accepted); None where never
        reached."""
        return [a / r if r else None for a, r in zip(self.accepted, self.reached)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: GenerationStats) -> GenerationStats:
        """The sum of two runs' counters (same draft depths and steps)."""
        if (other.draft_depths, other.draft_steps) != (self.draft_depths, self.draft_steps):
            raise ValueError(
                f"draft depths, steps {other.draft_depths, other.draft_steps} != "
                f"{self.draft_depths, self.draft_steps}"
            )

        def add(a: list[int], b: list[int]) -> list[int]:
            return [x + y for x, y in zip(a, b)]

        return GenerationStats(
            self.new_tokens + other.new_tokens,
            self.forwards + other.forwards,
            self.draft_depths,
            add(self.reached, other.reached),
            add(self.accepted, other.accepted),
            add(self.accepted_histogram, other.accepted_histogram),
            self.seconds + other.seconds,
            self.draft_steps,
        )
