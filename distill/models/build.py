"""Teacher and student networks, built on timm. Each model carries its metadata in timm's
`pretrained_cfg` (number and names of classes, mean/std, input size; `distill.models.meta`) so it can
be rebuilt and fed correctly without the recipe that trained it."""
from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

import timm
import torch
from torch import nn
from timm.models.deit import VisionTransformerDistilled

from . import cifar_resnet  # noqa: F401  (registers cifar_resnet* with timm)
from .meta import set_model_meta
from .sources import is_source, name_field_of
from .weights import STUDENT_KIND, load_weights_file, split_checkpoint


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"model {name!r} is not a timm model{hint}")


def _create(name: str, **kwargs) -> nn.Module:
    _check_model_name(name)
    return timm.create_model(name, pretrained=False, **kwargs)


def _pretrained_weights(pretrained: Any, name: str, field: str):
    """`pretrained` read into `distill.models.pretrained.PretrainedWeights`, or None for a random init."""
    if pretrained is None or pretrained is False:
        return None
    from .pretrained import resolve

    _check_model_name(name)
    return resolve(pretrained, name, field)


def _open_source(name: str, pretrained: Any, pretrained_field: str, leaf: str):
    """(config, weights) of an `hf-hub:`/`local-dir:` model name (`distill.models.sources`); the weights
    are None for `pretrained: false`."""
    from .sources import open_source, source_pretrained

    name_field = name_field_of(pretrained_field, leaf)
    src = open_source(name, name_field)
    return src, source_pretrained(src, pretrained, name_field, pretrained_field)


