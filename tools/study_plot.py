"""The bar chart of a study (tools/reproduce.py, tools/transfer_study.py): one bar per table row, mean
with a +-std error bar and its value written above, optionally the teacher as a dashed line."""
from __future__ import annotations

from pathlib import Path


def bar_chart(path: Path, rows: list[dict], labels: list[str], colors: list[str], title: str,
              teacher: float | None = None, margin: float = 5.0, top: float = 100.0) -> None:
    """rows: dicts with `mean` and `std` (fractions); the y axis starts `margin` points below the lowest
    bar's error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(rows)), 4), dpi=100)
    xs = list(range(len(rows)))
    ax.bar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], capsize=4, color=colors)
    if teacher is not None:
        ax.axhline(100 * teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {100 * teacher:.1f}")
        ax.legend(loc="lower right")
    for x, r in zip(xs, rows):
        ax.text(x, 100 * (r["mean"] + r["std"]) + 0.3, f"{100 * r['mean']:.1f}", ha="center", va="bottom", fontsize=8)
    low = min(100 * (r["mean"] - r["std"]) for r in rows)
    ax.set_ylim(max(0, low - margin), top)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
