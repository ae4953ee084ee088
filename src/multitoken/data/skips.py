"""What a pass over a data source skipped, counted per reason (reported once, never silent)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["SkipReport"]

_MAX_EXAMPLES = 5


@dataclass
class SkipReport:
    """What a pass over a source skipped: counts per reason and the first few places."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str, detail: str = "") -> None:
        """Count one skip under ``reason``; ``detail`` (default: the reason) names it."""
        self.counts[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where} ({detail or reason})")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. ``skipped 3: 2 binary, 1 not UTF-8 (e.g. a.bin (binary), ...)``."""
        if not self.total:
            return "skipped nothing"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total}: {reasons} (e.g. {', '.join(self.examples)})"

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, data: dict) -> SkipReport:
        return cls(Counter(data.get("counts", {})), list(data.get("examples", [])))
