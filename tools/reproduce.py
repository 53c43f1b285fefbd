"""Reproduce DeiT's distillation ablation (Touvron et al. 2021, Table 3) on any recipe.

Trains the teacher once, then the same student under DeiT's variants over N seeds:

    none        no distillation (a plain ViT, class token only)
    soft        usual (Hinton) distillation, no distillation token: KL at tau 3, alpha 0.1
    hard        hard distillation without token: the class token learns from the teacher's labels
    token       DeiT: distillation token with hard distillation (alpha 0.5), reported per head:
                class head, distillation head and both heads fused

    python tools/reproduce.py recipes/digits --seeds 3 --out results/digits

writes OUT/results.json (every run), OUT/results.md (mean +- std per variant, teacher accuracy, hardware,
wall time, the command) and OUT/results.png (a bar chart with error bars). Extra `--section.key VALUE`
overrides go to both steps (`--teacher.` / `--student.` for one), as in `distill pipeline`.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from distill.pipeline import resolve_recipe, run_step, split_overrides

VARIANTS = {
    "none": ["--model.init_args.student.distilled", "false", "--model.init_args.loss.mode", "none"],
    "soft": ["--model.init_args.student.distilled", "false", "--model.init_args.loss.mode", "soft",
             "--model.init_args.loss.tau", "3.0", "--model.init_args.loss.alpha", "0.1"],
    "hard": ["--model.init_args.student.distilled", "false", "--model.init_args.loss.mode", "hard",
             "--model.init_args.loss.alpha", "0.5"],
    "token": ["--model.init_args.student.distilled", "true", "--model.init_args.loss.mode", "hard",
              "--model.init_args.loss.alpha", "0.5"],
}
# What goes in the table: (row label, variant, metric)
ROWS = [
    ("no distillation", "none", "val/acc"),
    ("soft distillation (tau 3, alpha 0.1), no token", "soft", "val/acc"),
    ("hard distillation, no token", "hard", "val/acc"),
    ("distillation token: class head", "token", "val/acc_cls"),
    ("distillation token: distillation head", "token", "val/acc_dist"),
    ("distillation token: both heads fused", "token", "val/acc"),
]


def hardware() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({torch.get_num_threads()} threads, {cpu})"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_study(recipe: str, variants: list[str], seeds: int, out: Path, overrides: list[str], command: str) -> dict:
    recipe_dir = resolve_recipe(recipe)
    steps = split_overrides(overrides)
    start = time.perf_counter()
    teacher_ckpt, teacher_metrics, teacher_seconds = run_step(recipe_dir / "teacher.yaml", steps["teacher"], out / "teacher")
    runs = []
    for variant in variants:
        for seed in range(seeds):
            args = [*steps["student"], *VARIANTS[variant], "--seed_everything", str(seed),
                    "--model.init_args.teacher", teacher_ckpt]
            ckpt, metrics, seconds = run_step(recipe_dir / "student.yaml", args, out / f"{variant}-seed{seed}")
            runs.append({"variant": variant, "seed": seed, "checkpoint": ckpt, "seconds": round(seconds, 1),
                         "metrics": metrics})
    results = {
        "recipe": str(recipe_dir), "command": command, "hardware": hardware(),
        "teacher": {"checkpoint": teacher_ckpt, "val/acc": teacher_metrics.get("val/acc"),
                    "seconds": round(teacher_seconds, 1)},
        "runs": runs, "seconds": round(time.perf_counter() - start, 1),
    }
    results["table"] = [
        {"row": label, "variant": v, "metric": m,
         **dict(zip(("mean", "std"), mean_std([r["metrics"][m] for r in runs if r["variant"] == v]))),
         "n": sum(r["variant"] == v for r in runs)}
        for label, v, m in ROWS if v in variants
    ]
    return results


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        f"<!-- regenerate: {results['command']} -->",
        f"Command: `{results['command']}`",
        "",
        f"Hardware: {results['hardware']}; wall time {results['seconds'] / 60:.1f} min for the whole study "
        f"(teacher {results['teacher']['seconds']:.0f} s). Teacher val accuracy: {results['teacher']['val/acc']:.4f}.",
        "",
        "| variant | val top-1 (mean +- std) | seeds |",
        "| --- | --- | --- |",
    ]
    for row in results["table"]:
        lines.append(f"| {row['row']} | {100 * row['mean']:.2f} +- {100 * row['std']:.2f} | {row['n']} |")
    lines += ["", "Each run is scored with its best checkpoint by fused `val/acc`, chosen on the same validation "
              "split it is scored on (as the pipeline does); the class- and distillation-head rows read that "
              "checkpoint's heads.", "", "Every run (and its checkpoint) is in results.json next to this file."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["table"]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    xs = range(len(rows))
    ax.bar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], capsize=4,
           color=["#999999", "#6baed6", "#3182bd", "#fdae6b", "#e6550d", "#a63603"][: len(rows)])
    teacher = results["teacher"]["val/acc"]
    if teacher is not None:
        ax.axhline(100 * teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {100 * teacher:.1f}")
        ax.legend(loc="lower right")
    low = min(100 * (r["mean"] - r["std"]) for r in rows)
    ax.set_ylim(max(0, low - 5), 100)
    short = {"none": "no\ndistillation", "soft": "soft (tau 3)\nno token", "hard": "hard\nno token"}
    labels = [short[r["variant"]] if r["variant"] in short else "token:\n" + r["row"].split(": ")[1] for r in rows]
    ax.set_xticks(list(xs), labels, fontsize=8)
    for x, r in zip(xs, rows):
        ax.text(x, 100 * (r["mean"] + r["std"]) + 0.3, f"{100 * r['mean']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"DeiT distillation ablation, {Path(results['recipe']).name} ({results['hardware'].split(' (')[0]})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe folder with teacher.yaml and student.yaml")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="output folder (default results/<recipe name>)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out or f"results/{Path(args.recipe).name}")
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/reproduce.py " + shlex.join(argv)
    results = run_study(args.recipe, args.variants, args.seeds, out / "runs", overrides, command)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md")
    write_plot(results, out / "results.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
