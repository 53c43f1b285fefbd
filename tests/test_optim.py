"""The learning-rate schedule follows the real run: warm-up in real epochs, the cosine ending where
training ends (max_epochs, max_steps or both, with gradient accumulation), DeiT's warm-up start and
cool-down, and the lr scaled by the global batch."""
from __future__ import annotations

import math

import lightning as L
import pytest

from distill import ImageDataModule, TeacherModule
from distill.training.optim import warmup_cosine

LR = 1e-2


class LrRecorder(L.Callback):
    """The learning rate each optimizer step is taken with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def fit(trainer_factory, tiny_teacher_kwargs, batches_per_epoch=8, batch=8, **kwargs):
    module_kwargs = {k: kwargs.pop(k) for k in ("warmup_epochs", "warmup_start_ratio", "cooldown_epochs",
                                                "lr_reference_batch") if k in kwargs}
    dm = ImageDataModule("synthetic", img_size=8, batch_size=batch, num_samples=batches_per_epoch * batch * 5 // 4,
                         val_fraction=0.2, in_chans_synthetic=1)
    module = TeacherModule(**tiny_teacher_kwargs, lr=LR, min_lr_ratio=0.01, **{"warmup_epochs": 1.0, **module_kwargs})
    rec = LrRecorder()
    trainer = trainer_factory(limit_val_batches=0, callbacks=[rec], **kwargs)
    trainer.fit(module, dm)
    return trainer, rec.lrs


def test_max_steps_alone_warms_up_one_real_epoch_and_ends_the_cosine_at_the_last_step(trainer_factory, tiny_teacher_kwargs):
    trainer, lrs = fit(trainer_factory, tiny_teacher_kwargs, max_steps=40, max_epochs=-1)
    assert trainer.num_training_batches == 8 and len(lrs) == 40
    assert max(range(len(lrs)), key=lrs.__getitem__) == 8  # peak right after one epoch (8 steps) of warm-up
    assert lrs[8] == pytest.approx(LR)
    assert lrs[-1] < 0.02 * LR  # decayed to ~min_lr_ratio at the end, not stuck at the peak


def test_max_steps_before_max_epochs_ends_the_cosine_at_max_steps(trainer_factory, tiny_teacher_kwargs):
    trainer, lrs = fit(trainer_factory, tiny_teacher_kwargs, max_steps=30, max_epochs=10)
    assert len(lrs) == 30
    assert max(range(len(lrs)), key=lrs.__getitem__) == 8  # warm-up is one epoch, not 30 // 10 steps
    assert lrs[-1] < 0.03 * LR


def test_gradient_accumulation_counts_optimizer_steps(trainer_factory, tiny_teacher_kwargs):
    trainer, lrs = fit(trainer_factory, tiny_teacher_kwargs, max_epochs=5, accumulate_grad_batches=2,
                       limit_train_batches=6)
    assert trainer.global_step == 15 and len(lrs) == 15  # 6 batches / 2 = 3 optimizer steps per epoch
    assert max(range(len(lrs)), key=lrs.__getitem__) == 3  # one epoch of warm-up = 3 optimizer steps
    assert lrs[-1] < 0.05 * LR


def test_an_odd_number_of_batches_under_accumulation_rounds_the_epoch_up(trainer_factory, tiny_teacher_kwargs):
    """7 batches with accumulation 2: Lightning steps after batches 2, 4, 6 and the epoch's last, 7, so
    an epoch is 4 optimizer steps and one epoch of warm-up peaks at step 4 (3 would be rounding down)."""
    trainer, lrs = fit(trainer_factory, tiny_teacher_kwargs, max_epochs=3, accumulate_grad_batches=2,
                       limit_train_batches=7)
    assert trainer.global_step == 12 and len(lrs) == 12
    assert max(range(len(lrs)), key=lrs.__getitem__) == 4
    assert lrs[3] == pytest.approx(LR * 4 / 5) and lrs[4] == pytest.approx(LR)  # (step + 1) / (warm-up + 1)


def test_warmup_start_and_cooldown(trainer_factory, tiny_teacher_kwargs):
    trainer, lrs = fit(trainer_factory, tiny_teacher_kwargs, max_epochs=6, warmup_start_ratio=0.1,
                       cooldown_epochs=2)
    assert len(lrs) == 48
    assert lrs[0] == pytest.approx(LR * (0.1 + 0.9 / 9))  # from 0.1 x lr upwards
    assert all(lr == pytest.approx(0.01 * LR) for lr in lrs[-16:])  # two epochs at the final lr
    assert lrs[-17] > 0.01 * LR


def test_lr_scaled_by_the_global_batch(trainer_factory, tiny_teacher_kwargs):
    _, lrs = fit(trainer_factory, tiny_teacher_kwargs, max_epochs=2, warmup_epochs=0, lr_reference_batch=32,
                 accumulate_grad_batches=2)
    assert lrs[0] == pytest.approx(LR * (8 * 1 * 2) / 32)  # batch 8 x 1 device x accumulation 2


def test_warmup_cosine_shape():
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.0, cooldown_steps=20)
    f = [sched.lr_lambdas[0](s) for s in range(100)]
    assert f[10] == 1.0 and f[9] < 1.0
    assert f[45] == pytest.approx(0.5 * (1 + math.cos(math.pi * 35 / 70)))
    assert f[80:] == [0.0] * 20


def test_layer_decay_on_a_cifar_resnet_groups_the_stem_then_each_block():
    """timm's param_groups_layer_decay follows the model's group_matcher: stem, one layer per residual
    block, then the head; every parameter of a block shares its lr (no even chunks cutting through one)."""
    import timm
    import distill  # noqa: F401 - registers the CIFAR ResNets

    from distill.training.optim import adamw

    model = timm.create_model("cifar_resnet18", num_classes=10, base_width=8)  # 4 stages x 2 blocks
    decay = 0.5
    opt = adamw(model, LR, 0.05, layer_decay=decay)
    name_of = {id(p): n for n, p in model.named_parameters()}
    lr_of = {name_of[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert set(lr_of) == set(name_of.values())

    def layer(name: str) -> int:  # stem 0, stages.s.b 1 + 2s + b, head 9
        if name.startswith("stem."):
            return 0
        if name.startswith("stages."):
            s, b = map(int, name.split(".")[1:3])
            return 1 + 2 * s + b
        assert name.startswith("head."), name
        return 9

    per_layer = {}
    for name, lr in lr_of.items():
        per_layer.setdefault(layer(name), set()).add(lr)
    assert {k: len(v) for k, v in per_layer.items()} == {k: 1 for k in range(10)}  # one lr per block
    for name, lr in lr_of.items():
        assert lr == pytest.approx(LR * decay ** (9 - layer(name))), name


def test_a_students_warmup_in_steps_is_the_same_whatever_the_epoch_length(trainer_factory, tiny_student):
    """`warmup_steps` (DistillModule): runs compared at equal samples seen with epochs of other lengths (5,000
    labelled images alone against 50,000 with the unlabelled ones) warm up over the same optimizer steps; the
    peak lr is reached at that step whatever an epoch holds."""
    from distill import DistillationLoss, DistillModule

    for batches_per_epoch in (3, 7):
        dm = ImageDataModule("synthetic", img_size=8, batch_size=8, num_samples=batches_per_epoch * 8 * 5 // 4,
                             val_fraction=0.2, in_chans_synthetic=1)
        module = DistillModule(student=dict(tiny_student), loss=DistillationLoss("none"), lr=LR, min_lr_ratio=0.01,
                               warmup_epochs=1.0, warmup_steps=4)
        rec = LrRecorder()
        trainer_factory(limit_val_batches=0, callbacks=[rec], max_steps=20, max_epochs=-1).fit(module, dm)
        assert max(rec.lrs) == pytest.approx(LR, rel=1e-3) and rec.lrs.index(max(rec.lrs)) == 4, (batches_per_epoch, rec.lrs)
        assert all(a < b for a, b in zip(rec.lrs[:4], rec.lrs[1:5]))  # rising until step 4, whatever the epoch
    with pytest.raises(ValueError, match=r"model.init_args.warmup_steps=-1 must be a whole number >= 0"):
        module = DistillModule(student=dict(tiny_student), loss=DistillationLoss("none"), warmup_steps=-1)
        trainer_factory(limit_val_batches=0, max_steps=2).fit(module, dm)
