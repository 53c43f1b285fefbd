"""What a published export says about itself is true and private to nothing: numbers measured at
another step than the checkpoint's are said to be (model card, config.json, a student's teacher
lineage), and no file of the folder holds a path of the machine that trained it."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_STUDENT, TINY_TEACHER, make_trainer

from distill import DistillationLoss, DistillModule, ImageDataModule, StudentConfig, TeacherModule
from distill.models.weights import load_weights_file
from distill.sharing.hf_export import export_hf

REPO = Path(__file__).resolve().parent.parent


def _results_intro(card: str) -> str:
    """The sentence above the results table."""
    text = card.split("## Results", 1)[1]
    return text.strip().split("\n\n", 1)[0]


def _teacher_line(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("- **Teacher**"))


@pytest.fixture(scope="module")
def validated_before_saved(tmp_path_factory):
    """A teacher fit for 3 epochs of 2 steps, validated every 2 epochs (once, at epoch 1, step 4), then
    saved with trainer.save_checkpoint at the end (epoch 3, step 6): its weights were never validated."""
    root = tmp_path_factory.mktemp("stale")
    L.seed_everything(0)
    module = TeacherModule(**TINY_TEACHER, lr=3e-2)
    trainer = make_trainer(root / "teacher_run", max_epochs=3, limit_train_batches=2, limit_val_batches=2,
                           check_val_every_n_epoch=2)
    trainer.fit(module, ImageDataModule("digits", img_size=8, batch_size=32))
    ckpt = root / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)
    return root, ckpt


def test_a_checkpoint_written_after_the_last_validation_says_where_its_numbers_were_measured(validated_before_saved):
    root, ckpt = validated_before_saved
    run = load_weights_file(ckpt)["distill_run"]
    assert (run["epoch"], run["global_step"]) == (3, 6)
    assert run["metrics_at"] == {"epoch": 1, "global_step": 4} and "val/acc" in run["metrics"]

    export_hf(ckpt, root / "teacher_export", wandb_link=False)
    record = json.loads((root / "teacher_export" / "config.json").read_text())["distill"]
    assert record["metrics_at"] == {"epoch": 1, "global_step": 4} and record["global_step"] == 6
    intro = _results_intro((root / "teacher_export" / "README.md").read_text())
    print(intro)
    assert "measured at epoch 1, step 4" in intro and "epoch 3, step 6" in intro
    assert "earlier weights" in intro and "this checkpoint's weights" not in intro

    # a checkpoint of an older distill records no metrics_at: the card cannot say they are its own
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    del obj["distill_run"]["metrics_at"]
    torch.save(obj, root / "older.ckpt")
    export_hf(root / "older.ckpt", root / "older_export", wandb_link=False)
    intro = _results_intro((root / "older_export" / "README.md").read_text())
    assert "did not record where" in intro and "epoch 3, step 6" in intro and "measured at" not in intro


def test_a_students_teacher_accuracy_says_where_it_was_measured(validated_before_saved):
    root, teacher_ckpt = validated_before_saved
    export_hf(teacher_ckpt, root / "teacher_dir", wandb_link=False)
    for source in (str(teacher_ckpt), f"local-dir:{root / 'teacher_dir'}"):  # the file, and its export
        identity = DistillModule(StudentConfig(**TINY_STUDENT), source, DistillationLoss("hard")).teacher_identity
        assert identity["val_acc_at"] == {"epoch": 1, "global_step": 4}, source
        assert identity["weights_at"] == {"epoch": 3, "global_step": 6}, source

    L.seed_everything(0)
    module = DistillModule(StudentConfig(**TINY_STUDENT), str(teacher_ckpt), DistillationLoss("hard"))
    trainer = make_trainer(root / "student_run", max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, ImageDataModule("digits", img_size=8, batch_size=32))
    student_ckpt = root / "student.ckpt"
    trainer.save_checkpoint(student_ckpt)  # after the last validation, at its step: the student's own numbers
    export_hf(student_ckpt, root / "student_export", wandb_link=False)
    card = (root / "student_export" / "README.md").read_text()
    line = _teacher_line(card)
    print(line)
    assert "measured at epoch 1, step 4" in line and "epoch 3, step 6" in line and "earlier weights" in line
    intro = _results_intro(card)
    print(intro)
    assert "this checkpoint's weights" in intro and "earlier weights" not in intro
    record = json.loads((root / "student_export" / "config.json").read_text())["distill"]
    assert record["teacher"]["val_acc_at"] == {"epoch": 1, "global_step": 4}


def test_no_file_of_an_export_holds_a_path_of_the_training_machine(tiny_teacher_ckpt, tmp_path, monkeypatch):
    """A pipeline-like layout under tmp_path, trained and exported with absolute paths throughout."""
    import shutil

    from distill.commands.main import main

    teacher = tmp_path / "teacher" / "checkpoints" / "best.ckpt"
    teacher.parent.mkdir(parents=True)
    shutil.copyfile(tiny_teacher_ckpt, teacher)
    run = tmp_path / "student"
    student = ["--model.init_args.student.embed_dim", "32", "--model.init_args.student.depth", "1",
               "--model.init_args.student.num_heads", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--config", str(REPO / "recipes/digits/student.yaml"), *student,
                     "--model.init_args.teacher", str(teacher), "--trainer.default_root_dir", str(run),
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                     "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]) == 0
        assert str(run) in (run / "config.yaml").read_text()  # what the run keeps for itself
        out = tmp_path / "export"
        assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--format", "hf", "--out", str(out),
                     "--wandb", "off"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", "recipe.yaml"}
    private = {str(tmp_path), str(tmp_path.resolve()), str(Path.home()), str(REPO), str(REPO.resolve())}
    for file in out.iterdir():
        content = file.read_bytes()
        leaked = [p for p in private if p.encode() in content]
        assert not leaked, f"{file.name} holds {leaked}"

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    print(*(out / "recipe.yaml").read_text().splitlines()[:3], sep="\n")
    assert recipe["model"]["init_args"]["teacher"] == "../teacher/checkpoints/best.ckpt"  # beside the run
    assert "default_root_dir" not in recipe["trainer"]  # the run's own place: dropped, and said so
    assert "trainer.default_root_dir" in (out / "recipe.yaml").read_text().splitlines()[2]
    card = (out / "README.md").read_text()
    assert "distill export ./checkpoints/last.ckpt --format hf --out ../export --wandb off" in card


def test_paths_under_the_checkout_stay_relative_to_it_and_others_are_dropped(tmp_path):
    from distill.sharing.portable import portable_recipe

    run = tmp_path / "runs" / "student"
    recipe = {"data": {"root": str(REPO / "data" / "cifar10-small"), "source": "imagefolder"},
              "model": {"init_args": {"student": {"name": f"local-dir:{tmp_path / 'runs' / 'export'}",
                                                  "pretrained": str(Path.home() / "weights" / "vit.pth")},
                                      "teacher": "runs/digits/teacher/checkpoints/last.ckpt"}},
              "trainer": {"default_root_dir": str(run), "callbacks": [str(run / "probe.py"), "/etc/x"]},
              "checkpoint": {"monitor": "val/acc"}, "url": "https://huggingface.co/me/model"}
    portable, dropped = portable_recipe(recipe, run)
    assert portable["data"] == {"root": "data/cifar10-small", "source": "imagefolder"}
    assert portable["model"]["init_args"] == {"student": {"name": "local-dir:../export"},
                                              "teacher": "runs/digits/teacher/checkpoints/last.ckpt"}
    assert portable["trainer"] == {"callbacks": ["./probe.py"]}
    assert portable["checkpoint"] == {"monitor": "val/acc"} and portable["url"] == recipe["url"]
    assert dropped == ["model.init_args.student.pretrained", "trainer.default_root_dir", "trainer.callbacks[1]"]
    # the card's command line (and its "started from"): made relative, or cut to the file's name
    from distill.sharing.portable import portable_command

    command = f"distill export {run / 'checkpoints' / 'last.ckpt'} --out={Path.home() / 'exports' / 'vit'} --head cls"
    assert portable_command(command, run) == "distill export ./checkpoints/last.ckpt --out=vit --head cls"
    assert portable_command(f"local-dir:{Path.home() / 'hub' / 'vit-tiny'}", run) == "vit-tiny"
