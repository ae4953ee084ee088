"""Per-depth loss, accuracy and acceptance curves of one or several runs (``multitoken plot``).

Overlaying runs is the quickest way to see that two parallel layouts train identically: the
curves of ``parallel.cp=1`` and ``parallel.cp=2`` lie on top of each other.
"""

from __future__ import annotations

from pathlib import Path

from multitoken.train.metrics import read_metrics

__all__ = ["plot_runs"]

STYLES = ["-", "--", ":", "-."]
# (file, rows of (next-token key or None, per-depth key, title)); acceptance.png is written
# only when some record has its keys (not for CP or TP runs, nor D = 0).
FIGURES = (
    ("loss", (("loss_main", "loss_mtp", "cross-entropy"),)),
    ("accuracy", (("acc_main", "acc_mtp", "top-1 accuracy"),)),
    (
        "acceptance",
        (
            (None, "agree_mtp", "greedy agreement with the backbone"),
            (None, "accept_mtp", "expected acceptance, T = 1 (sum min(p, q))"),
        ),
    ),
)


def _series(records, split, key):
    rows = [r for r in records if r.get("split", "train") == split and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _draw(ax, runs, split: str, main_key: str | None, mtp_key: str) -> None:
    """Every run's next-token curve (when ``main_key``) and per-depth curves on ``ax``."""
    for index, (name, records) in enumerate(runs):
        style = STYLES[index % len(STYLES)]
        if main_key is not None:
            steps, values = _series(records, split, main_key)
            if steps:
                ax.plot(steps, values, style, color="C0", label=f"{name}: next token")
        steps, lists = _series(records, split, mtp_key)
        depth = max((len(v) for v in lists), default=0)
        for k in range(depth):
            ax.plot(
                steps,
                [v[k] for v in lists],
                style,
                color=f"C{k + 1}",
                label=f"{name}: MTP depth {k + 1} (token t+{k + 2})",
            )


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` and (when the runs measured it)
    ``acceptance.png`` for the given runs; return their paths.

    Args:
        run_dirs: one or more ``runs/<name>`` folders.
        out_dir: where to write; default: the first run's folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d).name, read_metrics(d)) for d in run_dirs]
    out = Path(out_dir) if out_dir else Path(run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, panels in FIGURES:
        keys = {mtp_key for _, mtp_key, _ in panels}
        if metric == "acceptance" and not any(k in r for _, rs in runs for r in rs for k in keys):
            continue
        fig, axes = plt.subplots(
            len(panels), 2, figsize=(11, 4 * len(panels)), sharey=True, squeeze=False
        )
        for row, (main_key, mtp_key, title) in zip(axes, panels):
            for ax, split in zip(row, ("train", "val")):
                _draw(ax, runs, split, main_key, mtp_key)
                ax.set_title(f"{split} {title}")
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
            row[0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
