"""`distill export CKPT --format hf --out DIR`: a student (with the chosen head) or a teacher as the
folder timm shares models in, written by timm's own `timm.models.save_for_hf`:

- `config.json`: architecture, num_classes, label_names, model_args (what rebuilds the network) and a
  pretrained_cfg holding the evaluation transform the checkpoint recorded (input_size, mean, std,
  crop_pct, interpolation; crop_mode `squash` for the stretching resize of checkpoints written before
  crop_pct was recorded), plus a `distill` record timm ignores (kind, head, checkpoint sha256,
  teacher lineage, validation metrics and the epoch/step they were measured at, W&B run id);
- `model.safetensors`;
- `README.md`: the model card (`distill.sharing.model_card`);
- `recipe.yaml`: the resolved recipe of the run, when its run folder has one (`config.yaml`), its
  absolute paths made relative or dropped (`distill.sharing.portable`): nothing published names the
  training machine's folders (the card's command line neither).

So `timm.create_model("local-dir:DIR", pretrained=True)` (or `"hf-hub:ORG/NAME"` once pushed) returns
the checkpoint's logits, and `timm.data.resolve_data_config` + `create_transform` give the toolkit's
evaluation transform. Both are checked before the folder appears: everything is written into a
temporary sibling folder, reloaded through timm, compared, and only then moved to DIR (a failed
check, or any error, leaves nothing at DIR).

A student's head: a distilled DeiT keeps its architecture (its two tokens attend to each other, so no
one-token model computes the same features); `--head cls|dist` rewrites the weights as
`distill.models.heads.single_head_state_dict` does (the kept head doubled, the other zeroed) and timm's
model, which returns the mean of both heads when not in distillation training, returns that head.
"""
from __future__ import annotations

import copy
import math
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Every file an export writes, and the only names `_check_out` replaces and `distill push` uploads.
# The first two are timm's save_for_hf's (checked after each save); the other two are written below.
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, RECIPE_FILE = "config.json", "model.safetensors", "README.md", "recipe.yaml"
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, RECIPE_FILE)
CHECK_INPUTS = 8  # random inputs the reloaded model is compared on
MAX_LOGIT_DIFF = 1e-5
# What timm's registry cfg says about *its* weights (a tag, a URL, a paper, a licence); not true of these.
PROVENANCE_KEYS = ("tag", "url", "hf_hub_id", "hf_hub_filename", "file", "source", "origin_url", "paper_ids",
                   "paper_name", "notes", "description", "license", "state_dict")


@dataclass
class HfExport:
    """What `export_hf` wrote and checked."""

    folder: Path
    max_diff: float  # max |logits of timm.create_model("local-dir:...") - the checkpoint's|
    transform_diff: float | None  # max |timm's eval transform - the toolkit's| on a probe image
    load: str  # the timm.create_model line that loads it
    wandb: str | None = None  # what was logged to W&B, if anything


@dataclass
class _Exportable:
    kind: str
    head: str | None
    model: Any  # the network as saved (the chosen head)
    reference: Callable  # x -> the checkpoint's logits of that head
    spec: dict[str, Any]
    hp: dict[str, Any]
    obj: dict[str, Any]


