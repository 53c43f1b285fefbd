"""tools/pipeline_seeds.py (README command 1 over seeds) on digits with tiny settings."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import yaml

from conftest import load_tool

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--teacher.model.init_args.model", "cifar_resnet10",
        "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32"]


@pytest.mark.slow
def test_pipeline_seeds_reports_the_range_over_seeds(tmp_path):
    os.environ["WANDB_MODE"] = "offline"
    tool = load_tool("pipeline_seeds")
    out = tmp_path / "seeds"
    assert tool.main(["digits", "--seeds", "2", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    fused = results["table"]["student val/acc, fused (best checkpoint: what the summary prints)"]
    values = [r["summary"]["student"]["val/acc"] for r in results["runs"]]
    assert fused["n"] == 2 and fused["min"] == min(values) and fused["max"] == max(values)
    specs = [torch.load(r["summary"]["student"]["checkpoint"], map_location="cpu", weights_only=True)
             ["hyper_parameters"]["student"] for r in results["runs"]]
    assert specs[0] == specs[1]  # the same recipe ...
    for run in results["runs"]:  # ... run with the seed it is reported under, in both steps
        folder = out / "runs" / f"seed{run['seed']}"
        for step in ("teacher", "student"):
            assert yaml.safe_load((folder / step / "config.yaml").read_text())["seed_everything"] == run["seed"], step
        # the last epoch's figure is that run's epoch-0 validation (TINY trains one epoch), from its own log
        rows = [r for r in csv.DictReader(open(folder / "student" / "metrics.csv")) if r.get("val/acc")]
        assert run["student_last_epoch"] == float(next(r["val/acc"] for r in rows if r["epoch"] == "0"))
        assert run["summary"] == json.loads((folder / "summary.json").read_text())
    last = results["table"]["student val/acc, fused (last epoch)"]
    assert (last["min"], last["max"]) == tuple(sorted(r["student_last_epoch"] for r in results["runs"]))
    md = (out / "results.md").read_text()
    assert md.startswith("<!-- regenerate: python tools/pipeline_seeds.py digits --seeds 2") and "min - max" in md


def test_pipeline_seeds_last_epoch_leaves_out_the_revalidation_of_the_chosen_checkpoint(tmp_path):
    tool = load_tool("pipeline_seeds")
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/acc\n0,9,1.0,\n0,10,,0.5\n1,20,0.9,\n1,21,,0.6\n"
        "2,22,,0.7\n")  # the last row: run_step validating the best checkpoint after training
    assert tool.last_epoch_acc(tmp_path) == 0.6
