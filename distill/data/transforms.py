"""The image transforms of `ImageDataModule`, built from timm's blocks the way DeiT builds them
(facebookresearch/deit, datasets.py `build_transform`).

Training: RandomResizedCrop (`crop: rrc`, timm's RandomResizedCropAndInterpolation, scale 0.08-1,
ratio 3/4-4/3) or, for `crop: pad`/`none`, the evaluation geometry (shorter side resized, centre crop,
no stretching) with a random padded crop on top for `pad` (DeiT's CIFAR path); then the horizontal
flip, timm's RandAugment/AutoAugment/AugMix, ToTensor, Normalize and timm's RandomErasing (pixel mode,
one box), as timm's `transforms_imagenet_train` orders them.

Evaluation: a spec (a plain dict: img_size, crop_pct, interpolation, mean, std, in_chans, see
`eval_spec`) that checkpoints record, so `distill predict`, `distill attention` and `distill export`
prepare images exactly as validation did. It is timm's `transforms_imagenet_eval`: resize the shorter
side to `floor(img_size / crop_pct)` and centre-crop `img_size` (DeiT: crop_pct 0.875, bicubic).
Checkpoints written before crop_pct was recorded were validated with a plain `Resize((s, s))`, which
stretches non-square images; a spec without crop_pct (None) rebuilds exactly that, so their
predictions keep matching their validation accuracy.

Posterize and Pillow 13: timm 1.0.31's `posterize` hands `bits=0` (RandAugment's increasing posterize at
magnitude 10, reached by `mstd0.5` noise) to `ImageOps.posterize`, which Pillow 13 refuses; Pillow < 13,
which DeiT ran with, returned an all-black image (mask `~(2**8 - 1)`). `pillow_safe_posterize` swaps the
posterize function of the ops of one augmentation object for `posterize_old_pillow`, which keeps that
meaning; timm itself is left untouched.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from PIL import Image, ImageOps

# File name endings read as images (image folders, `distill predict`, `distill attention`).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)  # DeiT / timm defaults


# ---------------------------------------------------------------------------------------------- checks
def check_interpolation(name: str, field: str = "data.interpolation") -> str:
    if name not in INTERPOLATIONS:
        raise ValueError(f"{field}={name!r} is unknown; use one of {', '.join(INTERPOLATIONS)}")
    return name


def check_crop_pct(crop_pct: float, field: str = "data.crop_pct") -> float:
    if not (isinstance(crop_pct, (int, float)) and 0.0 < crop_pct <= 1.0):
        raise ValueError(f"{field}={crop_pct} must lie in (0, 1]; 1.0 keeps the whole centre square, DeiT's "
                         f"ImageNet value is 0.875")
    return float(crop_pct)


def interp_mode(name: str):
    from timm.data.transforms import str_to_interp_mode

    return str_to_interp_mode(check_interpolation(name))


# --------------------------------------------------------------------------------------------- posterize
def posterize_old_pillow(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's `posterize` with Pillow < 13's meaning of `bits_to_keep <= 0`: nothing kept, a black image."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits >= 1:
        return ImageOps.posterize(img, bits)
    # Pillow < 13: lut[i] = i & ~(2 ** (8 - bits) - 1) = 0 for every i, applied to every band
    return Image.new(img.mode, img.size, 0)


def augment_ops(aug: Any) -> list:
    """The timm AugmentOps inside a RandAugment / AugMixAugment (`ops`) or AutoAugment (`policy`)."""
    ops = list(getattr(aug, "ops", None) or [])
    for sub_policy in getattr(aug, "policy", None) or []:
        ops += list(sub_policy)
    return ops


def pillow_safe_posterize(aug: Any) -> Any:
    """`aug` with the posterize function of its own ops replaced by `posterize_old_pillow` (in place)."""
    from timm.data import auto_augment

    for op in augment_ops(aug):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = posterize_old_pillow
    return aug


# ------------------------------------------------------------------------------------------- training
def build_auto_augment(config: str, img_size: int, mean: Sequence[float], interpolation: str = "bilinear"):
    """timm's RandAugment (`rand-...`), AugMix (`augmix-...`) or AutoAugment (`v0`, `original`, ...) with the
    hparams timm's `transforms_imagenet_train` gives it (translate 45 % of the size, fill with the mean,
    `interpolation` for the geometric ops), and a posterize that works on Pillow 13."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    fill = tuple(min(255, round(255 * m)) for m in mean)
    hparams = dict(translate_const=max(1, int(img_size * 0.45)), img_mean=fill if len(fill) > 1 else fill[0],
                   interpolation=str_to_pil_interp(check_interpolation(interpolation)))
    try:
        if config.startswith("rand"):
            aug = rand_augment_transform(config, hparams)
        elif config.startswith("augmix"):
            aug = augment_and_mix_transform(config, {**hparams, "translate_pct": 0.3})
        else:
            aug = auto_augment_transform(config, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"data.auto_augment={config!r} is not a timm augmentation string ({e}); use e.g. "
                         f"rand-m9-mstd0.5-inc1 (DeiT), augmix-m5-w4-d2 or original") from None
    return pillow_safe_posterize(aug)


def build_train_transform(
    *,
    img_size: int,
    crop: str,
    hflip: float,
    auto_augment: str | None,
    re_prob: float,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
):
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    size = int(img_size)
    ops: list = []
    if crop == "rrc":
        ops.append(RandomResizedCropAndInterpolation(size, scale=RRC_SCALE, ratio=RRC_RATIO,
                                                     interpolation=check_interpolation(interpolation)))
    else:  # what evaluation sees (no stretching), shifted at random for `pad`
        ops += [T.Resize(math.floor(size / check_crop_pct(crop_pct)), interpolation=interp_mode(interpolation)),
                T.CenterCrop(size)]
        if crop == "pad":
            ops.append(T.RandomCrop(size, padding=max(1, size // 8)))
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if auto_augment:
        ops.append(build_auto_augment(auto_augment, size, mean, interpolation))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if re_prob > 0:
        ops.append(RandomErasing(re_prob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)


# ----------------------------------------------------------------------------------------- evaluation
def eval_spec(*, img_size: int, crop_pct: float | None, interpolation: str, mean: Sequence[float],
              std: Sequence[float], in_chans: int) -> dict[str, Any]:
    """The evaluation transform as a plain dict (what checkpoints record)."""
    return dict(img_size=int(img_size), crop_pct=None if crop_pct is None else float(crop_pct),
                interpolation=str(interpolation), mean=[float(m) for m in mean], std=[float(s) for s in std],
                in_chans=int(in_chans))


def build_eval_transform(spec: Mapping[str, Any]):
    """The evaluation transform of `spec` (`eval_spec`; missing crop_pct/interpolation: the stretching
    `Resize((s, s))`, bilinear, of checkpoints written before they were recorded)."""
    from torchvision import transforms as T

    size, mean, std = int(spec["img_size"]), list(spec["mean"]), list(spec["std"])
    interpolation = spec.get("interpolation") or "bilinear"
    crop_pct = spec.get("crop_pct")
    if crop_pct is None:
        return T.Compose([T.Resize((size, size), interpolation=interp_mode(interpolation)), T.ToTensor(),
                          T.Normalize(mean, std)])
    from timm.data.transforms_factory import transforms_imagenet_eval

    return transforms_imagenet_eval(img_size=size, crop_pct=check_crop_pct(crop_pct), crop_mode="center",
                                    interpolation=check_interpolation(interpolation), mean=tuple(mean),
                                    std=tuple(std))
