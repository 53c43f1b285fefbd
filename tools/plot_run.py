#!/usr/bin/env python
"""Loss terms and per-head accuracy curves of a run, from its CSV logs, as one PNG (used by the README).

    python tools/plot_run.py RUN_DIR [--out FILE] [--dpi 120] [--table FILE.md]

Every `metrics.csv` (Lightning's CSVLogger) under RUN_DIR is plotted, found recursively: a pipeline run
folder has teacher/ and student/ subfolders and gives one row per step. Left: train/loss,
train/loss_ce, train/loss_distill (averaged per epoch when logged per step); right: val/acc,
val/acc_cls, val/acc_dist, val/acc_teacher, val/agreement, val/acc_ema, whichever were logged.
Writes RUN_DIR/curves.png unless --out says otherwise. `--table FILE.md` also writes val/acc (%) of each
run at each validated epoch, one row per run (e.g. runs of one schedule compared epoch by epoch, one of
them stopped before the end), with the command on top.
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

LOSS_KEYS = ("train/loss", "train/loss_ce", "train/loss_distill")
ACC_KEYS = ("val/acc", "val/acc_cls", "val/acc_dist", "val/acc_teacher", "val/agreement", "val/acc_ema")
LABELS = {
    "train/loss": "total", "train/loss_ce": "cross-entropy (class head)", "train/loss_distill": "distillation (dist head)",
    "val/acc": "fused heads", "val/acc_cls": "class head", "val/acc_dist": "distillation head",
    "val/acc_teacher": "teacher", "val/agreement": "agreement with teacher", "val/acc_ema": "EMA student",
}
ROW_W, ROW_H = 12.0, 4.0  # inches per run row


class PlotError(ValueError):
    pass


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def find_logs(run_dir: Path) -> list[Path]:
    """Every metrics.csv under run_dir (or run_dir itself when it is a CSV file), sorted."""
    if run_dir.is_file():
        return [run_dir]
    if not run_dir.is_dir():
        raise PlotError(f"run folder {str(run_dir)!r} does not exist; pass the folder a training run wrote")
    # teacher (step 1) before student (step 2), then by path
    logs = sorted(run_dir.rglob("metrics.csv"), key=lambda p: ("teacher" not in p.relative_to(run_dir).parts, str(p)))
    if not logs:
        raise PlotError(f"no metrics.csv under {str(run_dir)!r}; train with a CSVLogger "
                        f"(trainer.logger: lightning.pytorch.loggers.CSVLogger) to get one")
    return logs


def read_curves(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (epochs, per-epoch means)} of the known metrics in a CSVLogger file. A metric logged both
    per step and per epoch (`name_step`, `name_epoch`) is read from its per-epoch column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    columns = rows[0].keys()
    # The pipeline validates the chosen checkpoint once more after training; Lightning logs that with the
    # epoch after the last one trained. It is not an epoch of the curves: validation rows past the last
    # training epoch are left out (a validation-only log keeps them all).
    trained = [int(float(r["epoch"])) for r in rows if r.get("epoch") not in (None, "")
               and any(r.get(c) not in (None, "") for c in columns if c.startswith("train/"))]
    last_trained = max(trained) if trained else math.inf
    curves = {}
    for key in LOSS_KEYS + ACC_KEYS:
        col = next((c for c in (f"{key}_epoch", key, f"{key}_step") if c in columns), None)
        if col is None:
            continue
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for row in rows:
            value, epoch = row.get(col), row.get("epoch")
            if value in (None, "") or epoch in (None, "") or int(float(epoch)) > last_trained:
                continue
            v = float(value)
            if math.isfinite(v):
                per_epoch[int(float(epoch))].append(v)
        if per_epoch:
            epochs = sorted(per_epoch)
            curves[key] = (epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs])
    return curves


def _label(log: Path, run_dir: Path) -> str:
    if run_dir.is_file():
        return log.parent.name
    rel = log.parent.relative_to(run_dir)
    return run_dir.name if str(rel) == "." else str(rel)


def plot_run(run_dir: Path, out: Path, dpi: int = 120) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    runs = [(log, read_curves(log)) for log in find_logs(run_dir)]
    runs = [(log, c) for log, c in runs if c]
    if not runs:
        raise PlotError(f"the metrics.csv files under {str(run_dir)!r} hold none of {', '.join(LOSS_KEYS + ACC_KEYS)}")
    fig = Figure(figsize=(ROW_W, ROW_H * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for (log, curves), (ax_loss, ax_acc) in zip(runs, axes):
        name = _label(log, run_dir)
        losses = {k: v for k, v in curves.items() if k in LOSS_KEYS and any(y != 0 for y in v[1])}
        for key, (x, y) in losses.items():
            style = dict(color="black", lw=2, zorder=1) if key == "train/loss" else dict(ls="--", zorder=2)
            ax_loss.plot(x, y, marker="o", ms=3, label=LABELS[key], **style)
        values = [y for _, ys in losses.values() for y in ys]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax_loss.set_yscale("log")
        ax_loss.set_title(f"{name}: training loss (mean per epoch)", fontsize=10)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        student = any(k in curves for k in ("val/acc_cls", "val/acc_dist"))
        for key in ACC_KEYS:
            if key in curves:
                x, y = curves[key]
                label = LABELS[key] if student or key != "val/acc" else "accuracy"
                ax_acc.plot(x, y, marker="o", ms=3, label=label, ls="--" if key == "val/acc_teacher" else "-")
        ax_acc.set_title(f"{name}: validation accuracy", fontsize=10)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_ylim(0, 1.02)
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(str(run_dir.name), fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def val_table(run_dir: Path, command: str) -> str:
    """Markdown: val/acc (%) of every run under run_dir at each epoch any of them validated ("-" where a
    run did not get there), epochs counted from 1."""
    runs = [(_label(log, run_dir), read_curves(log).get("val/acc")) for log in find_logs(run_dir)]
    runs = [(name, dict(zip(*curve))) for name, curve in runs if curve]
    if not runs:
        raise PlotError(f"the metrics.csv files under {str(run_dir)!r} hold no val/acc")
    epochs = sorted({e for _, accs in runs for e in accs})
    lines = [f"Command: `{command}`", "", "val/acc (%) at the end of each validated epoch:", "",
             "| run | " + " | ".join(f"epoch {e + 1}" for e in epochs) + " |",
             "| --- |" + " --- |" * len(epochs)]
    for name, accs in runs:
        lines.append(f"| {name} | " + " | ".join(f"{100 * accs[e]:.2f}" if e in accs else "-" for e in epochs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="plot_run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (searched recursively for metrics.csv)")
    p.add_argument("--out", metavar="FILE", help="output PNG (default RUN_DIR/curves.png)")
    p.add_argument("--dpi", type=int, default=120, help="resolution (default 120)")
    p.add_argument("--table", metavar="FILE.md", help="also write val/acc of each run at each validated epoch")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir).expanduser()
    out = Path(args.out).expanduser() if args.out else (run_dir.parent if run_dir.is_file() else run_dir) / "curves.png"
    try:
        if out.is_dir():
            raise PlotError(f"--out {str(out)!r} is a folder; pass a file name such as curves.png")
        path = plot_run(run_dir, out, dpi=args.dpi)
        if args.table:
            table = Path(args.table).expanduser()
            table.write_text(val_table(run_dir, "python tools/plot_run.py " + shlex.join(argv)))
            print(table)
    except (PlotError, OSError, csv.Error, ValueError) as e:
        print(f"plot_run.py: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
