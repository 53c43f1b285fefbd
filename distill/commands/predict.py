"""`distill predict`: top-k classes of a student checkpoint for images, per head, and of its teacher.

    distill predict student.ckpt img.png photos/ [--teacher teacher.ckpt] [--topk 5] [--format table|json|csv]

Heads of a DeiT student: `class` (class token), `distillation` (distillation token) and `fused`,
softmax of the mean of the two logits, which is what the timm model returns in eval mode. A plain ViT
student (distilled=False) has only `fused`. With `--teacher` the teacher's own top-k is added under
`teacher`, computed on the image prepared the teacher's way (its own size, channels, mean/std).

Also the image helpers shared by `distill attention`: folders are scanned recursively for image files
(sorted), and every image is prepared by the validation transform the checkpoint records
(`distill.data.transforms`: converted to `L` or `RGB`, shorter side resized to img_size / crop_pct with the
recorded interpolation, centre-cropped to img_size, normalised with mean/std). Checkpoints written
before crop_pct was recorded were validated with a stretching resize to img_size x img_size, which they
keep getting here.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from ..data.transforms import IMG_EXTENSIONS, build_eval_transform
from ..models.meta import eval_spec_of, model_meta

if TYPE_CHECKING:  # torch loads when a command runs, not for `--help`
    import torch
    from torch import nn

HEADS = ("class", "distillation", "fused")


class UsageError(ValueError):
    """A problem with the command line or its inputs, reported as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (problem and where to look), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# ---------------------------------------------------------------------------------------------- images
def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in `inputs`: files as given, folders scanned recursively (sorted), duplicates dropped."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise UsageError(f"folder {str(p)!r} holds no image files ({', '.join(IMG_EXTENSIONS)}); "
                                 f"pass a folder with images or image files")
            found += files
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"image or folder {str(p)!r} does not exist; check the path")
    seen: set[Path] = set()
    return [f for f in found if not (f.resolve() in seen or seen.add(f.resolve()))]


def image_transform(spec: dict[str, Any]):
    """The eval transform of an eval spec (`distill.models.meta.eval_spec_of(model)`)."""
    return build_eval_transform(spec)


