"""Per-depth loss and accuracy curves of one or several runs (``multitoken plot``).

Overlaying runs is the quickest way to see that two parallel layouts train identically: the
curves of ``parallel.cp=1`` and ``parallel.cp=2`` lie on top of each other.
"""

from __future__ import annotations

from pathlib import Path

from multitoken.train.metrics import read_metrics

__all__ = ["plot_runs"]


def _series(records, split, key):
    rows = [r for r in records if r.get("split", "train") == split and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Write ``loss.png`` and ``accuracy.png`` for the given runs; return their paths.

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
    styles = ["-", "--", ":", "-."]
    written = []
    for metric, main_key, mtp_key, title in (
        ("loss", "loss_main", "loss_mtp", "cross-entropy"),
        ("accuracy", "acc_main", "acc_mtp", "top-1 accuracy"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, split in zip(axes, ("train", "val")):
            for index, (name, records) in enumerate(runs):
                style = styles[index % len(styles)]
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
            ax.set_title(f"{split} {title}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
