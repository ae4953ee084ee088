"""The non-finite guard: an update whose loss or gradient norm is non-finite on any rank is
skipped on every rank, and too many in a row stop the run.

One small all-reduce per step carries both that flag and "a stop signal reached this rank", so
every rank skips the same updates and stops after the same step (a signal may reach the ranks
at different moments).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from multitoken.errors import TrainingError

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Counts skipped updates; ``skipped`` is saved with every checkpoint.

    Args:
        max_in_a_row: ``train.max_skipped_steps``.
        group: every rank (None in one process).
        device: where the flags are reduced.
        verbose: print a warning for each skipped update (rank 0).
    """

    def __init__(self, max_in_a_row: int, group, device: torch.device, verbose: bool):
        self.max_in_a_row, self.group, self.device, self.verbose = (
            max_in_a_row, group, device, verbose,
        )  # fmt: skip
        self.skipped, self.in_a_row = 0, 0

    def check(self, loss: torch.Tensor, norm: torch.Tensor, stop: bool) -> tuple[bool, bool]:
        """``(non-finite on some rank, a stop requested on some rank)``: one all-reduce."""
        flags = torch.stack(
            [
                (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm.detach())).float(),
                torch.tensor(float(stop), device=norm.device),
            ]
        ).to(self.device)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        nonfinite, stop_any = (bool(x) for x in flags.tolist())
        return nonfinite, stop_any

    def applied(self) -> None:
        """An update went through."""
        self.in_a_row = 0

    def skip(self, step: int) -> None:
        """Step ``step``'s update was not applied; raises past ``max_in_a_row`` in a row."""
        self.skipped += 1
        self.in_a_row += 1
        if self.verbose:
            print(f"warning: step {step}: non-finite loss or gradient norm, update skipped")
        if self.in_a_row > self.max_in_a_row:
            first = step - self.in_a_row + 1
            raise TrainingError(
                f"non-finite loss or gradient norm at step {first}"
                + (f" through {step}" if step > first else "")
                + f" ({self.in_a_row} in a row, more than train.max_skipped_steps="
                f"{self.max_in_a_row}); the updates were skipped and no checkpoint holds them: "
                "lower train.lr, raise train.warmup_steps or set train.grad_clip"
            )
