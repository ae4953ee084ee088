"""Run records: ``metrics.jsonl`` (one JSON object per logged step), optional TensorBoard.

Only rank 0 writes. Values are already reduced over ranks as sum/sum (never a mean of per-rank
ratios) by the trainer before they get here.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from multitoken.errors import DataError

__all__ = ["MetricsWriter", "acceptance_keys", "read_metrics", "record", "Stopwatch"]


def record(step: int, losses: list, accs: list, mtp_weight: float, **extra) -> dict[str, Any]:
    """One ``metrics.jsonl`` record from per-depth losses and accuracies (index 0: main)."""
    num_depths = len(losses) - 1
    total = losses[0] + (mtp_weight / num_depths * sum(losses[1:]) if num_depths else 0.0)
    out = {
        "step": step,
        "loss": total,
        "loss_main": losses[0],
        "loss_mtp": losses[1:],
        "acc_main": accs[0],
        "acc_mtp": accs[1:],
    }
    out.update(extra)
    return out


def acceptance_keys(reduced) -> dict[str, list[float]]:
    """``agree_mtp`` and ``accept_mtp`` (per depth) of a
    :class:`~multitoken.parallel.reduce.ReducedMetrics`; none where they were not measured
    (context or tensor parallelism, D = 0, a record of steps that did not log)."""
    if reduced.agree is None or reduced.accept is None:
        return {}
    return {"agree_mtp": reduced.agree, "accept_mtp": reduced.accept}


class Stopwatch:
    """Training time only: evaluation and checkpointing run inside :meth:`paused`."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def rate(self) -> float:
        """Tokens per second since the last call, and restart."""
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = time.perf_counter(), 0
        return rate


class MetricsWriter:
    """Appends metric records to ``<run_dir>/metrics.jsonl``.

    Args:
        run_dir: the run's folder.
        resume_step: when resuming, records of later steps (written after the checkpoint the
            run resumes from) are dropped so the file reads like one uninterrupted run.
        tensorboard: also write TensorBoard events under ``<run_dir>/tensorboard``.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # pragma: no cover - optional extra
                raise RuntimeError(
                    "run.tensorboard=true needs the tensorboard package: "
                    "pip install 'multitoken[tensorboard]'"
                ) from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, list):
                    for depth, item in enumerate(value, start=1):
                        self._tb.add_scalar(f"{split}/{key}_{depth}", item, record["step"])
                elif isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{split}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (or of ``<run>/metrics.jsonl``).

    A line that is not a record (a torn last line after a crash, anything else) is skipped,
    with one warning that counts them: the records around it are still good.

    Raises:
        DataError: there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: is this a run folder?")
    records, bad = [], 0
    with path.open("rb") as stream:
        for raw in stream:
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                record = None
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                records.append(record)
            elif raw.strip():
                bad += 1
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) of {path}", file=sys.stderr)
    return records
