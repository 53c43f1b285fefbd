"""`distill predict`: top-k per head equals a direct forward of the student (and of the teacher)."""
from __future__ import annotations

import csv
import io
import json
import runpy
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from distill import (DistillationLoss, DistillModule, ImageDataModule, StudentConfig, TeacherModule, build_teacher,
                     load_student, student_heads)
from distill.commands.predict import find_images, main as predict_main, predict


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), **kwargs)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A student at 8x8 and a teacher at 16x16 (other size, other mean/std), both on digits, 2 steps each."""
    root = tmp_path_factory.mktemp("predict")
    L.seed_everything(0)
    student_dm = ImageDataModule("digits", img_size=8, batch_size=32)
    student = DistillModule(StudentConfig(patch_size=2, embed_dim=32, depth=1, num_heads=2),
                            loss=DistillationLoss("none"), lr=1e-2, warmup_epochs=0)
    t = quiet_trainer(root, max_steps=2, limit_val_batches=0)
    t.fit(student, student_dm)
    t.save_checkpoint(root / "student.ckpt")
    teacher_dm = ImageDataModule("digits", img_size=16, batch_size=32)
    teacher = TeacherModule("cifar_resnet10", model_kwargs={"base_width": 8}, lr=1e-2, warmup_epochs=0)
    t = quiet_trainer(root, max_steps=2, limit_val_batches=0)
    t.fit(teacher, teacher_dm)
    t.save_checkpoint(root / "teacher.ckpt")
    return dict(student=root / "student.ckpt", teacher=root / "teacher.ckpt", student_dm=student_dm,
                teacher_dm=teacher_dm)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Four digits as 20x20 PNGs (the student resizes them to 8x8, the teacher to 16x16), one in a subfolder."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digit_pngs")
    (folder / "sub").mkdir()
    d = load_digits()
    paths = []
    for i in range(4):
        p = (folder / "sub" if i == 3 else folder) / f"d{i}.png"
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR).save(p)
        paths.append(p)
    return paths


def reference_batch(dm: ImageDataModule, paths) -> torch.Tensor:
    """The images as the datamodule's own validation transform prepares them."""
    tf = dm.eval_transform()
    return torch.stack([tf(Image.open(p).convert("L")) for p in paths])


def by_index(rows) -> dict[int, float]:
    return {r["index"]: r["prob"] for r in rows}


def test_probabilities_equal_a_direct_forward(ckpts, images):
    model = load_student(ckpts["student"])
    teacher = build_teacher("cifar_resnet10", checkpoint=ckpts["teacher"]).eval()
    results = predict(model, images, teacher=teacher, topk=10)
    x = reference_batch(ckpts["student_dm"], images)
    with torch.no_grad():
        z_cls, z_dist = student_heads(model, x)
        fused = model(x).softmax(-1)  # timm in eval mode: softmax of the mean of the two heads' logits
        z_t = teacher(reference_batch(ckpts["teacher_dm"], images))
    expected = {"class": z_cls.softmax(-1), "distillation": z_dist.softmax(-1), "fused": fused,
                "teacher": z_t.softmax(-1)}
    assert [r["image"] for r in results] == [str(p) for p in images]
    for i, r in enumerate(results):
        assert list(r["heads"]) == ["class", "distillation", "fused", "teacher"]
        for head, probs in expected.items():
            rows = r["heads"][head]
            assert [row["rank"] for row in rows] == list(range(1, 11))
            assert [row["class"] for row in rows] == [str(row["index"]) for row in rows]  # digits: names '0'..'9'
            got = by_index(rows)
            np.testing.assert_allclose([got[k] for k in range(10)], probs[i].tolist(), rtol=1e-5, atol=1e-6)
            assert [row["prob"] for row in rows] == sorted(got.values(), reverse=True)


