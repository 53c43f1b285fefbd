"""CIFAR-style ResNets (He et al. 2016, the variant used for 32x32 inputs): a 3x3 stem without max-pool,
so they work on 32x32 and even 8x8 images, where ImageNet ResNets downsample the input away.

Registered with timm, so `timm.create_model("cifar_resnet18", num_classes=10, in_chans=1)` works.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.layers import ClassifierHead

__all__ = ["CifarResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem and four stages of BasicBlocks (strides 1, 2, 2, 2)."""

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        base_width: int = 64,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, base_width, 3, 1, 1, bias=False), nn.BatchNorm2d(base_width), nn.ReLU(inplace=True)
        )
        stages, in_planes = [], base_width
        for i, n in enumerate(layers):
            planes = base_width * 2**i
            blocks = [BasicBlock(in_planes, planes, 1 if i == 0 else 2)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.num_features = in_planes
        self.head = ClassifierHead(in_planes, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as the identity.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups as timm's ResNet names them (`param_groups_layer_decay` reads the fine one):
        the stem, then one group per residual block (one per stage when coarse); the head, unmatched,
        comes last. Without it timm cuts the parameters into even chunks, through the blocks."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "stem.0",
        "classifier": "head.fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {"cifar_resnet10": _cfg(), "cifar_resnet18": _cfg(), "cifar_resnet34": _cfg(), "cifar_resnet18_w32": _cfg()}
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


@register_model
def cifar_resnet10(pretrained: bool = False, **kwargs) -> CifarResNet:
    """One BasicBlock per stage: a quick teacher for small data (4.9M params)."""
    return _create("cifar_resnet10", pretrained, layers=(1, 1, 1, 1), **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The usual CIFAR ResNet-18 (11.2M params)."""
    return _create("cifar_resnet18", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_model
def cifar_resnet18_w32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 at half width (2.8M params): a fast CPU teacher for digits-size data."""
    return _create("cifar_resnet18_w32", pretrained, layers=(2, 2, 2, 2), base_width=32, **kwargs)


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet34", pretrained, layers=(3, 4, 6, 3), **kwargs)
