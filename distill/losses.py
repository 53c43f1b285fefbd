"""DeiT's distillation loss: ground-truth cross-entropy on the class head plus a teacher term on the
distillation head."""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Mode = Literal["none", "soft", "hard"]
KLReduction = Literal["batchmean", "deit"]


class LossTerms(NamedTuple):
    """What `DistillationLoss` returns: the weighted total and the two unweighted terms."""

    total: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor


def soft_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    kl_reduction: KLReduction = "batchmean",
) -> torch.Tensor:
    """`tau**2 * KL(softmax(z_t / tau) || softmax(z_s / tau))`, summed over the batch and divided by the
    batch size (`batchmean`, Hinton/timm) or by batch x classes (`deit`, the DeiT reference code).

    Always computed in float32 with log-probabilities on both sides (`log_target=True`): under bf16
    autocast a softmax of sharp teacher logits underflows to exact zeros and `p * log p` turns into NaN.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    denominator = student_logits.numel() if kl_reduction == "deit" else student_logits.shape[0]
    return kl * (tau * tau) / denominator


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax label (DeiT's hard distillation, no smoothing)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


class DistillationLoss(nn.Module):
    """DeiT's loss, `total = (1 - alpha) * CE(z_cls, target) + alpha * distill(z_dist, z_t)`.

    `alpha` is the weight of the distillation term, exactly as in DeiT (`distillation_alpha`).

    Args:
        mode: `hard` (CE against the teacher's argmax), `soft` (temperature-scaled KL) or `none`
            (ground truth only: total is the CE term and `alpha` is not used).
        alpha: weight of the distillation term, in [0, 1].
        tau: temperature of the soft term, > 0 (DeiT uses 3.0 for soft distillation).
        kl_reduction: `batchmean` (default; divide the summed KL by the batch size, as Hinton's KD and
            timm do) or `deit` (divide by batch x classes, as DeiT's reference code does, i.e.
            `batchmean / num_classes`).
        label_smoothing: smoothing of the ground-truth term only; the teacher term is never smoothed.

    Called as `loss(student_out, teacher_logits, target)`, where `student_out` is `(z_cls, z_dist)` for a
    student with a distillation token or a single tensor for one without (classic Hinton KD: both
    terms read the same logits), and `target` holds class indices `(B,)` or soft targets `(B, C)`
    from mixup/cutmix. Returns `LossTerms(total, ce, distill)`.
    """

    def __init__(
        self,
        mode: Mode = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_reduction: KLReduction = "batchmean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("none", "soft", "hard"):
            raise ValueError(f"DistillationLoss: mode={mode!r} is unknown; use 'hard', 'soft' or 'none'")
        if kl_reduction not in ("batchmean", "deit"):
            raise ValueError(
                f"DistillationLoss: kl_reduction={kl_reduction!r} is unknown; use 'batchmean' or 'deit'"
            )
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"DistillationLoss: alpha={alpha} must lie in [0, 1] (the weight of the distillation term)")
        if not float(tau) > 0.0:
            raise ValueError(f"DistillationLoss: tau={tau} must be > 0 (the softmax temperature)")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"DistillationLoss: label_smoothing={label_smoothing} must lie in [0, 1)")
        self.mode = mode
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.kl_reduction = kl_reduction
        self.label_smoothing = float(label_smoothing)

    @property
    def needs_teacher(self) -> bool:
        return self.mode != "none" and self.alpha > 0

    def config(self) -> dict:
        """The constructor arguments, for checkpoints and logs."""
        return dict(
            mode=self.mode,
            alpha=self.alpha,
            tau=self.tau,
            kl_reduction=self.kl_reduction,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def forward(
        self,
        student_out: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor,
    ) -> LossTerms:
        if isinstance(student_out, (tuple, list)):
            z_cls, z_dist = student_out
        else:
            z_cls = z_dist = student_out
        ce = F.cross_entropy(z_cls.float(), target, label_smoothing=self.label_smoothing)
        if self.mode == "none":
            return LossTerms(ce, ce, ce.new_zeros(()))
        if teacher_logits is None and self.alpha == 0.0:  # the teacher term weighs nothing: skip it
            return LossTerms(ce, ce, ce.new_zeros(()))
        if teacher_logits is None:
            raise ValueError(f"DistillationLoss(mode={self.mode!r}) needs teacher_logits; got None")
        if self.mode == "soft":
            distill = soft_distillation(z_dist, teacher_logits, self.tau, self.kl_reduction)
        else:
            distill = hard_distillation(z_dist, teacher_logits)
        total = (1.0 - self.alpha) * ce + self.alpha * distill
        return LossTerms(total, ce, distill)
