"""`distill export CKPT --format safetensors|onnx --head cls|dist|fused --out FILE`, and
`distill export CKPT --format hf [--head cls|dist|fused] --out DIR` (`distill.sharing.hf_export`: the folder
timm and the Hugging Face Hub share models in, with a model card; students and teachers).

The exported student is a plain timm model with one output:
- safetensors: `timm.create_model(meta["timm_model"], **json.loads(meta["timm_kwargs"]))` then
  `load_state_dict(safetensors.torch.load_file(FILE))`; in eval mode it returns the chosen head.
- onnx: input `image` (N, C, H, W, normalised with the recorded mean/std), output `logits`.

How one head is chosen without changing the architecture: a distilled DeiT in eval returns
`(head(x_cls) + head_dist(x_dist)) / 2`. For `--head cls` the exported `head` is doubled and
`head_dist` zeroed (the reverse for `dist`), so that mean is exactly the chosen head's logits and the
file still loads into the unmodified timm model. Both formats use these rewritten weights.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..models.meta import eval_spec_of, model_meta

if TYPE_CHECKING:  # torch loads when an export runs, not for `--help`
    from torch import nn

    from ..models.heads import Head


def timm_recipe(model: nn.Module) -> tuple[str, dict]:
    """The timm name and create_model kwargs that rebuild this student."""
    spec = dict(model.distill_spec)
    name = model.pretrained_cfg["architecture"]
    kwargs = {k: spec[k] for k in ("num_classes", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
              if spec.get(k) is not None}
    return name, kwargs


def export(checkpoint: str, fmt: Literal["safetensors", "onnx"], head: Head, out: str) -> Path:
    import torch

    from ..models.heads import single_head_state_dict
    from ..student.module import load_student

    if head not in ("cls", "dist", "fused"):
        raise ValueError(f"--head {head!r} is unknown; use cls, dist or fused")
    model = load_student(checkpoint)
    meta = model_meta(model)
    name, kwargs = timm_recipe(model)
    sd = single_head_state_dict(model, head)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")  # nothing half-written at `out`
    if fmt == "safetensors":
        from safetensors.torch import save_file

        info = dict(timm_model=name, timm_kwargs=json.dumps(kwargs), head=head,
                    class_names=json.dumps(meta["class_names"]), mean=json.dumps(meta["mean"]), std=json.dumps(meta["std"]),
                    **{k: json.dumps(v) for k, v in eval_spec_of(model).items() if k in ("crop_pct", "interpolation")})
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=info)
    elif fmt == "onnx":
        model.load_state_dict(sd)
        model.eval()
        x = torch.zeros(1, meta["in_chans"], meta["img_size"], meta["img_size"])
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    else:
        raise ValueError(f"--format {fmt!r} is unknown; use safetensors or onnx")
    tmp.replace(out_path)
    return out_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distill export", description=(
        "Export a student checkpoint as a plain model (safetensors, onnx), or a student or teacher checkpoint "
        "as a Hugging Face Hub / timm folder with a model card (hf)."))
    parser.add_argument("checkpoint", help="student (step 2) checkpoint; for --format hf also a teacher (step 1) one")
    parser.add_argument("--format", choices=["safetensors", "onnx", "hf"], default="safetensors",
                        help="hf: a folder (config.json, model.safetensors, README.md) that "
                             "timm.create_model('local-dir:DIR') and 'hf-hub:ORG/NAME' load")
    parser.add_argument("--head", choices=["cls", "dist", "fused"], default=None,
                        help="which output a student's export returns (default: fused, as DeiT evaluates)")
    parser.add_argument("--out", required=True, help="output file (a folder for --format hf)")
    hf = parser.add_argument_group("--format hf")
    hf.add_argument("--license", default="apache-2.0", help="licence in the model card (a Hub licence id)")
    hf.add_argument("--dataset", default=None, help="the data's name in the model card (default: the recipe's source)")
    hf.add_argument("--repo", default=None, help="the Hub repository the card's load line names (distill push fills it in)")
    hf.add_argument("--wandb", choices=["auto", "off"], default="auto",
                    help="auto: log the folder as a model artifact of the W&B run that wrote the checkpoint, if any")
    args = parser.parse_args(argv)
    if args.format == "hf":
        import shlex

        from ..sharing.hf_export import export_hf

        result = export_hf(args.checkpoint, args.out, args.head, license=args.license, dataset=args.dataset,
                           repo_id=args.repo, command=shlex.join(["distill", "export", *argv]),
                           wandb_link=args.wandb == "auto")
        files = ", ".join(sorted(p.name for p in result.folder.iterdir()))
        print(f"wrote {result.folder} ({files})")
        print(f"check: {result.load} returns the checkpoint's logits, max |diff| {result.max_diff:.3g}; "
              f"timm's eval transform max |diff| {result.transform_diff}")
        if result.wandb:
            print(result.wandb)
        print(f"load: {result.load}")
        print(f"push: distill push {result.folder} --repo ORG/NAME")
        return 0
    args.head = args.head or "fused"
    path = export(args.checkpoint, args.format, args.head, args.out)
    print(f"wrote {path} ({args.format}, head {args.head})")
    if args.format == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # the rebuild recipe the file records
            meta = f.metadata()
        kwargs = json.loads(meta["timm_kwargs"])
        print(f"load: timm.create_model({meta['timm_model']!r}, **{kwargs}).load_state_dict("
              f"safetensors.torch.load_file({str(path)!r}))")
    return 0
