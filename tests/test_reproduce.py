"""tools/reproduce.py end to end on digits with tiny settings."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import load_tool

REPO = Path(__file__).resolve().parent.parent
reproduce = load_tool("reproduce")

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--teacher.model.init_args.model", "cifar_resnet10",
        "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32"]


@pytest.mark.slow
def test_reproduce_writes_results_json_markdown_and_plot(tmp_path):
    os.environ["WANDB_MODE"] = "offline"
    out = tmp_path / "study"
    assert reproduce.main([str(REPO / "recipes/digits"), "--seeds", "2", "--out", str(out), *TINY]) == 0

    results = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in results["runs"]} == {"none", "soft", "hard", "token"}
    assert len(results["runs"]) == 8 and sorted({r["seed"] for r in results["runs"]}) == [0, 1]
    assert 0 <= results["teacher"]["val/acc"] <= 1 and results["seconds"] > 0 and results["hardware"]
    rows = {row["row"]: row for row in results["table"]}
    assert len(rows) == 6
    token = [r for r in results["runs"] if r["variant"] == "token"]
    cls_row = rows["distillation token: class head"]
    assert cls_row["mean"] == pytest.approx(sum(r["metrics"]["val/acc_cls"] for r in token) / 2)
    # the variants really differ in how they were trained
    hp = lambda run: __import__("torch").load(run["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]  # noqa: E731
    by_variant = {r["variant"]: hp(r) for r in results["runs"] if r["seed"] == 0}
    assert by_variant["none"]["loss"]["mode"] == "none" and not by_variant["none"]["student"]["distilled"]
    assert by_variant["soft"]["loss"] == {**by_variant["soft"]["loss"], "mode": "soft", "tau": 3.0, "alpha": 0.1}
    assert by_variant["token"]["student"]["distilled"] and by_variant["token"]["loss"]["mode"] == "hard"

    md = (out / "results.md").read_text()
    assert md.startswith("<!-- regenerate: python tools/reproduce.py ")
    assert md.count("\n| ") == 8  # header, separator and 6 rows
    assert "+-" in md and "Teacher val accuracy" in md

    with Image.open(out / "results.png") as im:
        assert im.size == (800, 400)
        assert len(set(im.convert("L").getdata())) > 2
