"""The `distill` command end to end on digits with tiny overrides: pipeline, recipes, W&B offline,
resume from `last`, export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.commands.main import main
from distill.commands.pipeline import run_pipeline, split_overrides
from distill.commands.recipe_cli import DistillCLI
from helpers.wandb_records import WandbRun, finish_and_flush

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (REPO / "recipes").glob("*/*.yaml") if p.name.startswith(("teacher", "student")))
GUIDANCE = sorted((REPO / "recipes").glob("*/guidance.yaml"))  # configs added on top of a student recipe
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--teacher.model.init_args.model", "cifar_resnet10",
    "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32",
]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    os.environ["WANDB_MODE"] = "offline"  # never reach the network from tests
    out = tmp_path_factory.mktemp("pipeline")
    summary = run_pipeline(str(REPO / "recipes/digits"), str(out),
                           [*TINY, "--logger", "wandb", "--wandb.project", "distill-test", "--trainer.log_every_n_steps", "1"])
    return out, summary


def test_pipeline_tracks_both_steps_in_wandb_with_teacher_lineage(pipeline_run):
    out, summary = pipeline_run
    teacher_runs = list((out / "teacher" / "wandb").glob("offline-run-*"))
    student_runs = list((out / "student" / "wandb").glob("offline-run-*"))
    assert len(teacher_runs) == 1 and len(student_runs) == 1
    teacher_id = teacher_runs[0].name.rsplit("-", 1)[-1]
    finish_and_flush()
    teacher, student = WandbRun(teacher_runs[0]), WandbRun(student_runs[0])
    assert {"train/loss", "val/acc"} <= teacher.metric_keys()
    assert {"train/loss_distill", "val/acc_dist", "val/agreement"} <= student.metric_keys()
    lineage = student.config["teacher_lineage"]
    sha = torch.load(summary["student"]["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]["teacher_sha256"]
    assert lineage["run_id"] == teacher_id and lineage["sha256"] == sha
    assert lineage["path"] == str(Path(summary["teacher"]["checkpoint"]).resolve())


@pytest.mark.parametrize("mode,size,classes", [("RGB", 12, 3), ("L", 20, 2)])
def test_pipeline_trains_on_any_image_folder(tmp_path, mode, size, classes):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(24 if split == "train" else 6):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    summary = run_pipeline(str(REPO / "recipes/digits"), str(tmp_path / "out"),
                           [*TINY, "--data.source", "imagefolder", "--data.root", str(tmp_path / "data"),
                            "--data.batch_size", "8"])
    assert 0.0 <= summary["student"]["val/acc"] <= 1.0
    ckpt = torch.load(summary["student"]["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["data"]["class_names"] == [f"class{c}" for c in range(classes)]
    assert ckpt["hyper_parameters"]["student"]["in_chans"] == (3 if mode == "RGB" else 1)


def test_pipeline_runs_both_steps_and_writes_summary(pipeline_run):
    from distill import FrozenTeacher, ImageDataModule
    from helpers.by_hand import student_and_teacher_accuracies, validation_batches

    out, summary = pipeline_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["teacher"]["checkpoint"] == summary["teacher"]["checkpoint"]
    # the summary's numbers are those of the chosen checkpoints, counted by hand on the validated batches
    # (limit_val_batches 2 of the digits recipe's 64): student heads, teacher, agreement; step 1's teacher
    # accuracy is the one step 2 measures on the same images
    batches = validation_batches(ImageDataModule("digits", img_size=8, batch_size=64), 2)
    teacher = FrozenTeacher.load(on_disk["teacher"]["checkpoint"])
    by_hand = student_and_teacher_accuracies(on_disk["student"]["checkpoint"], teacher, batches)
    for key, value in by_hand.items():
        assert on_disk["student"][key] == pytest.approx(value, abs=1e-6), key
    assert on_disk["teacher"]["val/acc"] == pytest.approx(by_hand["val/acc_teacher"], abs=1e-6)
    assert on_disk["seconds"] > 0
    # step 2 used step 1's best checkpoint
    ckpt = torch.load(on_disk["student"]["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["teacher"] == str(Path(on_disk["teacher"]["checkpoint"]).resolve())
    assert (out / "teacher" / "metrics.csv").is_file() and (out / "student" / "metrics.csv").is_file()
    assert (out / "student" / "config.yaml").is_file()


def test_the_summary_takes_each_number_from_its_own_metric(tmp_path, monkeypatch, tiny_teacher_ckpt):
    """Which metric lands where in summary.json, with training replaced by distinct numbers: the student's
    five from step 2, the teacher's accuracy from step 1 or, step 1 skipped, from step 2's val/acc_teacher."""
    import distill.commands.pipeline as pipeline

    student = {"val/acc": 0.11, "val/acc_cls": 0.22, "val/acc_dist": 0.33, "val/acc_teacher": 0.44, "val/agreement": 0.55}

    def run_step(config, args, root, score="best", resume=None):
        if config.name == "teacher.yaml":
            return str(root / "teacher.ckpt"), {"val/acc": 0.66}, 1.0
        return str(root / "student.ckpt"), dict(student), 2.0

    monkeypatch.setattr(pipeline, "run_step", run_step)
    both = run_pipeline(str(REPO / "recipes/digits"), str(tmp_path / "both"))
    assert both["teacher"]["val/acc"] == 0.66 and {k: both["student"][k] for k in student} == student
    skipped = run_pipeline(str(REPO / "recipes/digits"), str(tmp_path / "skipped"), teacher_ckpt=str(tiny_teacher_ckpt))
    assert skipped["teacher"]["skipped"] and skipped["teacher"]["val/acc"] == 0.44
    assert json.loads((tmp_path / "skipped" / "summary.json").read_text())["teacher"]["val/acc"] == 0.44


def test_the_revalidation_in_a_real_pipeline_log_is_not_an_epoch(pipeline_run):
    """The pipeline validates the chosen checkpoint again after training; in the metrics.csv Lightning writes,
    that row carries the epoch after the last one trained. tools/plot_run.py and tools/pipeline_seeds.py
    leave it out of the curves and of the last-epoch figure (their other tests use hand-written CSVs:
    this one catches a change in how Lightning logs it)."""
    import csv

    from conftest import load_tool

    plot_run, pipeline_seeds = load_tool("plot_run"), load_tool("pipeline_seeds")
    out, summary = pipeline_run
    for step in ("teacher", "student"):
        rows = list(csv.DictReader(open(out / step / "metrics.csv")))
        assert {int(r["epoch"]) for r in rows if r.get("train/loss")} == {0}  # one epoch trained
        validations = [(int(r["epoch"]), float(r["val/acc"])) for r in rows if r.get("val/acc")]
        assert [e for e, _ in validations] == [0, 1], validations  # epoch 0, then the re-validation as "epoch 1"
        assert validations[1][1] == pytest.approx(summary[step]["val/acc"], abs=1e-6)  # what the summary prints
        assert plot_run.read_curves(out / step / "metrics.csv")["val/acc"] == ([0], [validations[0][1]])
    student_epoch0 = [float(r["val/acc"]) for r in csv.DictReader(open(out / "student" / "metrics.csv"))
                      if r.get("val/acc") and r["epoch"] == "0"]
    assert pipeline_seeds.last_epoch_acc(out / "student") == student_epoch0[0]


def test_student_checkpoints_hold_no_teacher_weights(pipeline_run):
    out, _ = pipeline_run
    ckpts = sorted((out / "student" / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt"} and len(ckpts) == 2  # best and last
    for p in ckpts:
        sd = torch.load(p, map_location="cpu", weights_only=True)["state_dict"]
        assert not [k for k in sd if k.startswith("teacher.")]
        assert any(k.startswith("student.") for k in sd)


def test_step_overrides_go_to_one_step_only():
    steps = split_overrides(["--trainer.max_epochs", "3", "--teacher.model.init_args.lr=0.1", "--student.x", "y"])
    assert steps["teacher"] == ["--trainer.max_epochs", "3", "--model.init_args.lr", "0.1"]
    assert steps["student"] == ["--trainer.max_epochs", "3", "--x", "y"]
    with pytest.raises(ValueError, match="has no value"):
        split_overrides(["--trainer.max_epochs"])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_parses(recipe):
    config = DistillCLI.parse_recipe(["--config", str(recipe)])
    assert config.model.class_path in ("distill.TeacherModule", "distill.DistillModule")
    assert config.trainer.max_epochs > 0 or (config.trainer.max_steps or -1) > 0  # an end: epochs or steps


@pytest.mark.parametrize("guidance", GUIDANCE, ids=lambda p: p.parent.name)
def test_guidance_configs_add_feature_guidance_to_their_student(guidance):
    config = DistillCLI.parse_recipe(["--config", str(guidance.parent / "student.yaml"), "--config", str(guidance)])
    fg = config.model.init_args.feature_guidance
    assert fg is not None and len(fg.student_blocks) == len(fg.teacher_layers) > 0
    assert config.model.init_args.teacher_cache is None  # guidance reads the live teacher


def test_unknown_recipe_key_is_a_one_line_error(tmp_path, capsys):
    code = main(["fit", "--config", str(REPO / "recipes/digits/teacher.yaml"), "--model.init_args.lrr", "0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "distill: error: model: Option 'lrr' is not accepted (run with --help to list the accepted fields)"


def test_wandb_offline_writes_a_run_with_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    root = tmp_path / "run"
    code = main(["fit", "--config", str(REPO / "recipes/digits/teacher.yaml"), *TINY[:10],
                 "--model.init_args.model", "cifar_resnet10", "--trainer.default_root_dir", str(root),
                 "--trainer.log_every_n_steps", "1", "--logger", "wandb", "--wandb.project", "distill-test", "--wandb.tags", "[digits, test]"])
    assert code == 0
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    finish_and_flush()
    run = WandbRun(runs[0])
    assert {"val/acc", "train/loss"} <= run.metric_keys()
    assert all(0.0 <= row["val/acc"] <= 1.0 for row in run.history if "val/acc" in row)
    assert run.config["recipe"]["model"]["init_args"]["model"] == "cifar_resnet10"
    assert sorted(run.tags) == ["digits", "test"]
    assert (root / "metrics.csv").is_file()  # the CSV log is kept beside W&B


def test_resume_from_last_continues_training(tmp_path):
    root = tmp_path / "run"
    base = ["fit", "--config", str(REPO / "recipes/digits/teacher.yaml"), "--model.init_args.model", "cifar_resnet10",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]
    assert main([*base, "--trainer.max_epochs", "1"]) == 0
    last = root / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert first["global_step"] == 2
    assert main([*base, "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert second["global_step"] == 4 and second["epoch"] == 1
    assert second["optimizer_states"][0]["state"]  # optimizer state restored and carried on
    assert second["lr_schedulers"][0]["last_epoch"] == 4


@pytest.mark.parametrize("head", ["cls", "dist", "fused"])
def test_export_safetensors_reloads_in_timm_with_equal_outputs(pipeline_run, tmp_path, head):
    import timm
    from safetensors.torch import load_file, safe_open

    from distill import load_student, student_heads

    out, summary = pipeline_run
    ckpt = summary["student"]["checkpoint"]
    file = tmp_path / f"student-{head}.safetensors"
    assert main(["export", ckpt, "--format", "safetensors", "--head", head, "--out", str(file)]) == 0
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_model"], **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(file)))
    model.eval()
    original = load_student(ckpt)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        z_cls, z_dist = student_heads(original, x)
        expected = {"cls": z_cls, "dist": z_dist, "fused": (z_cls + z_dist) / 2}[head]
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_export_onnx_runs_in_onnxruntime_with_equal_outputs(pipeline_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from distill import load_student

    out, summary = pipeline_run
    ckpt = summary["student"]["checkpoint"]
    file = tmp_path / "student.onnx"
    assert main(["export", ckpt, "--format", "onnx", "--head", "fused", "--out", str(file)]) == 0
    x = torch.randn(3, 1, 8, 8)
    got = ort.InferenceSession(str(file)).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        expected = load_student(ckpt)(x).numpy()
    assert abs(got - expected).max() < 1e-4


def test_console_script_help():
    exe = Path(sys.executable).with_name("distill")
    res = subprocess.run([str(exe), "fit", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0 and "--config" in res.stdout and "--data.source" in res.stdout


def test_resume_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    root = tmp_path / "run"
    base = ["fit", "--config", str(REPO / "recipes/digits/teacher.yaml"), "--model.init_args.model", "cifar_resnet10",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
            "false", "--trainer.default_root_dir", str(root), "--logger", "wandb"]
    assert main([*base, "--trainer.max_epochs", "1"]) == 0
    first_id = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["distill_run"]["wandb_id"]
    assert first_id
    assert main([*base, "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    runs = sorted((root / "wandb").glob("offline-run-*"))
    # one W&B run id, written twice (two folders, or one when both starts fall in the same second)
    assert runs and all(r.name.endswith(first_id) for r in runs)
    assert torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["distill_run"]["wandb_id"] == first_id


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit|validate|test|predict", "pipeline", "export", "attention", "predict CKPT"):
        assert f"distill {command}" in out
    assert main([]) == 2


@pytest.mark.slow
def test_wandb_without_network_falls_back_to_offline(tmp_path, monkeypatch):
    # credentials, but the server cannot be reached: the run goes on offline instead of failing
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    root = tmp_path / "run"
    code = main(["fit", "--config", str(REPO / "recipes/digits/teacher.yaml"), "--model.init_args.model", "cifar_resnet10",
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), "--logger", "wandb"])
    assert code == 0
    assert len(list((root / "wandb").glob("offline-run-*"))) == 1
    assert (root / "checkpoints" / "last.ckpt").is_file()


def test_run_step_scores_by_the_last_checkpoint_when_asked(tmp_path, monkeypatch):
    """`run_step(score="last")` (tools/reproduce.py --score last): the last checkpoint and its metrics,
    not the best one, here a checkpoint chosen at epoch 0 by a monitored value that peaks there."""
    import csv

    from distill.commands.pipeline import run_step

    monkeypatch.syspath_prepend(str(REPO / "tests" / "helpers"))
    root = tmp_path / "run"
    args = [*TINY[:10], "--trainer.max_epochs", "2", "--model.init_args.model", "cifar_resnet10",
            "--model.init_args.model_kwargs", '{"base_width": 8}', "--checkpoint.monitor", "val/probe_peak",
            "--trainer.callbacks", '[{"class_path": "probes.PeakAtFirstEpoch"}]']
    ckpt, metrics, _ = run_step(REPO / "recipes/digits/teacher.yaml", args, root, score="last")
    assert ckpt == str(root / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 1
    rows = [r for r in csv.DictReader(open(root / "metrics.csv")) if r.get("val/acc")]
    epoch1 = [float(r["val/acc"]) for r in rows if r["epoch"] == "1"]
    assert metrics["val/acc"] == pytest.approx(epoch1[0], abs=1e-6)  # the last epoch's weights, validated again


def test_wandb_without_credentials_logs_offline_with_its_name_entity_and_group(tmp_path, monkeypatch, caplog):
    """No WANDB_MODE, no WANDB_API_KEY, an empty home (no ~/.netrc, no wandb settings): the run logs offline
    at once, without trying the server, and --wandb.name/entity/group reach the run."""
    import logging

    home = tmp_path / "home"
    home.mkdir()
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing real is reached, whatever happens
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    root = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="distill"):
        code = main(["fit", "--config", str(REPO / "recipes/digits/teacher.yaml"), *TINY[:10],
                     "--model.init_args.model", "cifar_resnet10", "--model.init_args.model_kwargs", '{"base_width": 8}',
                     "--trainer.default_root_dir", str(root), "--logger", "wandb", "--wandb.project", "distill-test",
                     "--wandb.name", "tiny-teacher", "--wandb.entity", "my-team", "--wandb.group", "study-1"])
    assert code == 0
    assert "W&B: no credentials found" in caplog.text and "cannot reach the server" not in caplog.text, caplog.text
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    finish_and_flush()
    run = WandbRun(runs[0])
    record = next(r.run for r in run.records if r.WhichOneof("record_type") == "run")
    assert (record.display_name, record.entity, record.run_group, record.project) == (
        "tiny-teacher", "my-team", "study-1", "distill-test")
    assert "val/acc" in run.metric_keys()
