"""Several frozen teachers answering as one.

An ensemble of teachers is a stronger, better-calibrated teacher than any of its members (e.g. a CNN
and another CNN trained with another seed or architecture). The student learns from the combination:
the mean of the members' logits, or the mean of their probabilities (returned as log-probabilities,
so every loss reads it as logits); hard distillation takes the argmax of that combination.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Literal, Sequence, Union

import torch
from torch import nn

from .frozen import FrozenTeacher, TeacherOutputs

Combine = Literal["mean_logits", "mean_probs"]


def combine_logits(logits: Sequence[torch.Tensor], combine: Combine) -> torch.Tensor:
    """One `(B, C)` tensor from the members' logits: their mean, or the log of the mean of their
    softmax probabilities (at temperature 1) so that softmax of the result is that mean."""
    stacked = torch.stack([z.float() for z in logits])
    if combine == "mean_logits":
        return stacked.mean(0)
    return torch.logsumexp(stacked.log_softmax(-1), dim=0) - torch.log(torch.tensor(float(len(logits))))


class TeacherEnsemble(TeacherOutputs, nn.Module):
    """`FrozenTeacher`s whose combined logits are the teacher's. Each member adapts the input to what it
    was trained on (its own mean/std, channels and size); all must predict the same classes.

    Args:
        members: the frozen teachers.
        combine: `mean_logits` or `mean_probs`.
    """

    def __init__(self, members: Sequence[FrozenTeacher], combine: Combine = "mean_logits") -> None:
        super().__init__()
        if combine not in ("mean_logits", "mean_probs"):
            raise ValueError(f"model.teacher_combine={combine!r} is unknown; use mean_logits or mean_probs")
        if len(members) < 2:
            raise ValueError("TeacherEnsemble needs at least two teachers; pass one teacher on its own")
        self.members = nn.ModuleList(members)
        self.combine = combine
        classes = {m.identity["num_classes"] for m in members}
        if len(classes) > 1:
            raise ValueError(f"model.teacher: the teachers predict different numbers of classes {sorted(classes)}; "
                             f"distil from teachers trained on the same classes")
        first = members[0].identity
        self.identity: dict[str, Any] = dict(
            members=[m.identity for m in members], combine=combine, num_classes=first["num_classes"],
            class_names=first["class_names"], architecture="+".join(str(m.identity["architecture"]) for m in members),
        )
        self.cache = None
        self.eval()

    # ------------------------------------------------------------------------------ the task
    @property
    def meta(self) -> dict[str, Any]:
        return self.members[0].meta

    @property
    def task(self) -> dict[str, Any]:
        return self.members[0].task

    def check_task(self, num_classes: int, class_names: Sequence[str], field: str = "model.teacher") -> None:
        for i, member in enumerate(self.members):
            member.check_task(num_classes, class_names, f"{field}[{i}]")

    def adapt_to(self, mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
        for member in self.members:
            member.adapt_to(mean, std, in_chans)

    # ------------------------------------------------------------------------ running it
    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)

    def fingerprint(self) -> str:
        digest = hashlib.sha256("|".join(m.fingerprint() for m in self.members).encode())
        return digest.hexdigest()

    def prepare(self, dtype: torch.dtype | None = None, channels_last: bool = False, compile: bool = False) -> None:
        for member in self.members:
            member.prepare(dtype, channels_last, compile)

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [member(x) for member in self.members]

    def combined(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return combine_logits(logits, self.combine)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combined(self.member_logits(x))


def load_teachers(
    teacher: Union[str, os.PathLike, nn.Module, Sequence, None],
    expected_sha256: Union[str, Sequence, None] = None,
    arch: Union[str, Sequence, None] = None,
    combine: Combine = "mean_logits",
) -> FrozenTeacher | TeacherEnsemble | None:
    """One `FrozenTeacher` for one teacher (path or network), a `TeacherEnsemble` for a list of them.
    `expected_sha256` and `arch` are one value for all, or one per teacher."""
    if teacher is None:
        return None
    if not isinstance(teacher, (list, tuple)):
        sha = expected_sha256[0] if isinstance(expected_sha256, (list, tuple)) else expected_sha256
        name = arch[0] if isinstance(arch, (list, tuple)) else arch
        return FrozenTeacher.load(teacher, sha, name)
    if len(teacher) == 1:
        return load_teachers(teacher[0], expected_sha256, arch, combine)

    def per_teacher(value, what: str) -> list:
        if not isinstance(value, (list, tuple)):
            return [value] * len(teacher)
        if len(value) != len(teacher):
            raise ValueError(f"model.{what} has {len(value)} entries for {len(teacher)} teachers; give one per teacher")
        return list(value)

    shas, arches = per_teacher(expected_sha256, "teacher_sha256"), per_teacher(arch, "teacher_model")
    members = [FrozenTeacher.load(t, s, a, field=f"model.teacher[{i}]")
               for i, (t, s, a) in enumerate(zip(teacher, shas, arches))]
    return TeacherEnsemble(members, combine)


def teacher_files(teacher: FrozenTeacher | TeacherEnsemble | None) -> tuple[Any, Any]:
    """(path, sha256) of the teacher for the student's hyper-parameters: single values for one teacher,
    lists for an ensemble (None for a teacher given as a network)."""
    if teacher is None:
        return None, None
    members = teacher.members if isinstance(teacher, TeacherEnsemble) else [teacher]
    paths = [m.identity.get("path") for m in members]
    shas = [m.identity.get("sha256") for m in members]
    if isinstance(teacher, TeacherEnsemble):
        return paths, shas
    return paths[0], shas[0]
