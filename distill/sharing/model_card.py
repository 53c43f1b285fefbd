"""The model card (`README.md`) of a `distill export --format hf` folder, in the Hugging Face Hub's
format: YAML front matter written by huggingface_hub's `ModelCardData` (library_name timm, license,
tags, datasets, metrics, pipeline_tag), then what a downstream user needs: how to load it, which head
it returns, which transform it expects, the per-head accuracies, the lineage (teacher, checkpoint,
W&B run, data, recipe) and the command that made it.

`card_text(facts)` takes the plain facts `distill.sharing.hf_export` gathers from the checkpoint, so it can be
read (and tested) without a model.
"""
from __future__ import annotations

import math
from typing import Any

HUB_PLACEHOLDER = "ORG/NAME"  # `distill push --repo` writes the real repository id in its place

TAGS = ["image-classification", "timm", "knowledge-distillation", "distill"]

HEAD_TEXT = {
    "fused": "the mean of the class-token and the distillation-token heads, as DeiT evaluates",
    "cls": "the class-token head alone",
    "dist": "the distillation-token head alone",
}

# (label, metric) rows of the results table, in order; a metric the checkpoint did not log is left out
STUDENT_ROWS = [
    ("class token (`--head cls`)", "val/acc_cls"),
    ("distillation token (`--head dist`)", "val/acc_dist"),
    ("fused (`--head fused`, DeiT's evaluation)", "val/acc"),
    ("fused, top-5", "val/acc_top5"),
    ("EMA of the student", "val/acc_ema"),
    ("agreement with the teacher (fused vs. teacher argmax)", "val/agreement"),
    ("teacher", "val/acc_teacher"),
]
TEACHER_ROWS = [("top-1", "val/acc"), ("top-5", "val/acc_top5")]


def front_matter(facts: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData

    tags = list(TAGS)
    tags.append("vision-transformer" if facts["kind"] == "student" else "cnn")
    if facts["kind"] == "student" and "distilled" in facts["arch"]:
        tags.append("deit")
    data = ModelCardData(library_name="timm", license=facts["license"], tags=tags,
                         datasets=facts.get("datasets") or None, metrics=["accuracy"],
                         pipeline_tag="image-classification")
    return f"---\n{data.to_yaml()}\n---\n"


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}%" if value is not None else "not recorded"


def _transform_text(spec: dict[str, Any]) -> str:
    size, crop = int(spec["img_size"]), spec.get("crop_pct")
    interp = spec.get("interpolation") or "bilinear"
    if crop is None:
        geometry = f"resize to {size}x{size} px ({interp}, the aspect ratio is not kept)"
    else:
        geometry = (f"resize the shorter side to {math.floor(size / float(crop))} px ({interp}), "
                    f"centre-crop {size}x{size} (crop_pct {float(crop):g})")
    mean = ", ".join(f"{m:.4f}" for m in spec["mean"])
    std = ", ".join(f"{s:.4f}" for s in spec["std"])
    mode = "grayscale (PIL mode `L`)" if int(spec["in_chans"]) == 1 else "RGB"
    return f"{mode} images: {geometry}, then normalise with mean ({mean}) and std ({std})"


def _head_text(facts: dict[str, Any]) -> str:
    if facts["kind"] == "teacher":
        return "the CNN's class logits"
    if not facts.get("distilled"):
        return "the logits of its one head (a plain ViT student, no distillation token)"
    head = facts["head"]
    text = f"{HEAD_TEXT[head]} (`distill export --head {head}`)"
    if head != "fused":
        keep, drop = ("head", "head_dist") if head == "cls" else ("head_dist", "head")
        text += (f". The architecture stays timm's distilled DeiT (both tokens attend to each other in every "
                 f"block, so neither head's features exist without the other token); the saved `{keep}` is "
                 f"doubled and `{drop}` zeroed, so the model's output, the mean of both heads, is exactly "
                 f"that head. To fine-tune, start from a `--head fused` export, which keeps both heads as trained")
    return text


def _usage(facts: dict[str, Any]) -> str:
    repo = facts.get("repo_id") or HUB_PLACEHOLDER
    lines = ["```python", "import timm"]
    if facts.get("needs_import"):
        lines.append(f"import {facts['needs_import']}  # registers the toolkit's CIFAR ResNets with timm")
    lines += [
        f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()  # or "local-dir:FOLDER"',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
        "probs = model(transform(image).unsqueeze(0)).softmax(-1)  # image: a PIL image",
        'label = model.pretrained_cfg["label_names"][int(probs.argmax())]',
        "```",
    ]
    return "\n".join(lines)


def _at(position: dict[str, Any]) -> str:
    return f"epoch {position.get('epoch')}, step {position.get('global_step')}"


def measured_text(measured: dict[str, Any] | None, weights: dict[str, Any] | None, what: str) -> str:
    """Where numbers about `what` (this checkpoint, the teacher file) were measured, and whether they are
    of its weights: the same global step is the same weights; a checkpoint written after its run's last
    validation (a step checkpoint, a max_steps stop, trainer.save_checkpoint) carries older numbers."""
    if measured and weights and measured.get("global_step") == weights.get("global_step"):
        return f"of {what}'s weights, measured at {_at(measured)}"
    if measured:
        written = f" at {_at(weights)}" if weights else ""
        return (f"measured at {_at(measured)}, before {what} was written{written}: numbers of earlier weights, "
                f"{what}'s own were not validated")
    written = f" ({_at(weights)})" if weights else ""
    return (f"from the last validation before {what}{written} was written; an older distill did not record where, "
            f"so they may be of earlier weights")


