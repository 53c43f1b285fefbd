"""`distill attention`: what a student attends to, one PNG per image.

    distill attention student.ckpt img.png photos/ --out attention/ [--layer -1] [--head 0] [--dpi 100]

Each PNG shows the image as the student sees it (its validation transform: resized and centre-cropped
to its img_size as the checkpoint records, grayscale or RGB), the
attention of the class and distillation tokens to the patches in one block (mean of heads and per
head), the attention rollout over all blocks, the difference of the two tokens' rollouts, and the
token-to-token affinity matrix softmax(QK^T / sqrt(d)) of the block (one head or their mean).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..models.meta import eval_spec_of, model_meta
from .predict import OneLineParser, UsageError, find_images, load_images, load_student_checked


def output_names(paths: Sequence[Path]) -> list[str]:
    """A unique PNG name per image: its stem, with `-2`, `-3`... when stems repeat across folders."""
    names, used = [], set()
    for p in paths:
        base, n = p.stem, 1
        name = f"{base}.png"
        while name in used:
            n += 1
            name = f"{base}-{n}.png"
        used.add(name)
        names.append(name)
    return names


def build_parser() -> argparse.ArgumentParser:  # a OneLineParser: usage errors in one line
    p = OneLineParser(
        prog="distill attention",
        description="Attention maps of a student checkpoint: class and distillation token attention (per head "
                    "and averaged), attention rollout and the affinity matrix, one PNG per image.",
    )
    p.add_argument("checkpoint", help="student (step 2) checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (scanned recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (created if missing)")
    p.add_argument("--layer", type=int, default=-1, help="block shown per head and in the affinity matrix (default -1, the last)")
    p.add_argument("--head", type=int, default=None, help="head of the affinity matrix (default: mean of the heads)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs (default 100)")
    p.add_argument("--cmap", default="inferno", help="matplotlib colour map of the overlays (default inferno)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib
        import torch

        matplotlib.use("Agg")
        from matplotlib import colormaps

        from ..inspect.plots import write_attention_pngs

        if args.cmap not in colormaps:
            raise UsageError(f"--cmap {args.cmap!r} is not a matplotlib colour map; try inferno, viridis or jet")
        if args.dpi < 10 or args.batch_size < 1:
            raise UsageError(f"--dpi {args.dpi} must be at least 10 and --batch-size {args.batch_size} at least 1")
        out = Path(args.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {str(out)!r} is a file; pass a folder for the PNGs")
        model = load_student_checked(args.checkpoint)
        paths = find_images(args.images)
        depth = len(model.blocks)
        if not -depth <= args.layer < depth:
            raise UsageError(f"--layer {args.layer} is out of range; the student has {depth} blocks "
                             f"(0..{depth - 1}, or -1 for the last)")
        heads = model.blocks[0].attn.num_heads
        if args.head is not None and not -heads <= args.head < heads:
            raise UsageError(f"--head {args.head} is out of range; the student has {heads} heads (0..{heads - 1})")
        meta = model_meta(model)
        spec = eval_spec_of(model)  # the validation transform the checkpoint records
        names = output_names(paths)
        out.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(paths), args.batch_size):
            chunk = paths[i:i + args.batch_size]
            x = load_images(chunk, spec)
            with torch.no_grad():
                written = write_attention_pngs(
                    model, x, [out / n for n in names[i:i + args.batch_size]], mean=meta["mean"], std=meta["std"],
                    class_names=meta["class_names"], labels=[p.name for p in chunk], layer=args.layer,
                    head=args.head, dpi=args.dpi, cmap=args.cmap,
                )
            for src, dst in zip(chunk, written):
                print(f"{src} -> {dst}")
    except (UsageError, ValueError, FileNotFoundError, OSError, IndexError) as e:
        print(f"distill attention: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