def test_json_csv_table_outputs(ckpts, images, capsys):
    folder = str(images[0].parent)
    args = [str(ckpts["student"]), folder, "--teacher", str(ckpts["teacher"]), "--topk", "3"]

    assert predict_main(args + ["--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["image"] for d in data] == [str(p) for p in find_images([folder])]
    assert len(data) == 4  # the subfolder is scanned too
    assert all(len(rows) == 3 for d in data for rows in d["heads"].values())
    # same numbers through the Python API
    model = load_student(ckpts["student"])
    api = predict(model, [data[0]["image"]], topk=3)[0]["heads"]["fused"]
    assert [r["index"] for r in api] == [r["index"] for r in data[0]["heads"]["fused"]]
    np.testing.assert_allclose([r["prob"] for r in api], [r["prob"] for r in data[0]["heads"]["fused"]], rtol=1e-6)

    assert predict_main(args + ["--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 * 4 * 3  # images x heads x k
    assert set(rows[0]) == {"image", "head", "rank", "class_index", "class_name", "probability"}
    assert {r["head"] for r in rows} == {"class", "distillation", "fused", "teacher"}
    first = [r for r in rows if r["image"] == data[0]["image"] and r["head"] == "teacher"]
    np.testing.assert_allclose([float(r["probability"]) for r in first],
                               [r["prob"] for r in data[0]["heads"]["teacher"]], atol=1e-6)

    assert predict_main(args + ["--format", "table"]) == 0
    table = capsys.readouterr().out
    assert data[0]["image"] in table
    assert "rank" in table and "distillation" in table and "teacher" in table
    top = data[0]["heads"]["fused"][0]
    assert f"{top['class']}  {top['prob']:.3f}" in table


def test_topk_is_capped_at_the_number_of_classes(ckpts, images, capsys):
    assert predict_main([str(ckpts["student"]), str(images[0]), "--topk", "50", "--format", "json"]) == 0
    heads = json.loads(capsys.readouterr().out)[0]["heads"]
    assert list(heads) == ["class", "distillation", "fused"]  # no teacher given
    assert all(len(rows) == 10 for rows in heads.values())
    assert all(abs(sum(r["prob"] for r in rows) - 1) < 1e-5 for rows in heads.values())


def test_one_head_student_has_only_fused():
    from distill import build_student
    from distill.models.heads import head_probabilities

    torch.manual_seed(0)
    model = build_student("deit_tiny_patch16_224", num_classes=5, img_size=8, patch_size=4, in_chans=3, embed_dim=32,
                          depth=1, num_heads=2, distilled=False).eval()
    x = torch.randn(2, 3, 8, 8)
    probs = head_probabilities(model, x)
    assert list(probs) == ["fused"]
    torch.testing.assert_close(probs["fused"], model(x).softmax(-1))


@pytest.mark.parametrize("case", ["missing_ckpt", "teacher_as_student", "student_as_teacher", "topk0",
                                  "not_an_image", "missing_image", "bad_format"])
def test_errors_are_one_line(case, ckpts, images, tmp_path, capsys):
    args = [str(ckpts["student"]), str(images[0])]
    if case == "missing_ckpt":
        args[0] = str(tmp_path / "nope.ckpt")
    elif case == "teacher_as_student":
        args[0] = str(ckpts["teacher"])
    elif case == "student_as_teacher":
        args += ["--teacher", str(ckpts["student"])]
    elif case == "topk0":
        args += ["--topk", "0"]
    elif case == "not_an_image":
        (tmp_path / "x.png").write_text("not an image")
        args[1] = str(tmp_path / "x.png")
    elif case == "missing_image":
        args[1] = str(tmp_path / "nope.png")
    elif case == "bad_format":
        args += ["--format", "xml"]
    try:
        rc = predict_main(args)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc != 0 and captured.out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("distill predict: error:")
    hints = {"missing_ckpt": "check the path", "teacher_as_student": "step-2", "student_as_teacher": "teacher (step 1)",
             "topk0": "at least 1", "not_an_image": "not a readable image", "missing_image": "does not exist",
             "bad_format": "invalid choice"}
    assert hints[case] in err, err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules.*:RuntimeWarning")
def test_runs_as_module(ckpts, images, monkeypatch, capsys):
    """`python -m distill.commands.predict ...` (run in-process: a fresh interpreter costs ~10 s of imports)."""
    monkeypatch.setattr(sys, "argv", ["predict", str(ckpts["student"]), str(images[0]), "--format", "json", "--topk", "2"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("distill.commands.predict", run_name="__main__")
    assert exit_info.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == str(images[0]) and len(out[0]["heads"]["fused"]) == 2
