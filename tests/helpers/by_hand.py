"""Validation numbers counted by hand from the saved checkpoints, independently of the modules' metrics:
what the end-to-end tests compare the logged and summarised accuracies with."""
from __future__ import annotations

from itertools import islice

import torch


def validation_batches(datamodule, n_batches: int) -> list:
    """The first `n_batches` validation batches (what `trainer.limit_val_batches: n` validates on)."""
    datamodule.setup("fit")
    return list(islice(datamodule.val_dataloader(), n_batches))


@torch.no_grad()
def student_and_teacher_accuracies(student, teacher, batches) -> dict[str, float]:
    """val/acc (fused heads), val/acc_cls, val/acc_dist, val/acc_teacher and val/agreement (fused argmax ==
    teacher argmax) of a student (a step-2 checkpoint's path, or the network) and its `teacher` (a callable
    returning logits) on `batches`."""
    from distill import load_student
    from distill.models.heads import student_heads

    student = student.eval() if isinstance(student, torch.nn.Module) else load_student(student)
    counts = dict.fromkeys(("val/acc", "val/acc_cls", "val/acc_dist", "val/acc_teacher", "val/agreement"), 0)
    total = 0
    for x, y in batches:
        z_cls, z_dist = student_heads(student, x)
        fused, z_t = (z_cls + z_dist) / 2, teacher(x)
        for key, z, target in (("val/acc", fused, y), ("val/acc_cls", z_cls, y), ("val/acc_dist", z_dist, y),
                               ("val/acc_teacher", z_t, y), ("val/agreement", fused, z_t.argmax(-1))):
            counts[key] += int((z.argmax(-1) == target).sum())
        total += len(y)
    return {k: v / total for k, v in counts.items()}
