"""The ImageNet recipes carry DeiT's settings (facebookresearch/deit main.py defaults and README command
for the distilled models), read from the resolved recipes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.commands.recipe_cli import DistillCLI
from distill.training.optim import scaled_lr

REPO = Path(__file__).resolve().parent.parent
STUDENTS = {"student.yaml": "tiny", "student_small.yaml": "small", "student_base.yaml": "base"}


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_imagenet_student_recipes_have_deit_settings(name):
    c = DistillCLI.parse_recipe(["--config", str(REPO / "recipes/imagenet" / name)])
    m, d, t = c.model.init_args, c.data, c.trainer
    loss = m.loss.init_args
    assert m.student.name == f"deit_{STUDENTS[name]}_distilled_patch16_224" and m.student.drop_path_rate == 0.1
    # optimisation: AdamW 5e-4 x global batch / 512, wd 0.05, 5 warm-up epochs from 1e-6, cosine to 1e-5 over
    # 300 epochs, then 10 cool-down epochs
    global_batch = d.batch_size * t.devices * (t.num_nodes or 1)
    assert global_batch == 1024 and (m.lr, m.lr_reference_batch) == (5e-4, 512)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=d.batch_size), world_size=t.devices,
                              accumulate_grad_batches=1, is_global_zero=True)
    peak = scaled_lr(trainer, m.lr, m.lr_reference_batch)
    assert peak == pytest.approx(1e-3)
    assert peak * m.warmup_start_ratio == pytest.approx(1e-6) and peak * m.min_lr_ratio == pytest.approx(1e-5)
    assert (t.max_epochs, m.cooldown_epochs, m.warmup_epochs, m.weight_decay) == (310, 10, 5, 0.05)
    assert m.ema_decay == 0.99996
    # DeiT's hard distillation through the token, alpha 0.5, label smoothing 0.1 on the class head
    assert (loss.mode, loss.alpha, loss.label_smoothing) == ("hard", 0.5, 0.1)
    # data: RandomResizedCrop 224 bicubic, flip, RandAugment, random erasing, mixup/cutmix, repeated aug,
    # eval resize 256 + centre crop 224, ImageNet mean/std
    assert (d.img_size, d.crop, d.interpolation, d.crop_pct, d.hflip) == (224, "rrc", "bicubic", 0.875, 0.5)
    assert (d.auto_augment, d.re_prob, d.mixup, d.cutmix, d.repeated_aug) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 3)
    assert (list(d.mean), list(d.std)) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert t.precision == "bf16-mixed" and t.strategy == "ddp"
    header = (REPO / "recipes/imagenet" / name).read_text().split("seed_everything")[0]
    assert "Still differs from DeiT" in header  # what is not DeiT's is said


def test_imagenet_teacher_is_regnety_160():
    c = DistillCLI.parse_recipe(["--config", str(REPO / "recipes/imagenet/teacher.yaml")])
    assert c.model.init_args.model == "regnety_160"
    assert (c.data.interpolation, c.data.crop_pct) == ("bicubic", 0.875)
