"""How long the `distill` command takes to answer --help, next to the cost of importing its libraries.

    python tools/bench_startup.py [--runs 10] [--out results/startup] [--baseline DIR]

Each command runs `--runs` times in a fresh subprocess (this checkout on PYTHONPATH, `distill ARGS`
as `python -m distill.cli ARGS`, what the `distill` entry point runs). The commands take turns run by
run, so a change in the load of a shared machine falls on all of them alike. Reported: median and
min-max wall time of each, with references measured in the same run: `python -c pass`,
`import torch`, `import lightning`. `--baseline DIR` also times `import distill`, `distill --help` and
`distill pipeline --help` of another checkout (e.g. `git archive COMMIT | tar -x -C DIR`), in the same turns.
Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (name, argv after the interpreter, kind)
COMMANDS = [
    ("python -c pass", ["-c", "pass"], "reference"),
    ("python -c 'import torch'", ["-c", "import torch"], "reference"),
    ("python -c 'import lightning'", ["-c", "import lightning"], "reference"),
    ("python -c 'import distill'", ["-c", "import distill"], "distill"),
    ("distill --help", ["-m", "distill.cli", "--help"], "distill"),
    ("distill pipeline --help", ["-m", "distill.cli", "pipeline", "--help"], "distill"),
    ("distill export --help", ["-m", "distill.cli", "export", "--help"], "distill"),
    ("distill predict --help", ["-m", "distill.cli", "predict", "--help"], "distill"),
    ("distill attention --help", ["-m", "distill.cli", "attention", "--help"], "distill"),
    ("distill fit --help", ["-m", "distill.cli", "fit", "--help"], "distill"),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "lightning", "timm", "wandb", "jsonargparse"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


BASELINE = ("python -c 'import distill'", "distill --help", "distill pipeline --help")


def time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, *argv], cwd=env["PYTHONPATH"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"`python {' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each command (default 10)")
    parser.add_argument("--out", default=str(REPO / "results" / "startup"), help="folder of results.{json,md}")
    parser.add_argument("--baseline", default=None, help="another checkout of distill to time alongside")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.baseline and not (Path(args.baseline) / "distill" / "cli.py").is_file():
        parser.error(f"--baseline {args.baseline!r} is not a checkout of distill (no distill/cli.py)")

    base_env = {**os.environ, "WANDB_MODE": "offline", "COLUMNS": "120"}
    # (name, argv, kind, environment): this checkout, then the baseline's cheap commands
    plan = [(name, cmd, kind, {**base_env, "PYTHONPATH": str(REPO)}) for name, cmd, kind in COMMANDS]
    if args.baseline:
        baseline = str(Path(args.baseline).resolve())
        plan += [(f"{name} [baseline]", cmd, "baseline", {**base_env, "PYTHONPATH": baseline})
                 for name, cmd, _ in COMMANDS if name in BASELINE]
    times: dict[str, list[float]] = {name: [] for name, *_ in plan}
    for _, cmd, _, env in plan:  # warm the file cache once; not counted
        time_once(cmd, env)
    load_before = os.getloadavg()
    for run in range(args.runs):
        for name, cmd, _, env in plan:
            times[name].append(time_once(cmd, env))
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    load_after = os.getloadavg()

    # which checkout each command imported, by role: a path of this machine is not published
    results = [dict(name=name, argv=["python", *cmd], kind=kind,
                    imports="the baseline checkout" if kind == "baseline" else "this checkout",
                    median_s=round(statistics.median(times[name]), 3), min_s=round(min(times[name]), 3),
                    max_s=round(max(times[name]), 3), times_s=[round(t, 3) for t in times[name]])
               for name, cmd, kind, env in plan]
    report = dict(
        command="python tools/bench_startup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        cpu=cpu_name(), cpu_count=os.cpu_count(), load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in load_after], versions=versions(), runs=args.runs,
        date=time.strftime("%Y-%m-%d %H:%M:%S"), baseline=Path(args.baseline).name if args.baseline else None, results=results,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [
        "# Startup time of the `distill` command",
        "",
        f"Command: `{report['command'].strip()}`  ",
        f"CPU: {report['cpu']} ({report['cpu_count']} cores visible; load average "
        f"{report['load_average_before'][0]} before, {report['load_average_after'][0]} after)  ",
        f"Python {v['python']}, torch {v['torch']}, lightning {v['lightning']}, timm {v['timm']}, "
        f"wandb {v['wandb']}; {report['runs']} runs of each command, in turns, each in a fresh process; "
        f"{report['date']}",
        "",
        "`distill ARGS` is timed as `python -m distill.cli ARGS`. Wall time in seconds."
        + (f" [baseline]: the checkout at `{report['baseline']}`." if report.get("baseline") else ""),
        "",
        "| command | median | min - max |",
        "|---|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| `{r['name']}`{' (reference)' if r['kind'] == 'reference' else ''} | {r['median_s']:.2f} | "
                     f"{r['min_s']:.2f} - {r['max_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
