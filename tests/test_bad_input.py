"""Bad input: one line naming the problem and the fix, a non-zero exit, no traceback, nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill import build_teacher
from distill.commands.main import main

REPO = Path(__file__).resolve().parent.parent
TEACHER = str(REPO / "recipes/digits/teacher.yaml")
STUDENT = str(REPO / "recipes/digits/student.yaml")


def run_fails(capsys, root: Path, *args: str) -> str:
    code = main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
                 "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("distill: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not (root / "checkpoints").exists()  # nothing half-written
    return lines[0]


def fake_teacher(path: Path, num_classes: int = 10, class_names=None) -> Path:
    """A step-1 checkpoint as the toolkit writes it, without training."""
    net = build_teacher("cifar_resnet10", num_classes=num_classes, in_chans=1)
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"model": "cifar_resnet10", "num_classes": num_classes, "in_chans": 1,
                                     "class_names": class_names or [str(i) for i in range(num_classes)],
                                     "input_size": 8, "distill_kind": "teacher"}}, path)
    return path


def test_wrong_type(capsys, tmp_path):
    line = run_fails(capsys, tmp_path, "--config", TEACHER, "--data.batch_size", "abc")
    assert "data.batch_size" in line and "int" in line


def test_missing_teacher_checkpoint(capsys, tmp_path):
    line = run_fails(capsys, tmp_path, "--config", STUDENT, "--model.init_args.teacher", str(tmp_path / "nope.ckpt"))
    assert "does not exist" in line and "model.teacher" in line


def test_corrupted_teacher_checkpoint(capsys, tmp_path):
    bad = tmp_path / "teacher.ckpt"
    good = fake_teacher(tmp_path / "good.ckpt").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    line = run_fails(capsys, tmp_path / "run", "--config", STUDENT, "--model.init_args.teacher", str(bad))
    assert "corrupted" in line


def test_student_checkpoint_as_teacher(capsys, tmp_path):
    path = tmp_path / "student.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"distill_kind": "student"}}, path)
    line = run_fails(capsys, tmp_path / "run", "--config", STUDENT, "--model.init_args.teacher", str(path))
    assert "student (step 2) checkpoint" in line and "teacher (step 1)" in line


def test_teacher_with_other_number_of_classes(capsys, tmp_path):
    path = fake_teacher(tmp_path / "t.ckpt", num_classes=5)
    line = run_fails(capsys, tmp_path / "run", "--config", STUDENT, "--model.init_args.teacher", str(path))
    assert "5 classes" in line and "10" in line


def test_teacher_with_classes_in_another_order(capsys, tmp_path):
    path = fake_teacher(tmp_path / "t.ckpt", class_names=[str(i) for i in reversed(range(10))])
    line = run_fails(capsys, tmp_path / "run", "--config", STUDENT, "--model.init_args.teacher", str(path))
    assert "differ in order" in line


def _folder(root: Path, n_per_class: int = 3, bad: int = 0) -> Path:
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                Image.fromarray(np.full((8, 8), (40 * i) % 256, np.uint8)).save(d / f"{i}.png")
            for i in range(bad if split == "train" else 0):
                (d / f"broken{i}.jpg").write_bytes(b"not an image")
    return root


def test_image_folder_missing(capsys, tmp_path):
    line = run_fails(capsys, tmp_path / "run", "--config", TEACHER, "--data.source", "imagefolder",
                     "--data.root", str(tmp_path / "missing"))
    assert "data.root" in line and "train/" in line


def test_image_folder_empty(capsys, tmp_path):
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
    line = run_fails(capsys, tmp_path / "run", "--config", TEACHER, "--data.source", "imagefolder",
                     "--data.root", str(tmp_path / "data"))
    assert "no images" in line


def test_image_folder_with_too_many_unreadable_files(capsys, tmp_path):
    root = _folder(tmp_path / "data", n_per_class=3, bad=2)
    line = run_fails(capsys, tmp_path / "run", "--config", TEACHER, "--data.source", "imagefolder",
                     "--data.root", str(root), "--data.batch_size", "2")
    assert "unreadable" in line and "max_bad_fraction" in line


def test_a_few_unreadable_files_are_skipped_with_a_count(tmp_path, caplog):
    from distill import ImageDataModule

    root = _folder(tmp_path / "data", n_per_class=60, bad=1)
    dm = ImageDataModule("imagefolder", str(root), img_size=8, batch_size=4, max_bad_fraction=0.05)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert len(dm.train_set) == 120
    assert any("skipping 2 unreadable" in r.getMessage() for r in caplog.records)


def test_img_size_not_divisible_by_patch_size(capsys, tmp_path):
    path = fake_teacher(tmp_path / "t.ckpt")
    line = run_fails(capsys, tmp_path / "run", "--config", STUDENT, "--model.init_args.teacher", str(path),
                     "--model.init_args.student.patch_size", "3")
    assert "not divisible" in line and "patch_size=3" in line


@pytest.mark.parametrize("field,value,words", [("alpha", "1.5", "alpha=1.5 must lie in [0, 1]"),
                                               ("tau", "0", "tau=0.0 must be > 0"),
                                               ("mode", "medium", "mode")])
def test_loss_fields(capsys, tmp_path, field, value, words):
    line = run_fails(capsys, tmp_path, "--config", STUDENT, f"--model.init_args.loss.{field}", value)
    assert words in line


def test_alpha_1_with_a_distillation_token_is_refused(capsys, tmp_path):
    """At alpha 1 the class head gets no gradient, yet val/acc, the best checkpoint and the default export
    fuse it with the distillation head: refused before anything runs, naming the field and both ways out."""
    line = run_fails(capsys, tmp_path, "--config", STUDENT, "--model.init_args.loss.alpha", "1")
    assert "model.init_args.loss.alpha=1" in line and "class head" in line
    assert "model.init_args.student.distilled: false" in line and "alpha below 1" in line


def test_unknown_model_name_suggests_close_names(capsys, tmp_path):
    line = run_fails(capsys, tmp_path, "--config", TEACHER, "--model.init_args.model", "resnet19")
    assert "not a timm model" in line and "resnet18" in line


def test_batch_larger_than_dataset_with_drop_last(capsys, tmp_path):
    line = run_fails(capsys, tmp_path, "--config", TEACHER, "--data.batch_size", "4096")
    assert "data.batch_size=4096" in line and "drop_last" in line


def test_large_folders_skip_unreadable_files_while_reading(tmp_path, monkeypatch):
    from distill.data.datasets import ImageFolderDataset

    root = _folder(tmp_path / "data", n_per_class=20, bad=1) / "train"
    monkeypatch.setattr(ImageFolderDataset, "verify_limit", 10)  # as if the folder were too large to check
    ds = ImageFolderDataset(root, ["a", "b"], "L", max_bad_fraction=0.1)
    assert len(ds) == 42  # nothing checked up front
    labels = [ds[i][1] for i in range(len(ds))]  # the broken files are replaced by their neighbours
    assert len(ds._bad_seen) == 2 and labels.count(0) == 21
    strict = ImageFolderDataset(root, ["a", "b"], "L", max_bad_fraction=0.01)
    with pytest.raises(ValueError, match="unreadable"):
        [strict[i] for i in range(len(strict))]


def test_a_validation_class_folder_that_train_lacks_is_refused(capsys, tmp_path):
    """A typo in val/ (`Cat` for `cat`) would leave that folder's images out of every score without a word."""
    root = _folder(tmp_path / "data", n_per_class=3)
    classes = sorted(d.name for d in (root / "train").iterdir())
    (root / "val" / classes[0]).rename(root / "val" / classes[0].upper())
    line = run_fails(capsys, tmp_path / "run", "--config", TEACHER, "--data.source", "imagefolder",
                     "--data.root", str(root), "--data.batch_size", "2")
    assert f"has class folder(s) '{classes[0].upper()}' that train/ lacks (train/ has {', '.join(classes)})" in line


def test_a_class_without_validation_images_is_said_in_one_line(tmp_path, caplog):
    from distill import ImageDataModule

    root = _folder(tmp_path / "data", n_per_class=3)
    classes = sorted(d.name for d in (root / "train").iterdir())
    for f in (root / "val" / classes[1]).iterdir():
        f.unlink()
    with caplog.at_level("WARNING"):
        ImageDataModule("imagefolder", str(root), img_size=8, batch_size=2).setup("fit")
    said = [r.getMessage() for r in caplog.records if "has no images of class(es)" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(f"{classes[1]}: their accuracy is not measured")
