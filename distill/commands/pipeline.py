"""`distill pipeline RECIPE_DIR`: step 1 (teacher) then step 2 (student), handing step 1's best
checkpoint to step 2, then a summary (printed and written to OUT/summary.json).

A recipe folder holds `teacher.yaml` and `student.yaml`. Overrides apply to both steps, except
`--teacher.KEY VALUE` and `--student.KEY VALUE`, which apply to one step only (as `--KEY VALUE`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..models.sources import is_source


def shipped_recipes() -> Path:
    """The folder of the shipped recipes.

    recipes/ sits at the top of the repository; pyproject.toml ships it inside the package as
    distill/recipes. An installed wheel therefore has `distill/recipes`, while a checkout (editable
    install, or PYTHONPATH) has only `../recipes` next to the package.
    """
    from importlib.resources import files

    installed = Path(str(files("distill") / "recipes"))
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


def resolve_recipe(recipe: str) -> Path:
    """A recipe folder by path, or by name among the shipped recipes (`digits`, `cifar10`, ...)."""
    path = Path(recipe)
    shipped_dir = shipped_recipes()
    if not path.is_dir() and (shipped_dir / recipe).is_dir():
        path = shipped_dir / recipe
    if not path.is_dir():
        shipped = sorted(p.name for p in shipped_dir.iterdir() if p.is_dir()) if shipped_dir.is_dir() else []
        raise FileNotFoundError(f"recipe {recipe!r} is not a folder; pass a folder with teacher.yaml and student.yaml "
                                f"(shipped: {', '.join(shipped)})")
    for step in ("teacher", "student"):
        if not (path / f"{step}.yaml").is_file():
            raise FileNotFoundError(f"recipe {str(path)!r} has no {step}.yaml")
    return path


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`--teacher.x 1 --student.y 2 --z 3` -> {teacher: [--x 1, --z 3], student: [--y 2, --z 3]}."""
    steps: dict[str, list[str]] = {"teacher": [], "student": []}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ValueError(f"override {arg!r} must look like --section.key VALUE or --section.key=VALUE")
        key, eq, value = arg[2:].partition("=")
        values = [value] if eq else []
        if not eq:
            if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
                raise ValueError(f"override --{key} has no value; write --{key} VALUE")
            values = [overrides[i + 1]]
            i += 1
        i += 1
        target = [s for s in steps if key.startswith(s + ".")]
        if target:
            steps[target[0]] += [f"--{key[len(target[0]) + 1:]}", *values]
        else:
            for args in steps.values():
                args += [f"--{key}", *values]
    return steps


def run_step(config: Path, args: list[str], root: Path, score: str = "best",
             resume: str | None = None) -> tuple[str, dict[str, float], float]:
    """Fits one step; returns its best checkpoint (or, with `score="last"`, its last one: no checkpoint
    chosen on the validation images), the metrics of that checkpoint and the wall time. `resume`: a
    checkpoint of this very run to continue from (optimizer, schedule and epoch included)."""
    from ..training.lineage import best_checkpoint, finish_wandb
    from .recipe_cli import DistillCLI

    start = time.perf_counter()
    cli = DistillCLI(args=["--config", str(config), *args, "--trainer.default_root_dir", str(root)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)
    best = best_checkpoint(cli.trainer) if score == "best" else (cli.trainer.checkpoint_callback.last_model_path or None)
    if best is None:
        raise ValueError(f"{config.name}: training wrote no checkpoint; keep the default checkpoint settings")
    results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    metrics = {k: round(float(v), 6) for k, v in (results[0] if results else {}).items()}
    finish_wandb()  # one W&B run per step: close this one before the next step starts
    return best, metrics, time.perf_counter() - start


def run_pipeline(recipe: str, out: str | None = None, overrides: list[str] | None = None,
                 teacher_ckpt: str | None = None) -> dict[str, Any]:
    recipe_dir = resolve_recipe(recipe)
    out_dir = Path(out or f"runs/{recipe_dir.name}")
    steps = split_overrides(list(overrides or []))
    start = time.perf_counter()
    summary: dict[str, Any] = {"recipe": str(recipe_dir), "out": str(out_dir)}

    if teacher_ckpt is None:
        teacher_ckpt, metrics, seconds = run_step(recipe_dir / "teacher.yaml", steps["teacher"], out_dir / "teacher")
        summary["teacher"] = {"checkpoint": teacher_ckpt, "val/acc": metrics.get("val/acc"), "metrics": metrics,
                              "seconds": round(seconds, 1)}
    else:
        if not is_source(teacher_ckpt) and not Path(teacher_ckpt).is_file():
            raise FileNotFoundError(f"--teacher_ckpt {teacher_ckpt!r} does not exist")
        summary["teacher"] = {"checkpoint": str(teacher_ckpt), "val/acc": None, "skipped": True}

    student_args = [*steps["student"], "--model.init_args.teacher", str(teacher_ckpt)]
    student_ckpt, metrics, seconds = run_step(recipe_dir / "student.yaml", student_args, out_dir / "student")
    summary["student"] = {"checkpoint": student_ckpt, "seconds": round(seconds, 1), "metrics": metrics}
    for key in ("val/acc", "val/acc_cls", "val/acc_dist", "val/acc_teacher", "val/agreement"):
        summary["student"][key] = metrics.get(key)
    if summary["teacher"]["val/acc"] is None:
        summary["teacher"]["val/acc"] = metrics.get("val/acc_teacher")
    summary["seconds"] = round(time.perf_counter() - start, 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    t, s = summary["teacher"], summary["student"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print("\n== distill pipeline summary ==")
    given = " (step 1 skipped: --teacher_ckpt given)" if t.get("skipped") else ""
    print(f"teacher  val/acc {fmt(t['val/acc'])}{given}   {t['checkpoint']}")
    print(f"student  val/acc {fmt(s['val/acc'])} (cls {fmt(s['val/acc_cls'])}, dist {fmt(s['val/acc_dist'])}, "
          f"agreement with teacher {fmt(s['val/agreement'])})   {s['checkpoint']}")
    print(f"total {summary['seconds']:.1f} s; summary in {Path(summary['out']) / 'summary.json'}\n", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="distill pipeline",
        description="Step 1 (teacher) then step 2 (student) from one recipe folder. Unknown --section.key VALUE "
                    "overrides apply to both steps; --teacher.KEY / --student.KEY to one step.",
    )
    parser.add_argument("recipe", help="recipe folder with teacher.yaml and student.yaml, or a shipped recipe name")
    parser.add_argument("--out", default=None, help="run folder (default runs/<recipe name>)")
    parser.add_argument("--teacher_ckpt", default=None,
                        help="use this teacher (a checkpoint, local-dir:PATH or hf-hub:ORG/NAME) and skip step 1")
    args, overrides = parser.parse_known_args(argv)
    run_pipeline(args.recipe, args.out, overrides, args.teacher_ckpt)
    return 0
