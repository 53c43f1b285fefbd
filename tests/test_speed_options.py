"""DistillModule's speed options run on the CPU: torch.compile of student and teacher without
recompiling per step, and a teacher kept in bfloat16."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from distill import DistillationLoss, DistillModule, ImageDataModule, build_student, build_teacher


def _module(**kwargs) -> DistillModule:
    teacher = build_teacher("cifar_resnet10", num_classes=10, in_chans=1, img_size=8, base_width=8)
    student = build_student(num_classes=10, img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    return DistillModule(student, teacher, DistillationLoss("soft", 0.5, tau=2.0), **kwargs)


def _fit(module: DistillModule, epochs: int = 2, **trainer_kwargs) -> L.Trainer:
    L.seed_everything(0)
    dm = ImageDataModule("synthetic", img_size=8, batch_size=16, num_samples=160, in_chans_synthetic=1)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(module, dm)
    return trainer


@pytest.mark.slow
def test_compiled_student_and_teacher_do_not_recompile_per_step():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = _fit(_module(compile_student=True, compile_teacher=True))
    assert trainer.global_step == 16
    # one graph for the student's training forward, one for the teacher: 16 steps, no recompilation
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["recompiles"]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_teacher_kept_in_bfloat16(accuracy_of):
    module = _module(teacher_dtype="bfloat16", teacher_channels_last=True)
    trainer = _fit(module, epochs=1)
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in module.student.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # the logged teacher accuracy is the bfloat16 teacher's own, counted by hand on the validation set
    by_hand = accuracy_of(module.teacher, trainer.datamodule.val_dataloader())
    assert float(trainer.callback_metrics["val/acc_teacher"]) == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_the_teacher_dtype_follows_the_precision_by_default(precision, dtype):
    """`teacher_dtype: null`: a bf16-mixed run keeps the teacher's weights in bfloat16 (no per-step autocast
    casts), a float32 run in float32; the student stays float32 either way."""
    module = _module()
    _fit(module, epochs=1, precision=precision, limit_train_batches=2, limit_val_batches=1)
    assert {p.dtype for p in module.teacher.parameters()} == {dtype}
    assert {p.dtype for p in module.student.parameters()} == {torch.float32}


def test_teacher_module_compiles_its_cnn_once_for_training_and_once_for_evaluation(trainer_factory,
                                                                                   compile_without_inductor):
    from torch._dynamo.utils import counters

    from distill import TeacherModule

    torch._dynamo.reset()
    counters.clear()
    module = TeacherModule("cifar_resnet10", model_kwargs={"base_width": 8}, channels_last=True, compile=True)
    dm = ImageDataModule("synthetic", img_size=8, batch_size=16, num_samples=160, in_chans_synthetic=1)
    trainer = trainer_factory(max_epochs=2, limit_val_batches=2)
    trainer.fit(module, dm)
    assert trainer.global_step == 16
    # 16 training steps and 4 validation batches: the training graph, then one recompile for eval mode
    assert counters["stats"]["unique_graphs"] == 2 and sum(counters["recompiles"].values()) <= 1
    assert not any(k.startswith("_orig_mod") for k in module.state_dict())  # checkpoint keys unchanged