def open_image(path: str | Path, in_chans: int) -> Image.Image:
    """The image at `path` converted to `L` (1 channel) or `RGB` (3 channels)."""
    if in_chans not in (1, 3):
        raise UsageError(f"the model takes {in_chans}-channel input; only 1 (grayscale) and 3 (RGB) can be read from image files")
    try:
        with Image.open(path) as im:
            return im.convert("L" if in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{str(path)!r} is not a readable image ({type(e).__name__}); remove it or convert it to PNG/JPEG") from None


def load_images(paths: Sequence[str | Path], spec: dict[str, Any]) -> torch.Tensor:
    """`(len(paths), in_chans, img_size, img_size)` batch prepared by the eval transform of `spec`
    (`eval_spec_of(model)`; a `model_meta` dict without crop_pct gets the legacy stretching resize)."""
    import torch

    tf = image_transform(spec)
    return torch.stack([tf(open_image(p, spec["in_chans"])) for p in paths])


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ----------------------------------------------------------------------------------------- prediction
def topk_rows(probs: torch.Tensor, k: int, class_names: Sequence[str] | None) -> list[list[dict[str, Any]]]:
    """Per image, the `k` most probable classes: `{rank, index, class, prob}`, best first."""
    k = min(k, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    rows = []
    for vals, idxs in zip(values.tolist(), indices.tolist()):
        rows.append([dict(rank=r + 1, index=i, **{"class": class_names[i] if class_names else str(i)}, prob=v)
                     for r, (v, i) in enumerate(zip(vals, idxs))])
    return rows


def load_teacher(path: str | Path, arch: str | None = None) -> nn.Module:
    """A teacher (step 1) checkpoint with its metadata, in eval mode."""
    from ..models.build import build_teacher
    from ..models.weights import STUDENT_KIND, load_weights_file, split_checkpoint

    obj = load_weights_file(path)
    _, hp = split_checkpoint(obj, "model.")
    if hp.get("distill_kind") == STUDENT_KIND:
        raise UsageError(f"--teacher {str(path)!r} is a student (step 2) checkpoint; pass the teacher (step 1) checkpoint")
    name = hp.get("model") or arch
    if not name:
        raise UsageError(f"--teacher {str(path)!r} records no architecture (a plain state_dict); "
                         f"name it with --teacher-arch, e.g. --teacher-arch resnet18")
    if not hp:
        print(f"warning: --teacher {str(path)!r} records no mean/std or input size; using {name}'s defaults",
              file=sys.stderr)
    try:
        model = build_teacher(name, checkpoint=obj).eval()  # the loaded dict: the file is read once
    except ValueError as e:
        raise UsageError(str(e).replace("<in-memory checkpoint>", str(path))) from None
    return model  # with `distill_eval`: the eval transform its validation used (build_teacher reads it)


def predict(
    student: nn.Module,
    paths: Sequence[str | Path],
    *,
    teacher: nn.Module | None = None,
    topk: int = 5,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Top-k predictions for each image: `[{"image": path, "heads": {head: [{rank, index, class, prob}]}}]`.

    Each model sees the image prepared by its own validation transform (`eval_spec_of`: size, crop,
    interpolation, channels, mean/std).
    """
    import torch

    from ..models.heads import head_probabilities

    if topk < 1:
        raise UsageError(f"--topk {topk} must be at least 1")
    s_meta = model_meta(student)
    t_meta = model_meta(teacher) if teacher is not None else None
    s_spec = eval_spec_of(student)
    t_spec = eval_spec_of(teacher) if teacher is not None else None
    results: list[dict[str, Any]] = []
    for chunk in _batches(list(paths), batch_size):
        heads = {h: topk_rows(p, topk, s_meta["class_names"])
                 for h, p in head_probabilities(student, load_images(chunk, s_spec)).items()}
        if teacher is not None:
            with torch.no_grad():
                z_t = teacher(load_images(chunk, t_spec))
            heads["teacher"] = topk_rows(z_t.softmax(-1), topk, t_meta["class_names"])
        for i, path in enumerate(chunk):
            results.append({"image": str(path), "heads": {h: rows[i] for h, rows in heads.items()}})
    return results


# -------------------------------------------------------------------------------------------- output
def format_json(results: list[dict[str, Any]]) -> str:
    return json.dumps(results, indent=2)


def format_csv(results: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "head", "rank", "class_index", "class_name", "probability"])
    for r in results:
        for head, rows in r["heads"].items():
            for row in rows:
                w.writerow([r["image"], head, row["rank"], row["index"], row["class"], f"{row['prob']:.6f}"])
    return buf.getvalue()


def format_table(results: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for r in results:
        heads = list(r["heads"])
        cells = {h: [f"{row['class']}  {row['prob']:.3f}" for row in r["heads"][h]] for h in heads}
        width = {h: max([len(h)] + [len(c) for c in cells[h]]) for h in heads}
        lines.append(r["image"])
        lines.append("  rank  " + "   ".join(h.ljust(width[h]) for h in heads).rstrip())
        for i in range(max(len(c) for c in cells.values())):
            row = "   ".join((cells[h][i] if i < len(cells[h]) else "").ljust(width[h]) for h in heads)
            lines.append(f"  {i + 1:>4}  " + row.rstrip())
        lines.append("")
    return "\n".join(lines)


FORMATS = {"table": format_table, "json": format_json, "csv": format_csv}


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="distill predict",
        description="Top-k classes of a student checkpoint for images, per head (class, distillation, fused), "
                    "and of the teacher when given.",
    )
    p.add_argument("checkpoint", help="student (step 2) checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (scanned recursively)")
    p.add_argument("--teacher", metavar="CKPT", help="teacher (step 1) checkpoint to compare with")
    p.add_argument("--teacher-arch", metavar="NAME", help="timm name of the teacher when its file is a plain state_dict")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes per head (default 5; at most the number of classes)")
    p.add_argument("--format", choices=sorted(FORMATS), default="table", help="output format (default table)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    return p


def load_student_checked(path: str | Path) -> nn.Module:
    """`distill.load_student` with the errors a user can fix turned into one-line messages."""
    from ..student.module import load_student

    try:
        return load_student(path)
    except ValueError as e:
        msg = str(e)
        if "not a student" in msg:
            msg += "; pass the step-2 (student) checkpoint, e.g. the best .ckpt of `distill fit` on a DistillModule"
        raise UsageError(msg) from None
    except RuntimeError as e:  # load_state_dict: the weights do not fit the recorded architecture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"checkpoint {str(path)!r} does not fit the architecture it records ({first}); "
                         f"the file is damaged or was edited, use the checkpoint written by training") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.topk < 1:
            raise UsageError(f"--topk {args.topk} must be at least 1")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size} must be at least 1")
        student = load_student_checked(args.checkpoint)
        teacher = load_teacher(args.teacher, args.teacher_arch) if args.teacher else None
        paths = find_images(args.images)
        results = predict(student, paths, teacher=teacher, topk=args.topk, batch_size=args.batch_size)
    except (UsageError, ValueError, FileNotFoundError, OSError, IndexError) as e:
        print(f"distill predict: error: {e}", file=sys.stderr)
        return 2
    out = FORMATS[args.format](results)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
