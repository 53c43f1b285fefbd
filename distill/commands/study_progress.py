"""`distill study ... --progress`: the runs of a study that have not finished, as far as they got: the
steps their last checkpoint holds, `val/acc` at each validation so far (metrics.csv, joined with
metrics.earlier.csv when the run was resumed) and whether a worker trains them now. Printed and written to
OUT/progress.md. It reads files only, so it is safe while workers run."""
from __future__ import annotations

import time
from pathlib import Path

from .study_claims import claim_alive
from .study_report import global_batch, study_command, validation_points
from .study_runs import metrics_so_far, write_atomically


def curve_so_far(folder: Path, batch: int) -> dict:
    """`validation_points` of every validation a run folder's metrics hold so far, metrics.earlier.csv
    included (an unfinished run has no re-validation row to leave out)."""
    return validation_points(metrics_so_far(folder) or "", batch)


def _trained_steps(folder: Path) -> int | None:
    """The optimizer steps the run's last checkpoint holds (None without one)."""
    from ..models.weights import load_weights_file

    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    try:
        return int(load_weights_file(str(last)).get("global_step") or 0)
    except (ValueError, OSError, RuntimeError):  # being replaced right now, or not a checkpoint
        return None


def runs_in_progress(study: Path) -> list[dict]:
    """Every run folder of the study with a recorded recipe (config.yaml) and no entry in results.json."""
    import json

    import yaml

    results = study / "results.json"
    finished = set()
    if results.is_file():
        finished = {f"{r['variant']}-seed{r['seed']}" for r in json.loads(results.read_text()).get("runs", [])}
    found = []
    for folder in sorted(p for p in (study / "runs").glob("*-seed*") if p.is_dir()):
        config_file = folder / "config.yaml"
        if folder.name in finished or not config_file.is_file():
            continue
        config = yaml.safe_load(config_file.read_text()) or {}
        batch = global_batch(config)
        max_steps = int((config.get("trainer") or {}).get("max_steps") or -1)
        found.append({"run": folder.name, "batch": batch, "steps": _trained_steps(folder),
                      "max_steps": max_steps if max_steps > 0 else None,
                      "training": claim_alive(folder.with_name(folder.name + ".running")),
                      "curve": curve_so_far(folder, batch)})
    return found


def _steps_cell(steps: int | None, batch: int) -> str:
    return "-" if steps is None else f"{steps:,} steps ({steps * batch:,} samples)"


def progress_markdown(runs: list[dict], command: str) -> str:
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"<!-- regenerate: {command} -->", f"Command: `{command}`", "",
             f"The runs of this study that have not finished, as far as they got at {written} (finished runs: "
             f"results.md).", ""]
    if not runs:
        return "\n".join([*lines, "No run is in progress."]) + "\n"
    lines += ["| run | trained (last checkpoint) | of | worker |", "| --- | --- | --- | --- |"]
    for r in runs:
        target = _steps_cell(r["max_steps"], r["batch"]) if r["max_steps"] else "max_epochs"
        lines.append(f"| {r['run']} | {_steps_cell(r['steps'], r['batch'])} | {target} | "
                     f"{'training now' if r['training'] else 'none (resume with the study command)'} |")
    counts = sorted({s for r in runs for s in r["curve"]["samples"]})
    if counts:
        lines += ["", "Validation accuracy (`val/acc`, %) at each validation so far, against samples seen "
                  "(optimizer steps x global batch):", "",
                  "| samples seen | " + " | ".join(r["run"] for r in runs) + " |", "| --- |" + " --- |" * len(runs)]
        by_run = [dict(zip(r["curve"]["samples"], r["curve"]["val/acc"])) for r in runs]
        for count in counts:
            cells = [f"{100 * at[count]:.2f}" if count in at else "-" for at in by_run]
            lines.append(f"| {count:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def progress(study: Path, argv: list[str]) -> int:
    """--progress: OUT/progress.md (printed too) for the study in OUT."""
    if not (study / "runs").is_dir():
        raise FileNotFoundError(f"no study in {study} (no runs/ folder): pass the study's --out")
    text = progress_markdown(runs_in_progress(study), study_command(argv))
    write_atomically(study / "progress.md", text)
    print(text, end="")
    return 0
