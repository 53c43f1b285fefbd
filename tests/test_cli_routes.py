"""The `distill` command's routes, run as a user runs them (a subprocess): help without loading the
heavy libraries, a teacher given as plain weights, a shipped recipe by name with step 1 skipped."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_trainer

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "lightning", "timm", "torchvision", "wandb")
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32",
]


def distill(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m distill.cli ARGS` with this checkout's package, W&B offline, one torch thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------------- startup
@pytest.mark.parametrize("argv", [["--help"], ["pipeline", "--help"], [], ["export", "--help"], ["predict", "--help"],
                                  ["attention", "--help"], ["push", "--help"], ["study", "--help"]],
                         ids=["distill", "pipeline", "bare", "export", "predict", "attention", "push", "study"])
def test_help_does_not_import_torch_lightning_or_timm(argv):
    code = ("import sys\nfrom distill.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower() or "distill pipeline" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "[]"
    if argv in ([], ["--help"]):  # the top-level help names the shipped recipes
        assert ", ".join(sorted(p.name for p in (REPO / "recipes").iterdir() if p.is_dir())) in res.stdout


def test_import_distill_is_lazy_and_keeps_its_names():
    code = (f"import sys, distill\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
            "from distill import DistillModule, ImageDataModule\n"
            "print(all(getattr(distill, n) is not None for n in distill.__all__), DistillModule.__module__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["[]", "True distill.student.module"]
    import distill

    assert set(distill.__all__) <= set(dir(distill))
    with pytest.raises(AttributeError):
        distill.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------ teacher routes
def _plain_teacher(root: Path, datamodule) -> Path:
    """A default-width cifar_resnet10 trained 3 steps, saved as a plain safetensors state_dict (no
    architecture, classes or channels recorded: what a teacher from elsewhere looks like)."""
    from safetensors.torch import save_file

    from distill import TeacherModule, build_teacher

    L.seed_everything(0, workers=True)
    trainer = make_trainer(root, max_steps=3, limit_val_batches=1)
    trainer.fit(TeacherModule("cifar_resnet10"), datamodule)
    trainer.save_checkpoint(root / "teacher.ckpt")
    network = build_teacher("cifar_resnet10", checkpoint=root / "teacher.ckpt")
    path = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


SYNTHETIC_RGB = ["--data.source", "synthetic", "--data.num_samples", "160", "--data.in_chans_synthetic", "3"]


@pytest.mark.parametrize("data", [
    pytest.param(SYNTHETIC_RGB, id="rgb"),
    pytest.param([], id="digits-grayscale"),  # the channel count is read from the file's first convolution
])
def test_pipeline_with_a_plain_safetensors_teacher(tmp_path, data):
    from distill import ImageDataModule

    dm = (ImageDataModule("synthetic", img_size=8, batch_size=32, num_samples=160, in_chans_synthetic=3) if data
          else ImageDataModule("digits", img_size=8, batch_size=32))
    teacher = _plain_teacher(tmp_path / "t", dm)
    out = tmp_path / "out"
    res = distill("pipeline", "digits", "--out", str(out), "--teacher_ckpt", str(teacher),
                  "--student.model.init_args.teacher_model", "cifar_resnet10", *TINY, *data)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["skipped"] and not (out / "teacher").exists()
    ckpt = torch.load(summary["student"]["checkpoint"], map_location="cpu", weights_only=True)
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert ckpt["hyper_parameters"]["teacher_sha256"] == digest
    assert ckpt["hyper_parameters"]["teacher_model"] == "cifar_resnet10"
    assert ckpt["distill_teacher"]["sha256"] == digest and ckpt["distill_teacher"]["architecture"] == "cifar_resnet10"
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    # the summary's accuracies, counted by hand: the student checkpoint's fused heads, and the teacher (step 1
    # skipped: as step 2 measured it) read from the plain file on the validated batches of the run's data
    from distill import FrozenTeacher
    from helpers.by_hand import student_and_teacher_accuracies, validation_batches

    run_dm = (ImageDataModule("synthetic", img_size=8, batch_size=64, num_samples=160, in_chans_synthetic=3) if data
              else ImageDataModule("digits", img_size=8, batch_size=64))
    val = validation_batches(run_dm, 2)
    frozen = FrozenTeacher.load(teacher, arch="cifar_resnet10")
    frozen.adapt_to(run_dm.mean, run_dm.std, run_dm.in_chans)
    by_hand = student_and_teacher_accuracies(summary["student"]["checkpoint"], frozen, val)
    assert summary["student"]["val/acc"] == pytest.approx(by_hand["val/acc"], abs=1e-6)
    assert summary["teacher"]["val/acc"] == pytest.approx(by_hand["val/acc_teacher"], abs=1e-6)


def test_shipped_recipe_by_name_with_a_teacher_checkpoint_skips_step_1(tiny_teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    res = distill("pipeline", "digits", "--out", str(out), "--teacher_ckpt", str(tiny_teacher_ckpt), *TINY,
                  cwd=tmp_path)  # by name, from a folder without recipes/
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "teacher").exists()  # no step 1
    assert "[teacher]" not in res.stdout and "[student]" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == str(REPO / "recipes" / "digits")
    assert summary["teacher"]["skipped"] is True and summary["teacher"]["checkpoint"] == str(tiny_teacher_ckpt)
    line = next(x for x in res.stdout.splitlines() if x.startswith("teacher  val/acc"))
    assert "step 1 skipped" in line and str(tiny_teacher_ckpt) in line
    ckpt = torch.load(summary["student"]["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["teacher"] == str(tiny_teacher_ckpt.resolve())
    assert ckpt["hyper_parameters"]["teacher_sha256"] == hashlib.sha256(tiny_teacher_ckpt.read_bytes()).hexdigest()
