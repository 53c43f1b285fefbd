"""`distill export CKPT --format safetensors|onnx --head cls|dist|fused --out FILE`.

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

from .transforms import eval_spec_of

if TYPE_CHECKING:  # torch loads when an export runs, not for `--help`
    import torch
    from torch import nn

Head = Literal["cls", "dist", "fused"]


def single_head_state_dict(model: nn.Module, head: Head) -> dict[str, torch.Tensor]:
    """The student's state_dict, rewritten so its eval output is exactly the chosen head's logits."""
    import torch

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if head == "fused" or "head_dist.weight" not in sd:
        return sd
    keep, drop = ("head", "head_dist") if head == "cls" else ("head_dist", "head")
    for p in ("weight", "bias"):
        sd[f"{keep}.{p}"] = sd[f"{keep}.{p}"] * 2  # (2 * keep + 0) / 2 == keep
        sd[f"{drop}.{p}"] = torch.zeros_like(sd[f"{drop}.{p}"])
    return sd


def timm_recipe(model: nn.Module) -> tuple[str, dict]:
    """The timm name and create_model kwargs that rebuild this student."""
    spec = dict(model.distill_spec)
    name = model.pretrained_cfg["architecture"]
    kwargs = {k: spec[k] for k in ("num_classes", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
              if spec.get(k) is not None}
    return name, kwargs


def export(checkpoint: str, fmt: Literal["safetensors", "onnx"], head: Head, out: str) -> Path:
    import torch

    from .models import model_meta
    from .student import load_student

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
    parser = argparse.ArgumentParser(prog="distill export", description="Export a student checkpoint as a plain model.")
    parser.add_argument("checkpoint", help="student (step 2) checkpoint")
    parser.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    parser.add_argument("--head", choices=["cls", "dist", "fused"], default="fused",
                        help="which output the exported model returns (default: fused, as DeiT evaluates)")
    parser.add_argument("--out", required=True, help="output file")
    args = parser.parse_args(argv)
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
