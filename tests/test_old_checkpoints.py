"""Files an older release wrote still work: the fixtures in tests/fixtures/ (written by make_fixtures.py
before the package moved into subpackages) load, resume, export and predict with today's code, and
answer what they answered then.

Up to the last test, only paths a user types are used (`from distill import ...`, the `distill` command),
so they ran unchanged before and after the move; the last checks the former module paths that files of
an older release name.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from distill import DistillModule, ImageDataModule, TeacherModule, build_student, load_student, model_meta
from distill.cli import main as distill

FIXTURES = Path(__file__).parent / "fixtures"
TEACHER, STUDENT = FIXTURES / "teacher.ckpt", FIXTURES / "student.ckpt"
EXPORT, DIGIT = FIXTURES / "student.safetensors", FIXTURES / "digit.png"
STUDENT_RECIPE = FIXTURES.parents[1] / "recipes" / "digits" / "student.yaml"


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_fixtures_hold_only_plain_types():
    # weights_only=True refuses any pickled class: nothing in them names a module of this package
    for path in (TEACHER, STUDENT):
        ckpt = checkpoint(path)
        assert ckpt["global_step"] == 2 and ckpt["optimizer_states"], path


def test_old_checkpoints_load_into_the_modules():
    teacher = TeacherModule.load_from_checkpoint(TEACHER, map_location="cpu")
    assert model_meta(teacher.model)["class_names"] == [str(i) for i in range(10)]
    student = DistillModule.load_from_checkpoint(STUDENT, map_location="cpu", teacher=str(TEACHER))
    assert student.teacher_identity["sha256"] == checkpoint(STUDENT)["distill_teacher"]["sha256"]
    torch.testing.assert_close(student.student.state_dict(), load_student(STUDENT).state_dict())


class StepAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_old_checkpoints_resume_a_fit(kind, tmp_path):
    path = TEACHER if kind == "teacher" else STUDENT
    saved = checkpoint(path)
    if kind == "teacher":
        module = TeacherModule.load_from_checkpoint(path, map_location="cpu")
    else:
        module = DistillModule.load_from_checkpoint(path, map_location="cpu", teacher=str(TEACHER))
    dm = ImageDataModule(**saved["datamodule_hyper_parameters"])
    probe = StepAtStart()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=3, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[probe])
    trainer.fit(module, dm, ckpt_path=path)
    assert probe.step == 2 and trainer.global_step == 3  # continued from the old step, one more taken


def test_an_old_student_resumes_through_the_recipe(tmp_path):
    root = tmp_path / "run"
    code = distill(["fit", "--config", str(STUDENT_RECIPE), "--model.init_args.teacher", str(TEACHER),
                    "--model.init_args.student.embed_dim", "16", "--model.init_args.student.depth", "1",
                    "--model.init_args.student.num_heads", "2", "--trainer.max_epochs", "2",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--data.batch_size", "16", "--trainer.default_root_dir", str(root), "--ckpt_path", str(STUDENT)])
    assert code == 0
    resumed = checkpoint(root / "checkpoints" / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (1, 4)  # the second epoch, after the old first
    assert resumed["distill_teacher"]["sha256"] == checkpoint(STUDENT)["distill_teacher"]["sha256"]


def test_an_old_student_exports_the_file_it_exported_then(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "student.safetensors"
    assert distill(["export", str(STUDENT), "--format", "safetensors", "--head", "fused", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as new, safe_open(str(EXPORT), framework="pt") as old:
        assert new.metadata() == old.metadata()
        assert sorted(new.keys()) == sorted(old.keys())
        for key in old.keys():
            assert torch.equal(new.get_tensor(key), old.get_tensor(key)), key


def test_an_old_export_rebuilds_in_timm_and_starts_a_student():
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(EXPORT), framework="pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_model"], **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(EXPORT)))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), load_student(STUDENT)(x))  # fused head, as exported
    student = build_student(num_classes=10, img_size=8, in_chans=1, patch_size=2, embed_dim=16, depth=1,
                            num_heads=2, pretrained=str(EXPORT))
    torch.testing.assert_close(student.state_dict()["pos_embed"], model.state_dict()["pos_embed"])


def test_an_old_student_and_teacher_predict_what_they_predicted_then(capsys, monkeypatch):
    monkeypatch.chdir(FIXTURES.parents[1])  # predict.json names the image as tests/fixtures/digit.png
    capsys.readouterr()
    code = distill(["predict", "tests/fixtures/student.ckpt", "tests/fixtures/digit.png", "--teacher",
                    "tests/fixtures/teacher.ckpt", "--topk", "3", "--format", "json"])
    assert code == 0
    now, then = json.loads(capsys.readouterr().out), json.loads((FIXTURES / "predict.json").read_text())
    assert [r["image"] for r in now] == [r["image"] for r in then]
    assert list(now[0]["heads"]) == list(then[0]["heads"]) == ["class", "distillation", "fused", "teacher"]
    for head, rows in then[0]["heads"].items():
        assert [r["index"] for r in now[0]["heads"][head]] == [r["index"] for r in rows], head
        assert [r["prob"] for r in now[0]["heads"][head]] == pytest.approx([r["prob"] for r in rows], abs=1e-5)


def test_an_old_student_draws_its_attention(tmp_path):
    assert distill(["attention", str(STUDENT), str(DIGIT), "--out", str(tmp_path), "--dpi", "20"]) == 0
    assert (tmp_path / "digit.png").stat().st_size > 0


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_old_checkpoints_export_as_hub_folders(kind, tmp_path):
    from distill import export_hf

    result = export_hf(TEACHER if kind == "teacher" else STUDENT, tmp_path / kind, dataset="digits", wandb_link=False)
    assert result.max_diff < 1e-5  # the folder, loaded by timm, returns the checkpoint's logits
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in result.folder.iterdir()}


def test_former_module_paths_that_recipes_and_model_cards_name_still_resolve():
    # a recipe of an older release adds the callback by its former path; model cards exported before
    # (and since: the card keeps the line) say `import distill.cifar_resnet` to register the CIFAR ResNets
    import timm

    import distill.cifar_resnet
    from distill.commands.recipe_cli import DistillCLI
    from distill.inspect.callbacks import AttentionLogger
    from distill.models import cifar_resnet

    config = DistillCLI.parse_recipe(["--config", str(STUDENT_RECIPE), "--trainer.callbacks",
                                      '[{"class_path": "distill.callbacks.AttentionLogger"}]'])
    assert config.trainer.callbacks[0].class_path == "distill.callbacks.AttentionLogger"
    from distill.callbacks import AttentionLogger as former

    assert former is AttentionLogger
    assert distill.cifar_resnet.CifarResNet is cifar_resnet.CifarResNet and timm.is_model("cifar_resnet10")
