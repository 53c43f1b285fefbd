"""A distilled student's two heads: both logits in any mode, their probabilities, and a state_dict
whose eval output is one chosen head (what `distill export` writes)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from timm.models.deit import VisionTransformerDistilled

Head = Literal["cls", "dist", "fused"]


def single_head_state_dict(model: nn.Module, head: Head) -> dict[str, torch.Tensor]:
    """The student's state_dict, rewritten so its eval output is exactly the chosen head's logits."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if head == "fused" or "head_dist.weight" not in sd:
        return sd
    keep, drop = ("head", "head_dist") if head == "cls" else ("head_dist", "head")
    for p in ("weight", "bias"):
        sd[f"{keep}.{p}"] = sd[f"{keep}.{p}"] * 2  # (2 * keep + 0) / 2 == keep
        sd[f"{drop}.{p}"] = torch.zeros_like(sd[f"{drop}.{p}"])
    return sd


def student_heads(student: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_cls, z_dist) of a distilled student in any mode; for a one-head student both are its logits."""
    if isinstance(student, VisionTransformerDistilled):
        feats = student.forward_features(x)
        return student.head(feats[:, 0]), student.head_dist(feats[:, 1])
    out = student(x)
    return out, out


def is_distilled(model: nn.Module) -> bool:
    return getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist")


def head_probabilities(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{head: (B, classes) probabilities}`: class, distillation and fused for a DeiT student, fused alone
    for a one-head model. The model must be in eval mode (as `distill.load_student` returns it)."""
    with torch.no_grad():
        return _head_probabilities(model, x)


def _head_probabilities(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if is_distilled(model):
        z_cls, z_dist = student_heads(model, x)
        return {"class": z_cls.softmax(-1), "distillation": z_dist.softmax(-1),
                "fused": ((z_cls + z_dist) / 2).softmax(-1)}
    out = model(x)
    if isinstance(out, (tuple, list)):  # a distilled model in training mode
        out = (out[0] + out[1]) / 2
    return {"fused": out.softmax(-1)}
