"""What a study reports: the table (mean +- std and min - max over seeds per variant), OUT/results.md,
the bar chart OUT/results.png and, for runs validated more than once, validation accuracy against
samples seen (a table in results.md and OUT/curves.png); `distill study --report` writes them again
from OUT/results.json.
"""
from __future__ import annotations

import csv
import io
import json
import platform
import shlex
import statistics
import sys
from pathlib import Path

from .study_claims import claim_alive, results_lock
from .study_paths import portable_argv, recipe_label, study_relative
from .study_variants import SHORT, color_of, rows_of

COMMAND = "distill study"
OLD_COMMAND = "python tools/reproduce.py"  # what studies recorded before the command was part of the package


def hardware() -> str:
    import torch

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


def row_stats(values: list[float]) -> dict:
    """What a results row says of its runs: mean +- std, and the range (min - max)."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def table(runs: list[dict], own: dict[str, str] | None = None) -> list[dict]:
    """One row per (variant, metric) of `rows_of` that has runs; `own`: the study's own variants."""
    return [
        {"row": label, "variant": v, "metric": m, **row_stats([r["metrics"][m] for r in runs if r["variant"] == v])}
        for label, v, m in rows_of(own or {}) if any(r["variant"] == v for r in runs)
    ]


def split_command(command: str) -> list[str]:
    """The arguments of a recorded study command, of either form (`distill study ...` or, in older
    files, `python tools/reproduce.py ...`)."""
    for prefix in (COMMAND, OLD_COMMAND):
        if command.startswith(prefix + " ") or command == prefix:
            return shlex.split(command[len(prefix):])
    return shlex.split(command)


def study_command(argv: list[str]) -> str:
    """The command recorded in results.json and on top of results.md (paths under the current directory
    made relative to it)."""
    return " ".join([COMMAND, shlex.join(portable_argv(argv))]).strip()


def given_teacher_arg(command: str) -> str | None:
    """The --teacher_ckpt value of a recorded command, if any."""
    args = split_command(command)
    for i, arg in enumerate(args):
        if arg == "--teacher_ckpt" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--teacher_ckpt="):
            return arg.split("=", 1)[1]
    return None


# ------------------------------------------------------------------------------------------- curves
def _device_count(devices, accelerator) -> int:
    """How many processes `trainer.devices` starts (Lightning's forms: 2, "2", [0, 1], "0,1", "auto", -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)
    except (TypeError, ValueError):
        count = -1  # "auto"
    if count > 0:
        return count
    if accelerator == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count())  # every visible GPU (this machine's: the one the run ran on)


def global_batch(config: dict) -> int:
    """Images per optimizer step of a run, from its resolved recipe: data.batch_size per device x devices x
    nodes x trainer.accumulate_grad_batches."""
    data = config.get("data") or {}
    data = data.get("init_args", data)
    trainer = config.get("trainer") or {}
    return (int(data.get("batch_size") or 1) * _device_count(trainer.get("devices"), trainer.get("accelerator"))
            * int(trainer.get("num_nodes") or 1) * int(trainer.get("accumulate_grad_batches") or 1))


def validation_points(metrics: str, batch: int) -> dict:
    """{"samples": [...], "val/acc": [...]}: every validation row of a metrics.csv text against the samples
    seen by then. Lightning logs a validation run inside training at the step count before the batch that
    triggered it is counted, so N optimizer steps read N - 1. A row a worker is writing right now (cut
    short, unreadable) is skipped."""
    samples, accs = [], []
    for row in csv.DictReader(io.StringIO(metrics)):
        if row.get("val/acc") in (None, "") or row.get("step") in (None, ""):
            continue
        try:
            step, acc = int(float(row["step"])), float(row["val/acc"])
        except ValueError:
            continue
        samples.append((step + 1) * batch)
        accs.append(round(acc, 6))
    return {"samples": samples, "val/acc": accs}


def read_curve(folder: Path) -> dict | None:
    """val/acc of a finished run at each validation during training against the samples seen by then
    (`validation_points`), from its metrics.csv and config.yaml; None without them. The last validation
    row is the study's re-validation of the scored checkpoint after training, not a point of the curve."""
    import yaml

    log, config = folder / "metrics.csv", folder / "config.yaml"
    if not (log.is_file() and config.is_file()):
        return None
    points = validation_points(log.read_text(), global_batch(yaml.safe_load(config.read_text()) or {}))
    return {key: values[:-1] for key, values in points.items()}


