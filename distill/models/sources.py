"""Model names timm knows besides its registry: `hf-hub:ORG/NAME[@REVISION]` (a Hugging Face Hub
repository) and `local-dir:PATH` (a folder), each holding what `timm.models.save_for_hf` writes:
`config.json` (architecture, num_classes, label_names, model_args, and a pretrained_cfg with the
eval transform) and `model.safetensors` (or `pytorch_model.bin`). `distill export --format hf` writes
such a folder; `timm.create_model(NAME, pretrained=True)` reads it.

Wherever the toolkit takes a model name (`TeacherModule.model`, `StudentConfig.name`,
`build_teacher`, `build_student`, step 2's `model.teacher`), such a name stands for the architecture
and arguments of config.json, its weights as the pretrained weights (adapted to the task by timm's
loader, as any `pretrained` file is) and its class names, mean/std and input size as the task's
defaults. `pretrained: false` takes the architecture alone (random init, as timm's
`pretrained=False`); a weights file in `pretrained` besides such a name is refused. A student exported
with `--head cls|dist` (one head doubled, the other zeroed) whose heads a student would keep is
warned about in one line (`SourceModel.single_head_warning`): `--head fused` is the export to train from.

Offline-safe: a Hub repository is read from the local Hugging Face cache when it is there, with no
connection at all. Otherwise it is downloaded, unless HF_HUB_OFFLINE is set or the Hub cannot be
reached: both are a one-line error at once (huggingface_hub retries a failed download for about 20 s,
so reachability is tried first with one short connection).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCES = ("hf-hub", "local-dir")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_for_hf writes, in timm's preference order
TASK_ARGS = ("num_classes", "in_chans", "img_size")  # set by the task, not by the architecture
CONNECT_TIMEOUT_S = 5.0


def is_source(name: object) -> bool:
    """True for `hf-hub:...` and `local-dir:...` (and timm's deprecated `hf_hub:`)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    return name.partition(":")[0].strip().lower() in (*SOURCES, "hf_hub")


@dataclass
class SourceModel:
    """What a source's config.json says, and where its weights are (read only by `weights()`)."""

    name: str
    folder: Path
    weights_file: Path
    arch: str
    arch_args: dict[str, Any]
    num_classes: int
    in_chans: int
    img_size: int
    class_names: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    distill: dict[str, Any] = field(default_factory=dict)  # the toolkit's lineage record, {} from elsewhere

    def weights(self, field_name: str):
        """The weights as `distill.models.pretrained.PretrainedWeights`, with the task they were trained on."""
        from .weights import load_weights_file, split_checkpoint
        from .pretrained import PretrainedWeights

        try:
            sd, _ = split_checkpoint(load_weights_file(self.weights_file), "model.")
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{field_name}: {self.name}: {e}") from None
        return PretrainedWeights(
            {k: v for k, v in sd.items() if hasattr(v, "shape")}, self.name, arch=self.arch,
            model_kwargs=dict(self.arch_args), class_names=self.class_names, img_size=self.img_size,
            mean=self.mean, std=self.std,
        )

    def single_head_warning(self, num_classes: int, class_names, field_name: str) -> str | None:
        """One line when this is a student exported with `--head cls|dist` and its heads are kept (same
        classes): such an export has the kept head doubled and the other zeroed (`single_head_state_dict`),
        which is right for inference and a poor start for training. New heads (another task) make it moot."""
        head = self.distill.get("head")
        if self.distill.get("kind") != "student" or head not in ("cls", "dist") or num_classes != self.num_classes:
            return None
        if class_names is not None and self.class_names is not None and list(class_names) != list(self.class_names):
            return None
        kept, zeroed = ("head", "head_dist") if head == "cls" else ("head_dist", "head")
        return (f"{field_name}: {self.name} is a `distill export --head {head}` ({kept} doubled, {zeroed} zeroed, so "
                f"it returns that head alone); the student starts from those heads: export the checkpoint with "
                f"`--head fused` to start from both heads as trained")

    def input_config(self, in_chans: int) -> dict[str, Any] | None:
        """mean, std (per channel of the data) and img_size the weights were trained with."""
        from .meta import _per_channel

        if self.mean is None or self.std is None:
            return None
        return dict(mean=_per_channel(self.mean, in_chans, "mean"), std=_per_channel(self.std, in_chans, "std"),
                    img_size=int(self.img_size))


# ------------------------------------------------------------------------------------------ reading
def open_source(name: str, field_name: str = "model") -> SourceModel:
    """The config of `hf-hub:ORG/NAME[@REV]` or `local-dir:PATH` (no weights read yet)."""
    from timm.models import parse_model_name

    try:
        source, ident = parse_model_name(name.strip())
    except ValueError as e:
        raise ValueError(f"{field_name}: {e}") from None
    folder = _hub_folder(ident, name, field_name) if source == "hf-hub" else _local_folder(ident, name, field_name)
    return _read_folder(folder, name, field_name)


def _local_folder(path: str, name: str, field_name: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{field_name}: {name}: {str(folder)!r} is not a folder; give the folder "
                                f"`distill export --format hf` wrote (config.json and model.safetensors)")
    return folder.resolve()


def _read_folder(folder: Path, name: str, field_name: str) -> SourceModel:
    import timm

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{field_name}: {name} has no config.json; give a folder written by "
                                f"`distill export --format hf` or timm's save_for_hf")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{field_name}: {name}: config.json is not valid JSON ({e})") from None
    if "pretrained_cfg" not in cfg:  # timm's legacy single-dict layout
        cfg = {"architecture": cfg.get("architecture"), "num_classes": cfg.get("num_classes"), "pretrained_cfg": cfg}
    pcfg = dict(cfg.get("pretrained_cfg") or {})
    arch = cfg.get("architecture") or pcfg.get("architecture")
    if not arch:
        raise ValueError(f"{field_name}: {name}: config.json names no architecture")
    if not timm.is_model(arch):
        raise ValueError(f"{field_name}: {name} holds a {arch!r}, which timm does not know; import the package "
                         f"that registers it (the toolkit's CIFAR ResNets register with `import distill.cifar_resnet`)")
    weights_file = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"{field_name}: {name} has no weights ({' or '.join(WEIGHT_FILES)})")
    model_args = dict(cfg.get("model_args") or {})
    input_size = tuple(pcfg.get("input_size") or (3, 224, 224))
    img_size = model_args.get("img_size") or input_size[-1]
    img_size = int(img_size[-1] if isinstance(img_size, (list, tuple)) else img_size)
    labels = cfg.get("label_names") or pcfg.get("label_names")
    crop_mode = pcfg.get("crop_mode")
    return SourceModel(
        name=name, folder=folder, weights_file=weights_file, arch=arch,
        arch_args={k: v for k, v in model_args.items() if k not in TASK_ARGS},
        num_classes=int(cfg.get("num_classes") or pcfg.get("num_classes") or model_args.get("num_classes") or 1000),
        in_chans=int(model_args.get("in_chans") or input_size[0]), img_size=img_size,
        class_names=[str(c) for c in labels] if isinstance(labels, (list, tuple)) else None,
        mean=_floats(pcfg.get("mean")), std=_floats(pcfg.get("std")),
        # timm's `squash` at crop 1.0 is the toolkit's stretching resize (a spec without crop_pct)
        crop_pct=None if crop_mode == "squash" else pcfg.get("crop_pct"), interpolation=pcfg.get("interpolation"),
        distill=dict(cfg.get("distill") or {}),
    )


