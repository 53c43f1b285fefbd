"""The frozen teacher of step 2, as one object: where it comes from, how it is frozen, what input it
expects, how it runs (dtype, memory format, compiled), where its outputs come from (live or the
teacher-output cache) and what identifies it in the student's lineage.

`DistillModule` holds one `FrozenTeacher` (or a `distill.teacher.ensemble.TeacherEnsemble` of
several) and only asks it for logits and feature maps; everything about the teacher lives here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.build import build_teacher
from ..models.meta import model_meta
from ..models.sources import is_source
from ..models.weights import STUDENT_KIND, load_weights_file, sha256_of
from ..training.lineage import teacher_accuracy


# PIL's `convert("L")` (ITU-R 601-2 luma), what a grayscale teacher was trained on from colour files
LUMA = (0.299, 0.587, 0.114)
# torch's resampling with PIL's kernels (antialiased modes: bicubic with a = -0.5 as PIL, bilinear as PIL's
# triangle filter); PIL's box/hamming/lanczos have no torch twin, the nearest kernel stands in for them.
TORCH_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic", "box": "bilinear",
               "hamming": "bilinear", "lanczos": "bicubic"}


class TeacherInput(nn.Module):
    """Turns a batch normalised for the student into what the teacher was trained on: other channels,
    other mean/std, other input size. The identity when both agree.

    Step 1 reads its images with PIL: colour files converted with `convert("L")` for a grayscale
    teacher (0.299 R + 0.587 G + 0.114 B) or replicated for a colour one, resized by PIL with the
    recorded `interpolation` (`data.interpolation` of step 1) and stored as uint8 levels. The batch goes
    the same way here:

    - upsampling (a teacher trained at a larger size than the student's, e.g. an ImageNet CNN at 96 px
      on 32 px CIFAR images): the teacher's interpolation with PIL's kernels (torch's antialiased modes),
      width then height, each pass rounded to uint8 levels as PIL's is, so a student batch of the
      original images gives the teacher its step-1 evaluation input to within one uint8 level (PIL's
      fixed-point arithmetic);
    - downsampling (a teacher smaller than the student, e.g. a CIFAR CNN at 32 px for a student fed
      images upsampled to 224): plain interpolation without antialiasing, which inverts an integer-factor
      upsampling exactly, so the teacher gets back the images it was trained on (as locality guidance's
      reference code does). An antialiased resize would blur them instead.
    """

    def __init__(self, src_mean, src_std, dst_mean, dst_std, src_chans: int, dst_chans: int, dst_size: int | None,
                 interpolation: str = "bilinear"):
        super().__init__()
        if interpolation not in TORCH_MODES:
            raise ValueError(f"teacher input interpolation {interpolation!r} is unknown; use one of {', '.join(TORCH_MODES)}")
        self.dst_chans, self.dst_size, self.interpolation = dst_chans, dst_size, interpolation
        self.src_chans = src_chans
        self.channels_differ = src_chans != dst_chans
        self.renormalise = self.channels_differ or tuple(src_mean) != tuple(dst_mean) or tuple(src_std) != tuple(dst_std)
        view = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("src_mean", view(src_mean), persistent=False)
        self.register_buffer("src_std", view(src_std), persistent=False)
        self.register_buffer("dst_mean", view(dst_mean), persistent=False)
        self.register_buffer("dst_std", view(dst_std), persistent=False)
        self.register_buffer("luma", view(LUMA), persistent=False)

    def describe(self) -> str:
        """How the input is resized (for the teacher cache's manifest: other resizing, other logits)."""
        return f"{self.interpolation}: up with PIL kernels to uint8 levels, down plain; gray by luma {LUMA}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.dst_size, self.dst_size) if self.dst_size else tuple(x.shape[-2:])
        up = x.shape[-2] < size[0] or x.shape[-1] < size[1]
        down = not up and tuple(x.shape[-2:]) != size
        if not (self.renormalise or up):
            return self._resize(x, size, antialias=False) if down else x  # linear: commutes with normalisation
        x = x * self.src_std.to(x.dtype) + self.src_mean.to(x.dtype)  # pixel values in [0, 1]
        if self.channels_differ:
            if self.dst_chans == 1:
                luma = self.luma.to(x.dtype) if x.shape[1] == 3 else torch.full_like(self.luma[:, :1], 1 / x.shape[1])
                x = (x * luma[:, : x.shape[1]]).sum(1, keepdim=True)
            else:
                x = x.mean(1, keepdim=True).expand(-1, self.dst_chans, -1, -1)  # gray replicated, as convert("RGB")
        if up:  # as PIL: the width pass, then the height pass, each stored as uint8 levels
            x = self._resize(x, (x.shape[-2], size[1]), antialias=True).mul(255).round().clamp(0, 255)
            x = self._resize(x, size, antialias=True).round().clamp(0, 255) / 255
        elif down:
            x = self._resize(x, size, antialias=False)
        return (x - self.dst_mean.to(x.dtype)) / self.dst_std.to(x.dtype)

    def _resize(self, x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
        mode = TORCH_MODES[self.interpolation]
        if mode == "nearest-exact":
            return F.interpolate(x, size=size, mode=mode)
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)


class TeacherOutputs:
    """Where a teacher's training logits come from: the attached teacher-output cache when there is
    one (the batch then carries its view keys), else the live forward. Shared by `FrozenTeacher` and
    `TeacherEnsemble` (whose cache holds the combined logits)."""

    cache = None  # a distill.teacher.cache.CachedTeacher once attached

    def attach_cache(self, cached) -> None:
        self.cache = cached

    def training_logits(self, batch) -> torch.Tensor:
        if self.cache is not None:
            return self.cache(self, batch)
        return self(batch[0])


class FrozenTeacher(TeacherOutputs, nn.Module):
    """A teacher network that never learns and never leaves eval mode.

    - Frozen for good: no gradients, `train()` is a no-op (BatchNorm statistics and dropout never
      change, also across Lightning's train/eval switches around validation). The owner keeps it out
      of the optimizer and out of checkpoints (its weights are reloaded from `identity["path"]`).
    - `adapt_to(mean, std, in_chans)`: `TeacherInput` between the student's data and what the
      teacher was trained on.
    - `prepare(dtype, channels_last, compile)`: speed options, applied once when fitting starts.
    - `forward(x)`: logits on the live network; `training_logits(batch)` reads the teacher-output cache
      when one is attached (`attach_cache`) and the batch names its views.
    - `identity`: path, sha256, architecture, classes, W&B run id and accuracy of the step-1 run, for
      the student's lineage and for the cache's fingerprint.
    """

    def __init__(self, network: nn.Module, identity: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.network = network
        network.eval()
        network.requires_grad_(False)
        meta = model_meta(network)
        self.identity: dict[str, Any] = dict(identity or {})
        self.identity.update(architecture=meta["name"], num_classes=meta["num_classes"],
                             class_names=meta["class_names"], img_size=meta["img_size"])
        self.input: nn.Module = nn.Identity()
        self._cast: torch.dtype | None = None
        self._channels_last = False
        self._prepared = False
        self._watched: dict[str, torch.Tensor] = {}
        self.cache = None
        self.eval()

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: "str | os.PathLike | nn.Module | FrozenTeacher", expected_sha256: str | None = None,
             arch: str | None = None, field: str = "model.teacher") -> "FrozenTeacher":
        """From a step-1 checkpoint, a plain state_dict or safetensors file (`arch` names its timm
        architecture), or a network built with `distill.build_teacher`. `expected_sha256`: refuse a
        file whose digest differs (the file changed since the student was trained)."""
        if isinstance(source, FrozenTeacher):
            return source
        if isinstance(source, nn.Module):
            return cls(source)
        if is_source(source):
            return cls.from_source(str(source), expected_sha256, field)
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{field}: teacher checkpoint {str(path)!r} does not exist; train step 1 first or fix the path")
        digest = sha256_of(path)
        if expected_sha256 and digest != expected_sha256:
            raise ValueError(
                f"{field}: {str(path)!r} has sha256 {digest[:12]}... but this run was trained with "
                f"{expected_sha256[:12]}...; the teacher file changed since, restore it or start a new run"
            )
        obj = load_weights_file(path)
        hp = obj.get("hyper_parameters") or {}
        if hp.get("distill_kind") == STUDENT_KIND:
            raise ValueError(f"{field}: {str(path)!r} is a student (step 2) checkpoint; pass a teacher (step 1) checkpoint")
        if arch is None and not hp.get("model"):
            raise ValueError(f"{field}: {str(path)!r} is a plain state_dict; name its architecture with "
                             f"model.teacher_model (e.g. regnety_160)")
        network = build_teacher(arch or hp["model"], checkpoint=obj)
        run = obj.get("distill_run") or {}
        identity = dict(path=str(path), sha256=digest, run_id=run.get("wandb_id"), run_dir=run.get("run_dir"),
                        **teacher_accuracy(run), split=hp.get("data_split"))
        return cls(network, identity)

    @classmethod
    def from_source(cls, name: str, expected_sha256: str | None = None, field: str = "model.teacher") -> "FrozenTeacher":
        """From `hf-hub:ORG/NAME` or `local-dir:PATH` (`distill.models.sources`, e.g. a teacher written by
        `distill export --format hf`): the network as saved there, identified by its weights file's
        sha256 and the lineage its config.json records."""
        from ..models.sources import open_source

        src = open_source(name, field)
        digest = sha256_of(src.weights_file)
        if expected_sha256 and digest != expected_sha256:
            raise ValueError(
                f"{field}: {name} has weights with sha256 {digest[:12]}... but this run was trained with "
                f"{expected_sha256[:12]}...; the teacher changed since, restore it or start a new run"
            )
        if src.distill.get("kind") == STUDENT_KIND:
            raise ValueError(f"{field}: {name} is an exported student; pass a teacher (step 1) export or checkpoint")
        network = build_teacher(src.arch, src.num_classes, src.in_chans, class_names=src.class_names, mean=src.mean,
                                std=src.std, img_size=src.img_size, pretrained=src.weights(field),
                                pretrained_field=field, **src.arch_args)
        # how its images were resized in step 1 (config.json's pretrained_cfg): `adapt_to` resizes as it did
        network.distill_eval = dict(crop_pct=src.crop_pct, interpolation=src.interpolation)
        record = src.distill
        identity = dict(path=name, sha256=digest, run_id=(record.get("run") or {}).get("wandb_id"),
                        run_dir=(record.get("run") or {}).get("run_dir"),
                        **teacher_accuracy(record), split=record.get("data_split"))
        return cls(network, identity)

    # ------------------------------------------------------------------------------ the task
    @property
    def meta(self) -> dict[str, Any]:
        return model_meta(self.network)

    @property
    def task(self) -> dict[str, Any]:
        """The task the teacher was trained for: what a student built without data defaults to."""
        meta = self.meta
        return dict(num_classes=meta["num_classes"], in_chans=meta["in_chans"], img_size=meta["img_size"])

    def check_task(self, num_classes: int, class_names: Sequence[str], field: str = "model.teacher") -> None:
        meta = self.meta
        if meta["num_classes"] != num_classes:
            raise ValueError(f"{field}: the teacher predicts {meta['num_classes']} classes but the data has {num_classes}; "
                             f"use a teacher trained on this data")
        if meta["class_names"] is not None and list(meta["class_names"]) != list(class_names):
            raise ValueError(f"{field}: the teacher's classes {meta['class_names'][:4]}... differ in order or "
                             f"name from the data's {list(class_names)[:4]}...; use a teacher trained on this data")

    def adapt_to(self, mean: Sequence[float], std: Sequence[float], in_chans: int) -> None:
        """Feed the teacher from batches normalised with the data's `mean`/`std` and `in_chans`, resized
        with the interpolation its step-1 data was (`TeacherInput`; recorded in its checkpoint)."""
        meta = self.meta
        recorded = getattr(self.network, "distill_eval", None) or {}
        self.input = TeacherInput(mean, std, meta["mean"], meta["std"], in_chans, meta["in_chans"], meta["img_size"],
                                  recorded.get("interpolation") or "bilinear")

    # ------------------------------------------------------------------------ running it
    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # frozen for good: never in train mode

    def fingerprint(self) -> str:
        """sha256 of the weights (computed once, before any dtype cast): the cache's teacher identity."""
        if "weights_sha256" not in self.identity:
            from .cache import weights_sha256

            self.identity["weights_sha256"] = weights_sha256(self.network)
        return self.identity["weights_sha256"]

    def prepare(self, dtype: torch.dtype | None = None, channels_last: bool = False, compile: bool = False) -> None:
        """Speed options, applied once (call `fingerprint()` first when a cache will be used): keep weights and inputs in `dtype` (no per-step autocast casts),
        channels_last memory format (faster convolutions on GPU), `torch.compile`."""
        if self._prepared:
            return
        self._prepared = True
        self._cast = dtype if dtype not in (None, torch.float32) else None
        if self._cast is not None:
            self.network.to(dtype=self._cast)
        self._channels_last = channels_last
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        if compile:
            self.network.compile()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        if self._cast is not None:
            x = x.to(self._cast)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x)

    # ------------------------------------------------------------------- feature maps
    def watch(self, layers: Sequence[str], field: str = "model.feature_guidance.teacher_layers") -> None:
        """Keep the outputs of the named submodules of every forward (for feature guidance). The hooks
        are registered once; `watched(layers)` returns the outputs of the latest forward."""
        modules = dict(self.network.named_modules())
        for name in layers:
            if name not in modules:
                candidates = [n for n, m in modules.items() if n and n.count(".") <= 1 and any(m.children())]
                raise ValueError(f"{field}: the teacher ({self.identity.get('architecture')}) has no module {name!r}; "
                                 f"choose among {', '.join(candidates[:12])}")
            if name not in self._watched:
                self._watched[name] = None  # type: ignore[assignment]
                modules[name].register_forward_hook(self._keep(name))

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self._watched[name] = output
        return hook

    def watched(self, layers: Sequence[str]) -> list[torch.Tensor]:
        return [self._watched[name] for name in layers]