def fill_curves(results: dict, study: Path) -> None:
    """Gives each run without a recorded curve the one its folder holds (runs saved before curves were
    recorded), unless a live worker is training in that folder now."""
    for run in results["runs"]:
        if "curve" in run:
            continue
        folder = study / "runs" / f"{run['variant']}-seed{run['seed']}"
        if folder.is_dir() and not claim_alive(folder.with_name(folder.name + ".running")):
            curve = read_curve(folder)
            if curve is not None:
                run["curve"] = curve


def curves_by_variant(results: dict) -> dict[str, dict[int, list[float]]]:
    """{variant: {samples seen: val/acc of each seed validated there}} for the variants whose runs were
    validated more than once, in the table's order."""
    found: dict[str, dict[int, list[float]]] = {}
    order = list(dict.fromkeys(v for _, v, _ in rows_of(results.get("own_variants") or {})))
    for run in sorted(results["runs"], key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order),
                                                       r["seed"])):
        curve = run.get("curve") or {}
        if len(curve.get("samples") or []) < 2:
            continue
        points = found.setdefault(run["variant"], {})
        for samples, acc in zip(curve["samples"], curve["val/acc"]):
            points.setdefault(samples, []).append(acc)
    return found


def curves_markdown(curves: dict[str, dict[int, list[float]]]) -> list[str]:
    counts = sorted({s for points in curves.values() for s in points})
    lines = ["Validation accuracy (`val/acc`, %) against samples seen (optimizer steps x global batch), mean over the "
             "seeds validated there; [curves.png](curves.png) draws it with the min - max over seeds:", "",
             "| samples seen | " + " | ".join(curves) + " |", "| --- |" + " --- |" * len(curves)]
    for count in counts:
        cells = [f"{100 * statistics.fmean(p[count]):.2f}" if count in p else "-" for p in curves.values()]
        lines.append(f"| {count:,} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------- report
def teacher_in_step2(runs: list[dict]) -> str:
    """The teacher's accuracy as the students' runs measured it (its step-2 input), when they did."""
    seen = sorted({round(r["metrics"]["val/acc_teacher"], 6) for r in runs if "val/acc_teacher" in r.get("metrics", {})})
    if not seen:
        return ""
    return f" (in step 2, on the students' input: {seen[0]:.4f})" if len(seen) == 1 else \
        f" (in step 2, on the students' input: {seen[0]:.4f}-{seen[-1]:.4f})"


def write_markdown(results: dict, path: Path) -> None:
    teacher = results["teacher"]
    given = study_relative(teacher.get("checkpoint") or "", path.parent,
                           given_as=given_teacher_arg(results["command"])) if teacher.get("given") else ""
    lines = [
        f"<!-- regenerate: {results['command']} -->",
        f"Command: `{results['command']}`",
        "",
        f"Hardware: {results['hardware']}; run time {results['seconds'] / 60:.1f} min for the whole study, summed "
        f"over the processes that shared it "
        + (f"(the teacher was given with --teacher_ckpt: {given}, from this folder). " if teacher.get("given")
           else f"(teacher {teacher['seconds']:.0f} s). ")
        + f"Teacher val accuracy: {teacher['val/acc']:.4f}{teacher_in_step2(results['runs'])}.",
        "",
        "| variant | val top-1 (mean +- std) | min - max | seeds |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["table"]:
        lines.append(f"| {row['row']} | {100 * row['mean']:.2f} +- {100 * row['std']:.2f} "
                     f"| {100 * row['min']:.2f} - {100 * row['max']:.2f} | {row['n']} |")
    own = {v: o for v, o in (results.get("own_variants") or {}).items() if any(r["variant"] == v for r in results["runs"])}
    if own:
        lines += ["", "Variants defined with --variant (overrides of the student step): "
                  + "; ".join(f"`{name}`: `{overrides}`" for name, overrides in own.items()) + "."]
    if results.get("score") == "last":
        lines += ["", "Each run is scored with its last checkpoint (the end of training): no checkpoint is chosen "
                  "on the images it is scored on."]
    else:
        lines += ["", "Each run is scored with its best checkpoint by fused `val/acc`, chosen on the same validation "
                  "split it is scored on (as the pipeline does); the class- and distillation-head rows read that "
                  "checkpoint's heads."]
    curves = curves_by_variant(results)
    if curves:
        lines += ["", *curves_markdown(curves)]
    lines += ["", "Every run (and its checkpoint) is in results.json next to this file."]
    path.write_text("\n".join(lines) + "\n")


def bar_chart(path: Path, rows: list[dict], labels: list[str], colors: list[str], title: str,
              teacher: float | None = None, margin: float = 5.0, top: float = 100.0) -> None:
    """One bar per table row (dicts with `mean` and `std`, fractions): the mean with a +-std error bar and
    its value written above, optionally the teacher as a dashed line; the y axis starts `margin` points
    below the lowest bar's error bar. Also used by tools/transfer_study.py."""
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


def _title(results: dict, what: str) -> str:
    return f"{what}, {Path(results['recipe']).name} ({results['hardware'].split(' (')[0]})"


def write_plot(results: dict, path: Path) -> None:
    own = results.get("own_variants") or {}
    rows = results["table"]
    labels = [("token:\n" if r["variant"] == "token" else "soft token:\n") + r["row"].split(": ")[1]
              if r["variant"] in ("token", "token_soft") else SHORT.get(r["variant"], r["variant"]) for r in rows]
    bar_chart(path, rows, labels, [color_of(r["variant"], own) for r in rows], _title(results, "Distillation variants"),
              teacher=results["teacher"]["val/acc"])


def write_curves_plot(results: dict, curves: dict[str, dict[int, list[float]]], path: Path) -> None:
    """Validation accuracy against samples seen: one line per variant (the mean over seeds) in a band from
    the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = results.get("own_variants") or {}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for variant, points in curves.items():
        xs = sorted(points)
        color = color_of(variant, own)
        ax.plot(xs, [100 * statistics.fmean(points[x]) for x in xs], marker="o", ms=3, color=color, label=variant)
        ax.fill_between(xs, [100 * min(points[x]) for x in xs], [100 * max(points[x]) for x in xs], color=color,
                        alpha=0.2, linewidth=0)
    teacher = results["teacher"].get("val/acc")
    if teacher is not None:
        ax.axhline(100 * teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {100 * teacher:.1f}")
    ax.set_xlabel("samples seen (optimizer steps x global batch)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(_title(results, "Validation accuracy against samples seen"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_study(results: dict, path: Path) -> None:
    """results.json (replaced whole, never half-written) and, once a row exists, results.md and results.png
    beside it (curves.png too, once a variant's runs were validated more than once). The caller holds the
    study's results lock."""
    fill_curves(results, path.parent)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    if results["table"]:
        write_markdown(results, path.with_name("results.md"))
        write_plot(results, path.with_name("results.png"))
    curves = curves_by_variant(results)
    if curves:
        write_curves_plot(results, curves, path.with_name("curves.png"))


def portable_results(results: dict, study: Path, keep_teacher: bool = False) -> dict:
    """results.json with every path in today's form: checkpoints relative to the study folder, the
    command as `distill study ...` with paths under the current directory relative to it. `keep_teacher`:
    the teacher's path stays as recorded (workers running now read it)."""
    command_args = split_command(results["command"])
    given_as = given_teacher_arg(results["command"])
    teacher = dict(results.get("teacher") or {})
    if teacher.get("checkpoint") and not keep_teacher:
        teacher["checkpoint"] = study_relative(teacher["checkpoint"], study, own=not teacher.get("given"),
                                               given_as=given_as)
    runs = [{**r, "checkpoint": study_relative(r["checkpoint"], study, own=True)} if r.get("checkpoint") else r
            for r in results["runs"]]
    return {**results, "recipe": recipe_label(results["recipe"]), "command": study_command(command_args),
            "teacher": teacher, "runs": runs}


def report(study: Path) -> int:
    """--report: the study's report written again from its runs (after a change to the report's format);
    results.json keeps its runs and times; its paths are rewritten in today's form and its derived table
    recomputed."""
    path = study / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to report: --report needs {path}; run the study first (or pass its --out)")
    # A worker of the former tools/reproduce.py finds the teacher by the path as it recorded it: while any
    # worker runs, that path is left alone.
    running = sorted(c.name for c in (study / "runs").glob("*.running") if claim_alive(c))
    if running:
        print(f"keeping the teacher's path as recorded while workers run ({', '.join(running)}); run --report "
              f"again once the study is finished", file=sys.stderr)
    with results_lock(study):
        results = portable_results(json.loads(path.read_text()), study, keep_teacher=bool(running))
        results["table"] = table(results["runs"], results.get("own_variants"))
        write_study(results, path)
    print(path.with_name("results.md").read_text())
    return 0
