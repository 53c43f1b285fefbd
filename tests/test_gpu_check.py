"""tools/gpu_check.sh rehearsed on the CPU (`--dry-run`: every step with tiny sizes, the same files), and
the bookkeeping that lets a cut-off GPU run still bring back what finished (tools/gpu_check_report.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_tool

REPO = Path(__file__).resolve().parent.parent
FILES = {"README.md", "gpu_check.log", "env.json", "pytest.json", "bench_step.json", "bench_step_compiled.json",
         "bench_epoch.json", "pipeline.json"}


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.is_dir() else {}


ARCHIVES = [REPO / ".gpu-carry" / "data",
            Path(os.environ.get("DISTILL_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg"))]


@pytest.mark.slow
@pytest.mark.skipif(not any((a / "cifar10-train.tar.gz").is_file() for a in ARCHIVES),
                    reason="the CIFAR-10 JPEG archives (../shared/data/cifar10-jpeg) are absent")
def test_dry_run_rehearses_every_step_and_writes_what_the_gpu_run_writes(tmp_path):
    gpu_results = listing(REPO / "results" / "gpu")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    res = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files: what the GPU tool brings back
    assert listing(REPO / "results" / "gpu") == gpu_results  # the real results are never touched
    assert not list(tmp_path.glob("distill-gpu-check.*"))  # the scratch folder is removed

    read = {name: json.loads((out / name).read_text()) for name in FILES if name.endswith(".json")}
    env_json = read["env.json"]
    assert env_json["dry_run"] and env_json["unmet_requirements"] == []
    assert {k: v["status"] for k, v in env_json["setup"].items()} == {"install": "ok", "data": "ok"}
    for name, r in read.items():
        if name != "env.json":
            assert r["check"]["status"] == "ok", (name, r["check"])
    tests = read["pytest.json"]
    assert len(tests["tests"]) == 6 and all("test_gpu" in t["name"] for t in tests["tests"])
    assert tests["counts"]["failed"] == tests["counts"]["error"] == 0
    assert set(read["bench_step.json"]["img_per_s"]) == {"lightning", "plain", "teacher", "student", "cached"}
    compiled = read["bench_step_compiled.json"]
    assert compiled["config"]["compile_student"] and not compiled["config"]["compile_teacher"]
    epoch = read["bench_epoch.json"]
    assert set(epoch["epoch_seconds"]) == {"student", "live"} and epoch["config"]["num_images"] == 200
    assert epoch["config"]["data_root"].endswith("cifar10-jpeg")  # the real JPEG files, a few of them
    pipe = read["pipeline.json"]
    assert 0 <= pipe["teacher"]["val/acc"] <= 1 and 0 <= pipe["student"]["val/acc"] <= 1

    readme = (out / "README.md").read_text()
    assert "CPU dry run" in readme and "## Targets (issue 19)" in readme and 'carry=[".gpu-carry"]' in readme
    for label in ("Lightning step / plain DeiT loop", "teacher cache", "MFU", "student only", "live teacher",
                  "teacher val/acc", "student val/acc", "wall time"):
        assert label in readme
    size = next(line for line in res.stdout.splitlines() if line.startswith("carried folder"))
    assert "absent" in size or "fits" in size, size  # under the GPU tool's 64 MiB when --prepare filled it


# ----------------------------------------------------------------------------------- bookkeeping
@pytest.fixture(scope="module")
def report():
    return load_tool("gpu_check_report")


def test_a_cut_off_step_is_recorded_and_the_readme_says_so(report, tmp_path):
    out = tmp_path / "gpu"
    report.main(["record", "bench_step", "--out", str(out), "--rc", "124", "--seconds", "45", "--cap", "45",
                 "--command", "python tools/bench.py --preset gpu"])
    report.main(["record", "bench_epoch", "--out", str(out), "--rc", "-1", "--seconds", "0", "--cap", "3",
                 "--command", "python tools/bench.py --mode epoch", "--reason", "no time left"])
    (out / "bench_step_compiled.json").write_text(json.dumps({"mfu": {"student_step": 0.31}}))  # what bench wrote
    report.main(["record", "bench_step_compiled", "--out", str(out), "--rc", "0", "--seconds", "80", "--cap", "90",
                 "--command", "python tools/bench.py --preset gpu --compile"])
    report.main(["readme", "--out", str(out)])
    assert json.loads((out / "bench_step.json").read_text())["check"]["status"] == "timed_out"
    compiled = json.loads((out / "bench_step_compiled.json").read_text())
    assert compiled["mfu"]["student_step"] == 0.31 and compiled["check"]["status"] == "ok"  # kept, not replaced
    readme = (out / "README.md").read_text()
    assert "| bench_step | timed_out | 45.0 | 45 |" in readme
    assert "| bench_epoch | skipped (no time left) |" in readme
    assert "| compiled DeiT-S student step, MFU | 31.0% | >= 30.0% | yes |" in readme


def test_a_pipeline_cut_off_reports_the_last_validation_each_step_reached(report, tmp_path):
    runs = tmp_path / "runs"
    (runs / "teacher").mkdir(parents=True)
    (runs / "student").mkdir()
    (runs / "teacher" / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n0,99,1.2,\n4,499,,0.81\n9,999,,0.905\n")
    (runs / "student" / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n0,99,2.0,\n3,399,1.5,\n")
    out = tmp_path / "gpu"
    report.main(["record", "pipeline", "--out", str(out), "--rc", "124", "--seconds", "300", "--cap", "300",
                 "--command", "distill pipeline recipes/cifar10_budget", "--summary", str(runs / "summary.json"),
                 "--runs", str(runs)])
    r = json.loads((out / "pipeline.json").read_text())
    assert r["partial"] and r["teacher"]["val/acc"] == 0.905 and r["teacher"]["epoch"] == 9
    assert r["student"]["val/acc"] is None and r["student"]["last_logged_epoch"] == 3
    assert r["check"]["status"] == "timed_out"
