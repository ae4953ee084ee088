"""Progress output of a training run: a live rich bar on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

__all__ = ["Progress"]


def _acceptance(r: dict[str, Any]) -> str:
    """``  agree [..]  accept [..]`` per depth, or nothing where the record has none."""
    if "agree_mtp" not in r or "accept_mtp" not in r:
        return ""
    agree = " ".join(f"{x:.3f}" for x in r["agree_mtp"])
    accept = " ".join(f"{x:.3f}" for x in r["accept_mtp"])
    return f"  agree [{agree}]  accept [{accept}]"


class Progress:
    """A live rich progress bar on a terminal, plain log lines otherwise (CI, files)."""

    def __init__(self, enabled: bool, start: int, end: int):
        self.enabled, self.bar = enabled, None
        if not enabled:
            return
        self.console = Console(stderr=True)
        if self.console.is_terminal:
            self.bar = RichProgress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.description}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("", total=end, completed=start)
            self.bar.start()

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def train(self, r: dict[str, Any]) -> None:
        if not self.enabled:
            return
        mtp = " ".join(f"{x:.3f}" for x in r["loss_mtp"])
        text = (
            f"step {r['step']:>5}  loss {r['loss']:.4f}  main {r['loss_main']:.4f}  "
            f"mtp [{mtp}]  acc {r['acc_main']:.3f}{_acceptance(r)}  lr {r['lr']:.2e}  "
            f"{r['tokens_per_s']:,.0f} tok/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, description=text.split("  ", 1)[1])
        self._print(text)

    def val(self, r: dict[str, Any]) -> None:
        if self.enabled:
            mtp = " ".join(f"{x:.3f}" for x in r["loss_mtp"])
            acc = " ".join(f"{x:.3f}" for x in r["acc_mtp"])
            self._print(
                f"[val] step {r['step']}  loss_main {r['loss_main']:.4f}  loss_mtp [{mtp}]  "
                f"acc_main {r['acc_main']:.3f}  acc_mtp [{acc}]{_acceptance(r)}"
            )

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