def _load(checkpoint: str | os.PathLike, head: str | None) -> _Exportable:
    from ..data.transforms import eval_spec
    from ..models.build import build_teacher
    from ..models.heads import student_heads
    from ..models.meta import eval_spec_of, model_meta
    from ..models.weights import STUDENT_KIND, TEACHER_KIND, load_weights_file

    obj = load_weights_file(checkpoint)
    hp = dict(obj.get("hyper_parameters") or {})
    kind = hp.get("distill_kind")
    if kind == STUDENT_KIND:
        from ..models.heads import single_head_state_dict
        from ..student.module import load_student

        head = head or "fused"
        if head not in ("cls", "dist", "fused"):
            raise ValueError(f"--head {head!r} is unknown; use cls, dist or fused")
        trained = load_student(checkpoint)
        model = copy.deepcopy(trained)
        model.load_state_dict(single_head_state_dict(trained, head))
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(False)  # what timm builds from config.json: eval returns the heads' mean

        def reference(x):
            z_cls, z_dist = student_heads(trained, x)
            return {"cls": z_cls, "dist": z_dist, "fused": (z_cls + z_dist) / 2}[head]

        return _Exportable("student", head, model.eval(), reference, eval_spec_of(trained), hp, obj)
    if kind == TEACHER_KIND:
        if head not in (None, "fused"):
            raise ValueError(f"--head {head} is for students; a teacher has one head (leave --head out)")
        model = build_teacher(hp["model"], checkpoint=obj).eval()
        meta = model_meta(model)
        spec = eval_spec(img_size=meta["img_size"], crop_pct=hp.get("input_crop_pct"),
                         interpolation=hp.get("input_interpolation") or "bilinear", mean=meta["mean"], std=meta["std"],
                         in_chans=meta["in_chans"])
        return _Exportable("teacher", None, model, copy.deepcopy(model).eval(), spec, hp, obj)
    raise ValueError(f"{str(checkpoint)!r} is not a teacher (step 1) or student (step 2) checkpoint of this toolkit")


def _data_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The eval transform as timm's data config (`resolve_data_config` keys)."""
    crop_pct, crop_mode = (1.0, "squash") if spec.get("crop_pct") is None else (float(spec["crop_pct"]), "center")
    size = int(spec["img_size"])
    return dict(input_size=(int(spec["in_chans"]), size, size), mean=tuple(spec["mean"]), std=tuple(spec["std"]),
                crop_pct=crop_pct, crop_mode=crop_mode, interpolation=spec.get("interpolation") or "bilinear")


def _teacher_lineage(identity: dict[str, Any]) -> dict[str, Any]:
    """The teacher's identity without local paths (what the card and config.json may publish)."""
    keep = ("architecture", "sha256", "val_acc", "val_acc_at", "weights_at", "run_id", "num_classes")
    if identity.get("members"):
        return dict(members=[{k: m.get(k) for k in keep} for m in identity["members"]],
                    combine=identity.get("combine"), architecture=identity.get("architecture"))
    return {k: identity.get(k) for k in keep} if identity else {}


