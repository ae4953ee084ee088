"""The run's checkpointer: what a checkpoint holds besides the weights (step, tokens, skipped
updates, schedule, data position, RNG), saved and restored in one place."""

from __future__ import annotations

from pathlib import Path

import torch

from multitoken.data import PackedLoader
from multitoken.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["Checkpointer", "RunState"]


class RunState:
    """Where a run stands: what a resumed run must continue from."""

    def __init__(self) -> None:
        self.step, self.tokens, self.skipped = 0, 0, 0


class Checkpointer:
    """Saves and restores a run's model, optimiser, schedule and data position.

    Args:
        run_dir: the run's folder (checkpoints go to ``checkpoints/step_N``).
        model, optimizer, scheduler, loader: what a checkpoint holds.
        group: every rank (None in one process).
        keep: ``train.keep_checkpoints``.
    """

    def __init__(self, run_dir: Path, model, optimizer, scheduler, loader: PackedLoader, group,
                 keep: int):  # fmt: skip
        self.run_dir, self.group, self.keep = run_dir, group, keep
        self.model, self.optimizer, self.scheduler, self.loader = (
            model, optimizer, scheduler, loader,
        )  # fmt: skip

    def save(self, state: RunState) -> None:
        extra = {
            "step": state.step,
            "tokens": state.tokens,
            "skipped": state.skipped,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": torch.get_rng_state(),
        }
        save_checkpoint(
            self.run_dir, state.step, self.model, self.optimizer, extra, self.group, keep=self.keep
        )

    def restore(self, checkpoint: Path, state: RunState) -> None:
        """Continue from a verified checkpoint (see
        :func:`~multitoken.train.checkpoint.resume_checkpoint`)."""
        extra = load_checkpoint(checkpoint, self.model, self.optimizer, self.group)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["rng"])
        state.step, state.tokens = extra["step"], extra["tokens"]
        state.skipped = extra.get("skipped", 0)