def _input_channels(name: str, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Input channels of a plain state_dict: its first convolution's (timm's `first_conv` of the model,
    else the first 4-D weight)."""
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    first = getattr(cfg, "first_conv", None) if cfg is not None else None
    weight = state_dict.get(f"{first}.weight") if isinstance(first, str) else None
    if weight is None:
        weight = next((v for v in state_dict.values() if torch.is_tensor(v) and v.ndim == 4), None)
    return int(weight.shape[1]) if weight is not None else None


def build_teacher(
    name: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    checkpoint: str | os.PathLike | dict | None = None,
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    img_size: int | None = None,
    pretrained: bool | str | os.PathLike | None = None,
    pretrained_field: str = "pretrained",
    pretrained_remap: Sequence[Sequence[str]] | None = None,
    pretrained_match: str = "name",
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm CNN (resnet18/50, regnety_*, cifar_resnet18, ...) with its metadata attached.

    `checkpoint` is a step-1 checkpoint of this toolkit (its architecture, classes, mean/std and input
    size are read from it and win over the arguments), a plain state_dict file or a safetensors file,
    all loaded without running pickled code: the network as it was trained.

    `pretrained` initialises the network for a new task instead (`distill.models.pretrained`): true for
    timm's pretrained weights of `name`, or a weights file (safetensors, .pth/.bin, DeiT's release
    format, a step-1 or step-2 checkpoint). The classifier is new when the class count (or the
    recorded class names) differ, the first convolution is adapted to `in_chans`; architecture
    arguments a toolkit file records (e.g. base_width) fill those not given. `pretrained_field` names
    the setting in error messages. A file from another library whose tensor names are not timm's:
    `pretrained_remap` (ordered `(regex, replacement)` rules) and/or `pretrained_match="order"` (pair
    the tensors in file order; every shape must line up), see `distill.models.pretrained`.

    `name` may also be `hf-hub:ORG/NAME` or `local-dir:PATH` (`distill.models.sources`): the
    architecture and arguments of that folder's config.json, its weights as `pretrained` (false: the
    architecture alone), its classes, mean/std and input size for those not given. `in_chans` None:
    the checkpoint's or the source's, else 3.
    """
    state_dict, hp = None, {}
    recorded_eval: dict[str, Any] = {}
    if checkpoint is not None:
        obj = checkpoint if isinstance(checkpoint, dict) else load_weights_file(checkpoint)
        checkpoint = "<in-memory checkpoint>" if isinstance(checkpoint, dict) else checkpoint
        state_dict, hp = split_checkpoint(obj, "model.")
        if hp.get("distill_kind") == STUDENT_KIND:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} is a student (step 2) checkpoint; pass a teacher (step 1) checkpoint"
            )
        if hp:
            if hp.get("model") and hp["model"] != name:
                name = hp["model"]  # the checkpoint knows its own architecture
            num_classes = hp.get("num_classes") or num_classes
            in_chans = hp.get("in_chans") or in_chans
            class_names = hp.get("class_names") or class_names
            mean, std = hp.get("input_mean") or mean, hp.get("input_std") or std
            img_size = hp.get("input_size") or img_size
            timm_kwargs = {**(hp.get("model_kwargs") or {}), **timm_kwargs}
        else:  # a plain state_dict: its tensors tell the class and channel counts
            if num_classes is None:
                head = [v for k, v in state_dict.items() if k.endswith(("fc.weight", "head.weight", "classifier.weight"))]
                num_classes = int(head[-1].shape[0]) if head else None
            in_chans = _input_channels(name, state_dict) or in_chans
    if is_source(name):  # after the checkpoint: a toolkit checkpoint names its own architecture
        src, source_weights = _open_source(name, pretrained if checkpoint is None else False, pretrained_field, "model")
        name, pretrained = src.arch, source_weights
        timm_kwargs = {**src.arch_args, **timm_kwargs}
        num_classes = num_classes or src.num_classes
        if class_names is None and num_classes == src.num_classes:
            class_names = src.class_names
        in_chans, img_size = in_chans or src.in_chans, img_size or src.img_size
        mean, std = mean or src.mean, std or src.std
        recorded_eval = dict(crop_pct=src.crop_pct, interpolation=src.interpolation)
    in_chans = in_chans or 3
    if num_classes is None:
        raise ValueError("build_teacher: num_classes is required (or a checkpoint of this toolkit that records it)")
    if checkpoint is not None and pretrained not in (None, False):
        raise ValueError("build_teacher: give checkpoint (the network as trained) or pretrained (weights to start "
                         "from for a new task), not both")
    weights = _pretrained_weights(pretrained, name, pretrained_field)
    if weights is not None:
        if weights.arch and weights.arch != name:
            why = f" ({weights.convention})" if weights.convention else ""
            raise ValueError(f"{pretrained_field}: {weights.source} holds a {weights.arch}{why}, not a {name}; "
                             f"name that architecture or use weights of {name}")
        timm_kwargs = {**weights.model_kwargs, **timm_kwargs}
        _check_model_name(name)
        from .pretrained import create_pretrained

        model = create_pretrained(name, weights, num_classes=num_classes, in_chans=in_chans, class_names=class_names,
                                  field_name=pretrained_field, remap=pretrained_remap, match=pretrained_match,
                                  **timm_kwargs)
    else:
        model = _create(name, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    if state_dict is not None:
        mismatched = [(k, tuple(v.shape), tuple(model.state_dict()[k].shape)) for k, v in state_dict.items()
                      if k in model.state_dict() and tuple(v.shape) != tuple(model.state_dict()[k].shape)]
        if mismatched:
            key, theirs, ours = mismatched[0]
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not fit {name} with {num_classes} classes and {in_chans} "
                f"channels: {len(mismatched)} tensor(s) have other shapes, e.g. {key} {list(theirs)} in the file, "
                f"{list(ours)} in the model; name the architecture (and model_kwargs) it was trained with")
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not fit {name} with {num_classes} classes and {in_chans} "
                f"channels: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
    set_model_meta(
        model, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
        class_names=class_names, mean=mean, std=std,
    )
    model.pretrained_cfg["architecture"] = name
    model.distill_spec = dict(name=name, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    # How a step-1 checkpoint's images were prepared (TeacherModule.setup records it; None in older ones:
    # the legacy resize): predict/export rebuild its eval transform, step 2 its input resize from it.
    model.distill_eval = dict(crop_pct=hp.get("input_crop_pct", recorded_eval.get("crop_pct")),
                              interpolation=hp.get("input_interpolation", recorded_eval.get("interpolation")))
    return model


def build_student(
    name: str = "deit_tiny_distilled_patch16_224",
    num_classes: int | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    drop_path_rate: float = 0.1,
    distilled: bool = True,
    pretrained: bool | str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    pretrained_field: str = "pretrained",
    pretrained_remap: Sequence[Sequence[str]] | None = None,
    pretrained_match: str = "name",
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm Vision Transformer student.

    With `distilled=True` it is timm's `VisionTransformerDistilled` (DeiT's class + distillation tokens):
    in training mode it returns `(z_cls, z_dist)`, in eval mode the fused logits `(z_cls + z_dist) / 2`.
    `distilled=False` gives the plain ViT of the same size (one head), for Hinton-style KD or the
    no-distillation baseline. `embed_dim`, `depth`, `num_heads`, `patch_size` override the named size.

    `pretrained` initialises it from pretrained weights (`distill.models.pretrained`): true for timm's weights
    of the named model, or a file (safetensors, .pth/.bin, DeiT's release format, a `distill export`
    output, a step-2 checkpoint). Position embeddings are resampled to the image size and patch grid,
    the patch embedding to `in_chans`, both heads are new when the class count (or, given
    `class_names`, the recorded class names) differ; the distillation token is kept, or new for
    plain ViT weights. Sizes a toolkit file records fill `embed_dim`/`depth`/`num_heads`/`patch_size`
    left as None. `pretrained_remap` / `pretrained_match`: as for `build_teacher`.

    `name` may also be `hf-hub:ORG/NAME` or `local-dir:PATH` (`distill.models.sources`): the
    architecture and sizes of that folder's config.json, its weights as `pretrained` (false: the
    architecture alone), its classes and input for those left None (else 1000 classes, 224 px, 3
    channels).
    """
    if is_source(name):
        src, pretrained = _open_source(name, pretrained, pretrained_field, "name")
        name = src.arch
        sizes = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        patch_size, embed_dim, depth, num_heads = (v if v is not None else src.arch_args.get(k) for k, v in sizes.items())
        timm_kwargs = {**{k: v for k, v in src.arch_args.items() if k not in sizes}, **timm_kwargs}
        num_classes = num_classes or src.num_classes
        if class_names is None and num_classes == src.num_classes:
            class_names = src.class_names
        img_size, in_chans = img_size or src.img_size, in_chans or src.in_chans
        single_head = src.single_head_warning(num_classes, class_names, name_field_of(pretrained_field, "name"))
        if single_head and pretrained is not None:  # warned, not refused: a Hub model may exist only this way
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(single_head)
    num_classes, img_size, in_chans = num_classes or 1000, img_size or 224, in_chans or 3
    if distilled and "distilled" not in name:
        raise ValueError(
            f"student {name!r} has no distillation token; use a *_distilled_* model "
            f"(e.g. deit_tiny_distilled_patch16_224) or distilled=False"
        )
    arch = name if distilled else name.replace("_distilled", "")
    weights = _pretrained_weights(pretrained, arch, pretrained_field)
    overrides = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    if weights is not None:  # sizes the file records, where none are given
        overrides = {k: v if v is not None else weights.model_kwargs.get(k) for k, v in overrides.items()}
        patch_size, embed_dim, depth, num_heads = (overrides[k] for k in ("patch_size", "embed_dim", "depth", "num_heads"))
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if weights is not None:
        from .pretrained import create_pretrained

        model = create_pretrained(
            arch, weights, num_classes=num_classes, in_chans=in_chans, class_names=class_names, distilled=distilled,
            field_name=pretrained_field, remap=pretrained_remap, match=pretrained_match, img_size=img_size,
            drop_path_rate=drop_path_rate, **kwargs, **timm_kwargs,
        )
    else:
        model = _create(
            arch, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
            drop_path_rate=drop_path_rate, **kwargs, **timm_kwargs,
        )
    # The patch size in effect (given, or the named model's: 16 for DeiT) must divide the image, or
    # timm silently drops the pixels past the last whole patch.
    effective_patch = model.patch_embed.patch_size[-1]
    if img_size % effective_patch:
        whose = "" if patch_size is not None else f"{name}'s "
        raise ValueError(
            f"img_size={img_size} is not divisible by {whose}patch_size={effective_patch}; "
            f"choose a patch_size that divides it"
        )
    if distilled:
        assert isinstance(model, VisionTransformerDistilled)
        model.set_distilled_training(True)
    set_model_meta(model, num_classes=num_classes, in_chans=in_chans, img_size=img_size, class_names=class_names)
    model.pretrained_cfg["architecture"] = arch
    model.distill_spec = dict(
        name=name, num_classes=num_classes, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path_rate,
        distilled=distilled, **timm_kwargs,
    )
    return model