def _floats(values) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values else None


# ------------------------------------------------------------------------------------- the Hub
def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def hub_reachable() -> tuple[bool, str]:
    """(True, "") when one TCP connection to the Hub's endpoint (huggingface_hub's ENDPOINT) succeeds
    within CONNECT_TIMEOUT_S."""
    from huggingface_hub import constants

    from ..network import endpoint_reachable

    return endpoint_reachable(constants.ENDPOINT, CONNECT_TIMEOUT_S)


def _hub_folder(ident: str, name: str, field_name: str) -> Path:
    """The snapshot folder holding config.json and the weights of a Hub repository: the cache's, or a
    fresh download into it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = ident.partition("@")
    revision = revision or None
    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        folder = Path(cached).parent
        if any((folder / f).is_file() for f in WEIGHT_FILES):
            return folder
    how = "use local-dir:PATH with a folder saved where there is network (`distill export --format hf`, timm's save_for_hf)"
    if _hub_offline():
        raise FileNotFoundError(f"{field_name}: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                f"set; {how}")
    ok, reason = hub_reachable()
    if not ok:
        raise FileNotFoundError(f"{field_name}: {name} is not in the local Hugging Face cache and the Hub cannot be "
                                f"reached ({reason}); {how}")
    try:
        folder = Path(hf_hub_download(repo, "config.json", revision=revision)).parent
        for filename in WEIGHT_FILES:
            try:
                hf_hub_download(repo, filename, revision=revision)
                break
            except EntryNotFoundError:
                continue
    except Exception as e:  # noqa: BLE001 - missing repository, gated, HTTP and connection errors alike
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{field_name}: {name} could not be downloaded ({type(e).__name__}: {reason}); "
                                f"check the repository name or {how}") from None
    return folder


# ------------------------------------------------------------------------------------- builders
def source_pretrained(src: SourceModel, pretrained: Any, name_field: str, pretrained_field: str):
    """The weights a source name brings: its own (pretrained unset or true), none (false), or an
    error for a weights file given as well."""
    if pretrained is False:
        return None
    text = "" if pretrained is None or pretrained is True else str(pretrained).strip().lower()
    if text in ("false", "no", "0"):
        return None
    if text in ("", "none", "null", "true", "yes", "1"):
        return src.weights(name_field)
    raise ValueError(f"{pretrained_field}: {name_field} {src.name} brings its own weights; leave "
                     f"{pretrained_field} unset (or false for its architecture with a random init)")


def source_input_config(name: str, pretrained: Any, in_chans: int, field_name: str) -> dict[str, Any] | None:
    """mean/std/img_size a source's weights expect (for the data fields left unset); None when
    `pretrained` is false (the architecture alone)."""
    if pretrained is False or str(pretrained).strip().lower() in ("false", "no", "0"):
        return None
    return open_source(name, field_name).input_config(in_chans)


def name_field_of(pretrained_field: str, leaf: str) -> str:
    """The recipe field of the model name beside a `...pretrained` field (`model.pretrained` ->
    `model.model`, `model.student.pretrained` -> `model.student.name`)."""
    head = pretrained_field[: -len("pretrained")] if pretrained_field.endswith("pretrained") else f"{pretrained_field}."
    return f"{head}{leaf}"
