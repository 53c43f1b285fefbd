"""What a model carries about the data it takes, in timm's `pretrained_cfg` (number and names of
classes, mean/std, input size), and the evaluation transform it was validated with: it can be rebuilt
and fed correctly without the recipe that trained it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..data.transforms import eval_spec

if TYPE_CHECKING:  # torch loads with the model, not with this module (the commands' --help reads it)
    from torch import nn


def model_meta(model: nn.Module) -> dict[str, Any]:
    """num_classes, class_names, in_chans, img_size, mean, std of a model built here (or any timm model)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    return dict(
        name=cfg.get("architecture"),
        num_classes=int(cfg.get("num_classes", getattr(model, "num_classes", 0))),
        class_names=list(cfg["label_names"]) if cfg.get("label_names") else None,
        in_chans=int(input_size[0]),
        img_size=int(input_size[-1]),
        mean=tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225))),
    )


def set_model_meta(
    model: nn.Module,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = img_size or tuple(cfg.get("input_size", (3, 224, 224)))[-1]
    cfg.update(num_classes=num_classes, input_size=(in_chans, size, size))
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        cfg["label_names"] = tuple(class_names)
    if mean is not None:
        cfg["mean"] = _per_channel(mean, in_chans, "mean")
    if std is not None:
        cfg["std"] = _per_channel(std, in_chans, "std")
    elif len(cfg.get("mean", ())) != in_chans:  # an ImageNet default on a grayscale model
        cfg["mean"] = _per_channel(cfg.get("mean", (0.5,)), in_chans, "mean")
    if len(cfg.get("std", ())) != in_chans:
        cfg["std"] = _per_channel(cfg.get("std", (0.5,)), in_chans, "std")
    model.pretrained_cfg = cfg
    return model


def _per_channel(values: Sequence[float], in_chans: int, field: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1 or in_chans == 1:
        avg = sum(values) / len(values)
        return (avg,) * in_chans
    raise ValueError(f"{field} has {len(values)} values but the model takes {in_chans} channels")


def eval_spec_of(model) -> dict[str, Any]:
    """The evaluation spec a model loaded by this toolkit was validated with: its metadata (size,
    channels, mean/std) and the crop_pct/interpolation recorded in its checkpoint (`model.distill_eval`,
    set by `load_student` / `distill predict --teacher`); none recorded: the stretching legacy resize."""
    meta = model_meta(model)
    recorded = dict(getattr(model, "distill_eval", None) or {})
    return eval_spec(img_size=meta["img_size"], crop_pct=recorded.get("crop_pct"),
                     interpolation=recorded.get("interpolation") or "bilinear", mean=meta["mean"], std=meta["std"],
                     in_chans=meta["in_chans"])
