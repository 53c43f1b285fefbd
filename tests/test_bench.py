"""tools/bench.py runs on a CPU with a tiny model in seconds and writes its figures as JSON."""
from __future__ import annotations

import json

import pytest

from conftest import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench")


def test_step_bench_writes_json(bench, tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--rounds", "1", "--threads", "1",
                         "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ratio"] == pytest.approx(result["ratio"]) and saved["ratio"] > 0
    assert set(saved["img_per_s"]) == {"lightning", "plain", "teacher", "student", "cached"}
    assert all(v > 0 for v in saved["img_per_s"].values())
    assert 0 < saved["teacher_share"] < 1 and saved["cache_speedup"] > 0
    assert saved["flops_per_img"]["student_train"] > 0 and saved["flops_per_img"]["teacher_forward"] > 0
    assert saved["config"]["preset"] == "tiny" and saved["mfu"] is None  # no peak on a CPU


def test_step_bench_mfu_with_peak_and_no_parts(bench):
    r = bench.run_bench(preset="tiny", device="cpu", warmup=1, steps=2, rounds=1, parts=False, cache=False,
                        peak_tflops=1.0, quiet=True, threads=1)
    assert set(r["img_per_s"]) == {"lightning", "plain"} and r["teacher_share"] is None
    assert 0 < r["mfu"]["lightning_step"] < 1
    assert "ratio lightning / plain" in bench.format_table(r)


def test_epoch_bench_on_device_data(bench, tmp_path):
    r = bench.run_epoch_bench(preset="tiny", device="cpu", num_images=64, epochs=1, quiet=True, threads=1,
                              json_path=tmp_path / "epoch.json")
    assert set(r["epoch_seconds"]) == {"student", "live", "cached"}
    assert json.loads((tmp_path / "epoch.json").read_text())["img_per_s"]["live"] > 0


def test_epoch_bench_cache_with_a_bfloat16_teacher(bench):
    """The cache the bench builds by hand records the precision the DistillModule reading it computes in
    (`32-true, teacher bfloat16`); the cache refuses another."""
    r = bench.run_epoch_bench(preset="tiny", device="cpu", num_images=64, epochs=1, quiet=True, threads=1,
                              teacher_dtype="bfloat16")
    assert r["img_per_s"]["cached"] > 0
