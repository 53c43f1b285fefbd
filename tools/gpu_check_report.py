#!/usr/bin/env python
"""The bookkeeping of tools/gpu_check.sh: what the machine is, what each step did, and the README that
holds every figure. Called by the script after each step, so a run cut off at any point still leaves
complete files for the steps that finished (and a `timed_out` or `failed` record for the one that did not).

    python tools/gpu_check_report.py env --out results/gpu [--dry-run]
    python tools/gpu_check_report.py record NAME --out results/gpu --rc 0 --seconds 41.2 --cap 90 --command '...'
    python tools/gpu_check_report.py readme --out results/gpu

Files (at most 8, what the GPU tool brings back from one folder): env.json, pytest.json, bench_step.json,
bench_step_compiled.json, bench_epoch.json, pipeline.json (each with a `status`), README.md, gpu_check.log.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

STEP_FILES = ("pytest", "bench_step", "bench_step_compiled", "bench_epoch", "pipeline")
SETUP_STEPS = ("install", "data")
PACKAGES = ("torch", "lightning", "timm", "torchmetrics", "torchvision", "wandb", "jsonargparse", "numpy", "pillow",
            "distill")
# the targets: (file, label, getter, comparison, threshold, unit)
TARGETS = [
    ("bench_step", "Lightning step / plain DeiT loop (DeiT-S + RegNetY-16GF, 224 px, bf16)",
     lambda r: r.get("ratio"), ">=", 0.95, ""),
    ("bench_step", "teacher cache / live teacher (Lightning steps)", lambda r: r.get("cache_speedup"), ">=", 2.5, "x"),
    ("bench_step_compiled", "compiled DeiT-S student step, MFU", lambda r: (r.get("mfu") or {}).get("student_step"),
     ">=", 0.30, "%"),
    ("bench_epoch", "CIFAR-10 epoch, student only (s per 50,000 images)",
     lambda r: _per_50k(r, "student"), "<=", 1.5, "s"),
    ("bench_epoch", "CIFAR-10 epoch, live teacher (s per 50,000 images)", lambda r: _per_50k(r, "live"), "<=", 2.0, "s"),
    ("pipeline", "budget pipeline: teacher val/acc (6,000 shared test images)",
     lambda r: (r.get("teacher") or {}).get("val/acc"), ">=", 0.94, "%"),
    ("pipeline", "budget pipeline: distilled student val/acc", lambda r: (r.get("student") or {}).get("val/acc"),
     ">=", 0.90, "%"),
    ("pipeline", "budget pipeline: the whole command, wall time (s)", lambda r: (r.get("check") or {}).get("seconds"),
     "<=", 360.0, "s"),
]


def _per_50k(r: dict, name: str) -> float | None:
    rate = (r.get("img_per_s") or {}).get(name)
    return 50_000 / rate if rate else None


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- env
def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unmet_requirements(dists: list[str]) -> list[str]:
    """Requirements (not extras) of `dists` that the environment does not satisfy: a `pip check` of the
    project and of the wheels carried for it (the image's own packages are not ours to judge)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for dist in dists:
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            unmet.append(f"{dist} is not installed")
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(req.name)
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                unmet.append(f"{dist}: {line} (installed: {have})")
    return unmet


def gpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    import torch

    info.update(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", device_count=torch.cuda.device_count())
    return info


def cmd_env(a: argparse.Namespace) -> None:
    out = Path(a.out)
    env = _read(out / "env.json")
    lightning_cli = None
    try:
        from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as lightning_cli  # noqa: N811
        lightning_cli = bool(lightning_cli)
    except ImportError:
        pass
    import distill

    prepared = _read(Path(a.carry) / "PREPARED.json") if a.carry else {}
    carried = [w.split("-")[0] for w in prepared.get("wheels", [])] if not a.dry_run else []  # dry run: 3.12's
    env.update(
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"), dry_run=a.dry_run, host=platform.node(),
        python=platform.python_version(), executable=sys.executable, cpus=os.cpu_count(),
        packages={name: _version(name) for name in PACKAGES}, distill_imported_from=str(Path(distill.__file__).parent),
        lightning_cli_available=lightning_cli, unmet_requirements=unmet_requirements(["distill", *carried]),
        commit=_commit(), gpu=gpu_info(), prepared=prepared, carry_bytes=_bytes(Path(a.carry)) if a.carry else 0,
    )
    _write(out / "env.json", env)
    print(f"env: {env['gpu'].get('name') or 'no GPU'}, torch {env['packages']['torch']}, "
          f"lightning {env['packages']['lightning']}, wandb {env['packages']['wandb']}, "
          f"jsonargparse {env['packages']['jsonargparse']}; unmet requirements: {env['unmet_requirements'] or 'none'}")


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------- record
def status_of(rc: int) -> str:
    return "ok" if rc == 0 else ("timed_out" if rc in (124, 137) else ("skipped" if rc < 0 else "failed"))


def pytest_figures(junit: Path) -> dict[str, Any]:
    """Counts and every test's outcome from a JUnit XML report."""
    if not junit.is_file():
        return {}
    root = ET.parse(junit).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = ((el.get("message") or "") + "\n" + (el.text or "")).strip()[-2000:]
        tests.append(dict(name=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=float(case.get("time") or 0), message=message))
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return dict(counts=counts, tests=tests)


def pipeline_figures(summary: Path, runs: Path) -> dict[str, Any]:
    """The pipeline's summary.json; when the run was cut off, what its metrics.csv files reached."""
    if summary.is_file():
        return _read(summary)
    partial: dict[str, Any] = {"partial": True}
    for step in ("teacher", "student"):
        path = runs / step / "metrics.csv"
        if not path.is_file():
            continue
        rows = list(csv.DictReader(path.open()))
        vals = [r for r in rows if r.get("val/acc")]
        last = vals[-1] if vals else {}
        partial[step] = {"val/acc": float(last["val/acc"]) if last else None,
                         "epoch": int(float(last["epoch"])) if last.get("epoch") else None,
                         "last_logged_epoch": max((int(float(r["epoch"])) for r in rows if r.get("epoch")), default=None)}
    return partial


def cmd_record(a: argparse.Namespace) -> None:
    out = Path(a.out)
    record = dict(status=status_of(a.rc), rc=a.rc, seconds=round(a.seconds, 1), cap_seconds=a.cap, command=a.command)
    if a.reason:
        record["reason"] = a.reason
    if a.name in SETUP_STEPS:
        env = _read(out / "env.json")
        env.setdefault("setup", {})[a.name] = record
        _write(out / "env.json", env)
        return
    path = out / f"{a.name}.json"
    result = _read(path)  # what the step wrote itself (the script removes a step's file before running it)
    if a.name == "pytest" and a.junit:
        result.update(pytest_figures(Path(a.junit)))
    if a.name == "pipeline" and a.summary:
        result.update(pipeline_figures(Path(a.summary), Path(a.runs or Path(a.summary).parent)))
    if a.rc != 0 and a.log and Path(a.log).is_file():
        record["log_tail"] = Path(a.log).read_text(errors="replace")[-3000:]
    result["check"] = record
    _write(path, result)


# ------------------------------------------------------------------------------------------- readme
def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if unit == "%":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3g}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"
    return f"{v}{unit}"


def cmd_readme(a: argparse.Namespace) -> None:
    out = Path(a.out)
    env = _read(out / "env.json")
    results = {name: _read(out / f"{name}.json") for name in STEP_FILES}
    dry = env.get("dry_run")
    gpu = env.get("gpu") or {}
    pk = env.get("packages") or {}
    lines = [
        "# GPU check" + (" (CPU dry run: tiny sizes, not measurements)" if dry else ""),
        "",
        f"Written by `tools/gpu_check.sh{' --dry-run' if dry else ''}` on {env.get('when', '?')}; "
        f"every figure below comes from the JSON files beside this README.",
        "",
        "## Machine",
        "",
        f"- card: {gpu.get('name') or 'none (CPU)'}; nvidia-smi: {gpu.get('nvidia_smi', 'n/a')}; "
        f"CUDA {gpu.get('torch_cuda')}, cuDNN {gpu.get('cudnn')}, {gpu.get('memory_gib', 'n/a')} GiB, "
        f"{gpu.get('multiprocessors', 'n/a')} SMs; {env.get('cpus')} CPUs",
        f"- Python {env.get('python')}; " + ", ".join(f"{k} {v}" for k, v in pk.items()),
        f"- commit: {env.get('commit') or (env.get('prepared') or {}).get('commit', 'unknown')}"
        f"{' (of --prepare)' if not env.get('commit') and env.get('prepared') else ''}; "
        f"unmet requirements of distill and the carried wheels: {', '.join(env.get('unmet_requirements') or []) or 'none'}; "
        f"carried folder {(env.get('carry_bytes') or 0) / 2**20:.1f} MiB",
        "",
        "## Steps",
        "",
        "| step | status | seconds | cap (s) | command |",
        "| --- | --- | --- | --- | --- |",
    ]
    steps = {**(env.get("setup") or {}), **{k: v.get("check") for k, v in results.items() if v.get("check")}}
    for name, rec in steps.items():
        command = (rec.get("command") or "").replace("|", "\\|")
        lines.append(f"| {name} | {rec['status']}{' (' + rec['reason'] + ')' if rec.get('reason') else ''} | "
                     f"{rec['seconds']} | {rec.get('cap_seconds')} | `{command}` |")
    lines += ["", "## Targets (issue 19)", "", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for name, label, get, op, goal, unit in TARGETS:
        r = results.get(name) or {}
        try:
            v = get(r)
        except (TypeError, AttributeError):
            v = None
        met = "n/a" if v is None else ("yes" if (v >= goal if op == ">=" else v <= goal) else "no")
        lines.append(f"| {label} | {_fmt(v, unit)} | {op} {_fmt(goal, unit)} | {met if not dry else 'dry run'} |")
    lines += _tests_section(results["pytest"]) + _bench_section(results) + _pipeline_section(results["pipeline"])
    carry = os.environ.get("GPU_CHECK_CARRY", ".gpu-carry")
    lines += ["", "## How to run it again", "",
              f"On a machine with a package registry, `tools/gpu_check.sh --prepare` (fills `{carry}/`), then one call of "
              f"the device tool from the checkout the session started in:", "",
              f'    run(command="bash tools/gpu_check.sh", carry=["{carry}"], timeout_s=600)', "",
              "`--dry-run` rehearses every step on the CPU with tiny sizes (results/gpu-dry-run/)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _tests_section(r: dict) -> list[str]:
    lines = ["", "## pytest -m gpu", ""]
    if not r.get("tests"):
        return lines + ["no report (see the step's status)"]
    c = r["counts"]
    lines.append(f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
    lines.append("")
    for t in r["tests"]:
        lines.append(f"- {t['outcome']} ({t['seconds']:.1f} s) `{t['name']}`"
                     + (f": {_one_line(t['message'])}" if t["outcome"] in ("failed", "error") else ""))
    return lines


def _one_line(message: str | None) -> str:
    text = " ".join((message or "").split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _bench_section(results: dict) -> list[str]:
    lines = []
    for name, flag in (("bench_step", ""), ("bench_step_compiled", " --compile-student")):
        r = results.get(name) or {}
        if not r.get("img_per_s"):
            continue
        c = r["config"]
        lines += ["", f"## tools/bench.py --preset {c['preset']}{flag}", "", f"{r['device']}, {c['precision']}, batch {c['batch']}, student {c['student']}, "
                  f"teacher {c['teacher']}, {c['img_size']} px; median of {c['steps']} steps x {c['rounds']} rounds", "",
                  "| part | img/s | ms/step | TFLOP/s | MFU |", "| --- | --- | --- | --- | --- |"]
        flops = dict(lightning="lightning_step", plain="plain_step", teacher="teacher_forward",
                     student="student_step", cached="cached_step")
        for part, rate in r["img_per_s"].items():
            key = flops.get(part)
            mfu = (r.get("mfu") or {}).get(key)
            lines.append(f"| {part} | {rate:.1f} | {r['step_ms'][part]:.2f} | {_fmt((r.get('tflops') or {}).get(key))} | "
                         f"{_fmt(mfu, '%')} |")
        lines.append("")
        lines.append(f"lightning / plain {_fmt(r.get('ratio'))}; teacher share {_fmt(r.get('teacher_share'), '%')}; "
                     f"cache speed-up {_fmt(r.get('cache_speedup'), 'x')}")
    r = results.get("bench_epoch") or {}
    if r.get("epoch_seconds"):
        c = r["config"]
        lines += ["", "## tools/bench.py --mode epoch (on-device data)", "",
                  f"{r['device']}, {c['precision']}, batch {c['batch']}, {c['num_images']} images of "
                  f"{c.get('data_root') or 'random data'} (decoded in {_fmt(r.get('decode_seconds'), ' s')}), "
                  f"compiled: {c.get('compile_student')}", "",
                  "| config | epoch (s) | first epoch (s) | img/s | s per 50,000 images |", "| --- | --- | --- | --- | --- |"]
        for name, sec in r["epoch_seconds"].items():
            lines.append(f"| {name} | {sec:.2f} | {_fmt((r.get('first_epoch_seconds') or {}).get(name))} | "
                         f"{r['img_per_s'][name]:.0f} | {_fmt(_per_50k(r, name))} |")
    return lines


def _pipeline_section(r: dict) -> list[str]:
    lines = ["", "## Budget pipeline (recipes/cifar10_budget)", ""]
    if not (r.get("teacher") or r.get("student")):
        return lines + ["no result (see the step's status)"]
    if r.get("partial"):
        lines.append("cut off before the end: the last validation each step reached")
    for step in ("teacher", "student"):
        s = r.get(step) or {}
        extra = {k: s.get(k) for k in ("val/acc_cls", "val/acc_dist", "val/agreement", "epoch", "seconds") if k in s}
        lines.append(f"- {step}: val/acc {_fmt(s.get('val/acc'), '%')}"
                     + "".join(f", {k} {_fmt(v, '%' if k.startswith('val/') else '')}" for k, v in extra.items()))
    if r.get("seconds") is not None:
        lines.append(f"- whole pipeline: {r['seconds']} s")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", required=True)
    e.add_argument("--dry-run", action="store_true")
    e.add_argument("--carry", default=None, help="the carried folder (its PREPARED.json)")
    r = sub.add_parser("record")
    r.add_argument("name", choices=STEP_FILES + SETUP_STEPS)
    r.add_argument("--out", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--cap", type=int, default=None)
    r.add_argument("--command", default="")
    r.add_argument("--reason", default=None)
    r.add_argument("--log", default=None, help="the step's log (its tail goes into a failed step's record)")
    r.add_argument("--junit", default=None)
    r.add_argument("--summary", default=None, help="the pipeline's summary.json")
    r.add_argument("--runs", default=None, help="the pipeline's run folder (metrics.csv of a cut-off run)")
    m = sub.add_parser("readme")
    m.add_argument("--out", required=True)
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    {"env": cmd_env, "record": cmd_record, "readme": cmd_readme}[a.cmd](a)


if __name__ == "__main__":
    main()
