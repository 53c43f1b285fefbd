"""README command 1 over several seeds: `distill pipeline RECIPE --seed_everything S` for S = 0..N-1 (both
steps, each seed on its own), then the range of what the summary prints.

    python tools/pipeline_seeds.py recipes/digits --seeds 5 --out results/digits_pipeline

writes OUT/results.json (every seed's summary) and OUT/results.md (mean +- std and min-max of the teacher's
and the student's val/acc, best checkpoint and last epoch, and the wall time of each command in its own
process, start-up included, with the command on top and the CPU). Extra `--section.key VALUE` overrides go
to both steps, as in `distill pipeline`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from distill.commands.study_report import hardware, mean_std

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/plot_run.py
from plot_run import read_curves  # noqa: E402


def last_epoch_acc(run_dir: Path) -> float | None:
    """val/acc of the last epoch's validation in a step's metrics.csv (no checkpoint chosen). The pipeline's
    re-validation of the chosen checkpoint after training is not an epoch: read_curves leaves it out."""
    _, values = read_curves(run_dir / "metrics.csv").get("val/acc", ([], []))
    return values[-1] if values else None


def describe(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return dict(mean=mean, std=std, min=min(values), max=max(values), n=len(values))


def write_report(out: Path, results: dict) -> None:
    """OUT/results.json (with the table) and OUT/results.md from `results` (command, hardware, recipe, runs)."""
    runs = results["runs"]
    rows = {
        "teacher val/acc (best checkpoint)": [r["summary"]["teacher"]["val/acc"] for r in runs],
        "student val/acc, fused (best checkpoint: what the summary prints)": [r["summary"]["student"]["val/acc"] for r in runs],
        "student class head (best checkpoint)": [r["summary"]["student"]["val/acc_cls"] for r in runs],
        "student distillation head (best checkpoint)": [r["summary"]["student"]["val/acc_dist"] for r in runs],
        "student val/acc, fused (last epoch)": [r["student_last_epoch"] for r in runs],
        "whole command, wall seconds": [r["wall_seconds"] for r in runs],
    }
    table = {name: describe(values) for name, values in rows.items()}
    results["table"] = table
    command = results["command"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"<!-- regenerate: {command} -->", f"Command: `{command}`", "",
             f"Each seed runs `distill pipeline {results['recipe']} --seed_everything S` (both steps). Hardware: "
             f"{results['hardware']}.", "",
             "| figure | mean +- std | min - max | seeds |", "| --- | --- | --- | --- |"]
    for name, d in table.items():
        scale = 1 if "seconds" in name else 100
        lines.append(f"| {name} | {scale * d['mean']:.2f} +- {scale * d['std']:.2f} | "
                     f"{scale * d['min']:.2f} - {scale * d['max']:.2f} | {d['n']} |")
    lines += ["", "Accuracies in %, on the 360 held-out digits; the best checkpoint is chosen on those same images "
              "(as the pipeline does), the last epoch is not chosen at all. Every seed's summary is in results.json."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe folder or shipped recipe name")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", required=True, help="output folder; each seed's run goes to OUT/runs/seedS")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        run_dir = out / "runs" / f"seed{seed}"
        # the command as a user types it, in its own process: the wall time includes start-up and imports
        cmd = [sys.executable, "-m", "distill.cli", "pipeline", args.recipe, "--out", str(run_dir), *overrides,
               "--seed_everything", str(seed)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        summary = json.loads((run_dir / "summary.json").read_text())
        runs.append(dict(seed=seed, wall_seconds=round(wall, 1), summary=summary,
                         student_last_epoch=last_epoch_acc(run_dir / "student")))
    command = "python tools/pipeline_seeds.py " + shlex.join(argv)
    write_report(out, dict(command=command, hardware=hardware(), recipe=str(args.recipe), runs=runs))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