def _results(facts: dict[str, Any]) -> str:
    metrics = facts.get("metrics") or {}
    rows = STUDENT_ROWS if facts["kind"] == "student" else TEACHER_ROWS
    table = [(label, metrics[key]) for label, key in rows if metrics.get(key) is not None]
    if not table:
        return "The checkpoint records no validation metrics.\n"
    weights = dict(epoch=facts.get("epoch"), global_step=facts.get("global_step"))
    where = measured_text(facts.get("metrics_at"), weights, "this checkpoint")
    out = [f"Validation accuracy on the run's held-out split ({where}):", "", "| | top-1 |", "| --- | --- |"]
    out += [f"| {label} | {_pct(value)} |" for label, value in table]
    return "\n".join(out) + "\n"


def _lineage(facts: dict[str, Any]) -> str:
    out = []
    teacher = facts.get("teacher") or {}
    members = teacher.get("members") or ([teacher] if teacher else [])
    for i, member in enumerate(members):
        which = "Teacher" if len(members) == 1 else f"Teacher {i}"
        run = f", W&B run `{member['run_id']}`" if member.get("run_id") else ""
        acc = _pct(member.get("val_acc"))
        if member.get("val_acc") is not None:
            acc += f" ({measured_text(member.get('val_acc_at'), member.get('weights_at'), 'the teacher file')})"
        out.append(f"- **{which}**: `{member.get('architecture')}`, file sha256 `{member.get('sha256')}`, "
                   f"validation accuracy {acc}{run}")
    if len(members) > 1:
        out.append(f"- **Teachers combined** by {teacher.get('combine', 'mean_logits')}")
    ckpt = facts["checkpoint"]
    out.append(f"- **Checkpoint**: `{ckpt['file']}`, sha256 `{ckpt['sha256']}`")
    wandb = facts.get("wandb") or {}
    if wandb.get("run_id"):
        where = "/".join(p for p in (wandb.get("entity"), wandb.get("project")) if p)
        out.append(f"- **W&B run**: `{wandb['run_id']}`" + (f" (project `{where}`)" if where else ""))
    data = facts.get("data") or {}
    names = list(facts.get("class_names") or [])
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    out.append(f"- **Data**: {data.get('dataset') or 'not recorded'}; {facts['num_classes']} classes"
               + (f" ({shown})" if names else "") + f"; {facts['img_size']} px, {facts['in_chans']} channel(s)")
    recipe = facts.get("recipe") or {}
    if recipe:
        out.append("- **Recipe**: " + "; ".join(f"{k} {v}" for k, v in recipe.items()))
    if facts.get("recipe_file"):
        out.append(f"- **Resolved recipe**: `{facts['recipe_file']}` in this folder (`distill fit --config "
                   f"{facts['recipe_file']}` trains it again; its paths are relative to the toolkit's checkout "
                   f"or the run's folder, and those elsewhere on the training machine were dropped, listed at its top)")
    return "\n".join(out) + "\n"


def card_text(facts: dict[str, Any]) -> str:
    """The whole README.md."""
    kind = facts["kind"]
    args = ", ".join(f"{k}={v}" for k, v in (facts.get("model_args") or {}).items())
    if kind == "student":
        teacher = facts.get("teacher") or {}
        source = teacher.get("architecture") or ("an ensemble" if teacher.get("members") else "no teacher")
        summary = (f"A Vision Transformer student (`{facts['arch']}`) distilled from {source} with "
                   f"`distill` (DeiT-style knowledge distillation on timm and Lightning).")
    else:
        summary = (f"A CNN teacher (`{facts['arch']}`) trained with cross-entropy by "
                   f"`distill` (step 1 of DeiT-style knowledge distillation).")
    diff = facts.get("max_diff")
    check = ("" if diff is None else
             f"\n- **Checked at export**: `timm.create_model(\"local-dir:...\", pretrained=True)` returned the "
             f"checkpoint's logits, max |difference| {diff:.3g} on {facts.get('check_inputs', 8)} random inputs; "
             f"timm's transform equals the toolkit's evaluation transform.")
    body = [
        f"# {facts['title']}", "", summary, "", "## Use", "", _usage(facts), "",
        f"- **Output**: {_head_text(facts)}.",
        f"- **Input**: {_transform_text(facts['spec'])}. `resolve_data_config` + `create_transform` build "
        f"exactly this from `config.json`.{check}", "",
        "## Results", "", _results(facts), "## Lineage", "", _lineage(facts),
        "## Model", "",
        f"- **Architecture**: `{facts['arch']}`" + (f" ({args})" if args else "")
        + f", {facts['params']:,} parameters",
        f"- **Made by**: `{facts['command']}`", "",
    ]
    return front_matter(facts) + "\n" + "\n".join(body)
