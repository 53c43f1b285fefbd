"""Feature guidance from the CNN teacher ("locality guidance", Li et al., ECCV 2022).

A ViT trained on little data lacks the local, hierarchical features a CNN learns by construction. Here
the student's patch tokens after chosen blocks, laid out as a `(B, D, h, w)` map, are projected by a
1x1 convolution to the channels of the teacher's feature map at a chosen layer; both maps are
resampled (bilinear) to the larger of the two grids and matched with a mean squared error, summed over
the chosen pairs. The term has its own weight and is added to the distillation loss; it works with or
without the distillation token (it reads patch tokens only). On CIFAR-100 the authors pair DeiT-Tiny
blocks 0, 6, 11 with the three stages of a ResNet-56 at weight 2.5 (their `deit-ti_c100_ours.yaml`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FeatureGuidanceConfig:
    """Feature guidance (`model.feature_guidance`).

    Args:
        student_blocks: indices of the student's transformer blocks whose patch tokens are guided
            (negative counts from the end), e.g. [0, 6, 11] for a depth-12 DeiT.
        teacher_layers: names of the teacher's submodules whose outputs guide them, one per block,
            e.g. [stages.0, stages.1, stages.2] (CIFAR ResNets) or [layer1, layer2, layer3] (timm
            ResNets).
        weight: weight of the guidance term added to the distillation loss (the authors: 2.5).
    """

    student_blocks: list[int] = field(default_factory=list)
    teacher_layers: list[str] = field(default_factory=list)
    weight: float = 2.5


def as_guidance_config(value: "FeatureGuidanceConfig | dict | None") -> FeatureGuidanceConfig | None:
    if value is None or isinstance(value, FeatureGuidanceConfig):
        cfg = value
    elif isinstance(value, dict):
        cfg = FeatureGuidanceConfig(**value)
    else:
        raise TypeError(f"model.feature_guidance: expected a mapping, got {type(value).__name__}")
    if cfg is None:
        return None
    if not cfg.student_blocks or len(cfg.student_blocks) != len(cfg.teacher_layers):
        raise ValueError(f"model.feature_guidance: student_blocks {list(cfg.student_blocks)} and teacher_layers "
                         f"{list(cfg.teacher_layers)} must be non-empty and pair up one to one")
    if not float(cfg.weight) >= 0:
        raise ValueError(f"model.feature_guidance.weight={cfg.weight} must be >= 0")
    return cfg


class FeatureGuidance(nn.Module):
    """The trainable side of feature guidance: one 1x1 convolution per guided pair, from the student's
    width to the teacher layer's channels. Built from one probe forward through both networks."""

    def __init__(self, cfg: FeatureGuidanceConfig, student: nn.Module, teacher, in_chans: int, img_size: int) -> None:
        super().__init__()
        blocks = getattr(student, "blocks", None)
        if blocks is None or not hasattr(student, "forward_intermediates"):
            raise ValueError("model.feature_guidance needs a timm Vision Transformer student (blocks and "
                             "forward_intermediates)")
        depth = len(blocks)
        for b in cfg.student_blocks:
            if not -depth <= int(b) < depth:
                raise ValueError(f"model.feature_guidance.student_blocks: block {b} does not exist in a student of "
                                 f"depth {depth}")
        self.cfg = cfg
        self.blocks = [int(b) % depth for b in cfg.student_blocks]  # one per pair, as given
        # timm's forward_intermediates returns the blocks it takes once each, in ascending order: each
        # pair reads its block's map from that list (unsorted and repeated blocks pair as written).
        self._taken = sorted(set(self.blocks))
        self._position = [self._taken.index(b) for b in self.blocks]
        self.layers = list(cfg.teacher_layers)
        self.weight = float(cfg.weight)
        # The teacher (an ensemble's first member) is owned by the DistillModule, never by this module:
        # a plain attribute outside the module tree keeps it out of state_dict (student checkpoints hold
        # no teacher weights) and out of load_state_dict (reloading cannot overwrite the teacher's file
        # weights with a copy the student saved, bf16-rounded under a bf16 teacher dtype).
        object.__setattr__(self, "guide", teacher.members[0] if hasattr(teacher, "members") else teacher)
        self.guide.watch(self.layers)
        was_training = student.training
        x = torch.zeros(1, in_chans, img_size, img_size, device=next(student.parameters()).device)
        with torch.no_grad():
            student.eval()
            _, feats = self.student_forward(student, x)
            student.train(was_training)
            self.guide(x)
            targets = self.guide.watched(self.layers)
        for name, t in zip(self.layers, targets):
            if t is None or t.ndim != 4:
                raise ValueError(f"model.feature_guidance.teacher_layers: {name!r} does not output a (B, C, H, W) "
                                 f"feature map; choose a convolutional stage")
        self.proj = nn.ModuleList(nn.Conv2d(f.shape[1], t.shape[1], 1) for f, t in zip(feats, targets))

    def student_forward(self, student: nn.Module, x: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        """The student's training output (as `student(x)` returns it) and its guided feature maps, one
        per pair (`student_blocks` order)."""
        final, feats = student.forward_intermediates(x, indices=self._taken)
        return student.forward_head(final), [feats[i] for i in self._position]

    def loss(self, student_feats: list[torch.Tensor]) -> torch.Tensor:
        """Sum over the pairs of the MSE between the projected student map and the teacher's map of the
        latest teacher forward, both resampled to the larger grid."""
        total = student_feats[0].new_zeros((), dtype=torch.float32)
        for proj, s, t in zip(self.proj, student_feats, self.guide.watched(self.layers)):
            s = proj(s)
            size = (max(s.shape[-2], t.shape[-2]), max(s.shape[-1], t.shape[-1]))
            s = F.interpolate(s.float(), size, mode="bilinear", align_corners=False)
            t = F.interpolate(t.detach().float(), size, mode="bilinear", align_corners=False)
            total = total + F.mse_loss(s, t)
        return total