def _run_recipe(run: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The resolved recipe in the run folder (`config.yaml`), and its path; ({}, None) without one."""
    import yaml

    path = Path(run.get("run_dir") or "") / "config.yaml"
    if not run.get("run_dir") or not path.is_file():
        return {}, None
    try:
        return dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}), path
    except yaml.YAMLError:
        return {}, None


def _dataset_name(recipe: dict[str, Any]) -> str | None:
    data = dict(recipe.get("data") or {})
    source = data.get("source")
    if source == "imagefolder" and data.get("root"):
        return Path(str(data["root"])).name.lower()
    return str(source).lower() if source else None


def _recipe_summary(ex: _Exportable, run: dict[str, Any]) -> dict[str, Any]:
    from .portable import portable_command

    hp, out = ex.hp, {}
    if ex.kind == "student":
        loss = dict(hp.get("loss") or {})
        out["loss"] = ", ".join(f"{k} {loss[k]}" for k in ("mode", "alpha", "tau") if k in loss)
    else:
        out["label smoothing"] = hp.get("label_smoothing")
    out["AdamW lr"] = hp.get("lr")
    out["weight decay"] = hp.get("weight_decay")
    out["warm-up epochs"] = hp.get("warmup_epochs")
    for key, label in (("ema_decay", "EMA decay"), ("layer_decay", "layer decay"), ("pretrained_from", "started from")):
        if hp.get(key):
            out[label] = hp[key]
    if out.get("started from"):  # a weights file or local-dir: folder of the training machine
        out["started from"] = portable_command(str(out["started from"]), run.get("run_dir"))
    if hp.get("feature_guidance"):
        out["feature guidance"] = "on"
    return {k: v for k, v in out.items() if v not in (None, "")}


def _check(folder: Path, ex: _Exportable) -> tuple[float, float | None, Any]:
    """(max logit difference, max transform difference) of the folder reloaded by timm."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    from ..data.transforms import build_eval_transform

    chans, size = int(ex.spec["in_chans"]), int(ex.spec["img_size"])
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(CHECK_INPUTS, chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((reloaded(x) - ex.reference(x)).abs().max())
    tdiff = None
    if chans in (1, 3):  # a non-square probe image, as photos are
        pixels = np.random.default_rng(0).integers(0, 256, (size + 3, size + 7) + (() if chans == 1 else (3,)), np.uint8)
        image = Image.fromarray(pixels, "L" if chans == 1 else "RGB")
        theirs = timm.data.create_transform(**timm.data.resolve_data_config(model=reloaded))(image)
        ours = build_eval_transform(ex.spec)(image)
        tdiff = float((theirs - ours).abs().max()) if theirs.shape == ours.shape else math.inf
    return diff, tdiff, reloaded


def listing(folder: Path, names: list[str] | None = None, most: int = 8) -> str:
    """`a, b/, c and 3 more` (a trailing / marks a folder): what a one-line message says a folder holds."""
    names = sorted(p.name for p in folder.iterdir()) if names is None else names
    shown = [f"{n}/" if (folder / n).is_dir() else n for n in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def is_toolkit_export(folder: Path) -> bool:
    """True when `folder/config.json` carries the record an export of this toolkit writes."""
    import json

    try:
        record = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("distill")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(record, dict) and str(record.get("toolkit", "")).startswith("distill ")


def _check_out(out: Path) -> None:
    """`out` may be new, an empty folder, or an earlier export of this toolkit holding nothing else:
    only those are replaced. Anything else may be the user's (a clone of a Hub repository with its
    .git and notes, a folder of timm's save_for_hf): refused, untouched."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not an earlier export; choose a new or empty folder")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    others = [n for n in names if n not in EXPORT_FILES or not (out / n).is_file()]
    if is_toolkit_export(out):
        if not others:
            return
        raise ValueError(f"--out {str(out)!r} is not an earlier export of distill alone (it holds "
                         f"{listing(out, others)} besides the export's files); nothing there was changed: choose a new "
                         f"or empty folder, or move those out")
    why = f"its {CONFIG_FILE} has no distill export record" if (out / CONFIG_FILE).is_file() else f"no {CONFIG_FILE}"
    raise ValueError(f"--out {str(out)!r} is not an earlier export of distill ({why}; it holds {listing(out, names)}); "
                     f"nothing there was changed: choose a new or empty folder")


def _move_into_place(tmp: Path, out: Path) -> None:
    _check_out(out)  # again: the folder may have changed while the export was being checked
    if out.exists():  # empty, or an earlier export and nothing else (checked by _check_out): replaced whole
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    head: str | None = None,
    *,
    license: str = "apache-2.0",
    dataset: str | None = None,
    repo_id: str | None = None,
    command: str | None = None,
    wandb_link: bool = True,
) -> HfExport:
    """Writes the Hub-ready folder of a student (`head`: cls, dist or fused, default fused) or teacher
    checkpoint to `out` and checks it loads through timm to the same logits and transform. `dataset`
    names the data in the card (default: the recipe's data source); `repo_id` the Hub repository the
    card's load line names (default ORG/NAME, which `distill push` fills in); `wandb_link` logs the
    folder as a model artifact of the W&B run that trained the checkpoint, when there is one."""
    from timm.models import save_for_hf

    from .. import __version__
    from ..models.meta import model_meta
    from ..models.weights import sha256_of
    from .model_card import card_text
    from .portable import portable_command, portable_recipe_text

    out = Path(out)
    _check_out(out)
    ex = _load(checkpoint, head)
    model, meta = ex.model, model_meta(ex.model)
    run = dict(ex.obj.get("distill_run") or {})
    recipe, recipe_path = _run_recipe(run)
    wandb_opts = dict(recipe.get("wandb") or {})
    teacher = _teacher_lineage(dict(ex.obj.get("distill_teacher") or {}))
    record = dict(kind=ex.kind, head=ex.head, toolkit=f"distill {__version__}",
                  checkpoint=dict(file=Path(checkpoint).name, sha256=sha256_of(checkpoint)),
                  metrics=dict(run.get("metrics") or {}), metrics_at=run.get("metrics_at"), epoch=run.get("epoch"),
                  global_step=run.get("global_step"),
                  run=dict(wandb_id=run.get("wandb_id"), wandb_project=wandb_opts.get("project") if run.get("wandb_id") else None),
                  teacher=teacher or None, data_split=ex.hp.get("data_split"))
    record = {k: v for k, v in record.items() if v is not None}

    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in PROVENANCE_KEYS}
    model.pretrained_cfg = {**cfg, "license": license}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(model, str(tmp), model_config=dict(label_names=meta["class_names"], distill=record),
                    safe_serialization=True, data_config=_data_config(ex.spec))
        saved = sorted(p.name for p in tmp.iterdir())
        if saved != sorted((CONFIG_FILE, WEIGHTS_FILE)):  # EXPORT_FILES must stay what an export writes
            raise RuntimeError(f"timm's save_for_hf wrote {', '.join(saved)}, not {CONFIG_FILE} and {WEIGHTS_FILE}: "
                               f"this timm is not one distill's export knows; nothing was written to {out}")
        diff, tdiff, _ = _check(tmp, ex)
        if diff > MAX_LOGIT_DIFF or (tdiff is not None and tdiff > 1e-6):
            raise RuntimeError(f"export check failed: timm.create_model('local-dir:...') differs from the checkpoint "
                               f"(max |logit diff| {diff:.3g}, transform diff {tdiff}); nothing was written to {out}")
        if recipe_path is not None:
            text = portable_recipe_text(recipe_path.read_text(encoding="utf-8"), run.get("run_dir"))
            (tmp / RECIPE_FILE).write_text(text, encoding="utf-8")
        facts = dict(
            title=out.resolve().name, kind=ex.kind, head=ex.head, arch=meta["name"],
            distilled=hasattr(model, "head_dist"), model_args=_arch_args(tmp), params=sum(p.numel() for p in model.parameters()),
            num_classes=meta["num_classes"], class_names=meta["class_names"], in_chans=meta["in_chans"],
            img_size=meta["img_size"], spec=ex.spec, teacher=teacher, metrics=record.get("metrics"),
            metrics_at=run.get("metrics_at"), epoch=run.get("epoch"), global_step=run.get("global_step"),
            checkpoint=record["checkpoint"],
            wandb=dict(run_id=run.get("wandb_id"), project=wandb_opts.get("project"), entity=wandb_opts.get("entity")),
            data=dict(dataset=dataset or _dataset_name(recipe)), recipe=_recipe_summary(ex, run),
            recipe_file=RECIPE_FILE if recipe_path is not None else None, license=license,
            datasets=[dataset or _dataset_name(recipe)] if (dataset or _dataset_name(recipe)) else None,
            repo_id=repo_id, max_diff=diff, check_inputs=CHECK_INPUTS,
            needs_import="distill.cifar_resnet" if str(meta["name"]).startswith("cifar_resnet") else None,
            command=portable_command(command or shlex.join(
                ["distill", "export", str(checkpoint), "--format", "hf", *(["--head", ex.head] if ex.head else []),
                 "--out", str(out)]), run.get("run_dir")),
        )
        (tmp / CARD_FILE).write_text(card_text(facts), encoding="utf-8")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = HfExport(out, diff, tdiff, f'timm.create_model("local-dir:{out}", pretrained=True)')
    if wandb_link and run.get("wandb_id"):
        from ..training.wandb_artifacts import log_export

        result.wandb = log_export(out, run, project=wandb_opts.get("project"), entity=wandb_opts.get("entity"),
                                  metadata=record, aliases=[f"head-{ex.head}" if ex.head else "teacher"])
    return result


def _arch_args(folder: Path) -> dict[str, Any]:
    """The model_args save_for_hf recorded, without the task ones the card states apart."""
    import json

    args = dict(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("model_args") or {})
    return {k: v for k, v in args.items() if k not in ("num_classes", "in_chans", "img_size")}
