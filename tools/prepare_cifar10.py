"""Unpack the CIFAR-10 (JPEG) archives into ImageFolder trees the recipes read.

    python tools/prepare_cifar10.py                      # ../shared/data/cifar10-jpeg -> data/
    python tools/prepare_cifar10.py --archives DIR --out data --per-class 500
    python tools/prepare_cifar10.py --out /tmp/d --max-per-class 20   # a rehearsal: 200 + 200 images

writes
    data/cifar10-jpeg/{train,test}/<class>/NNNN.jpg     the archives as they are (50,000 + 6,000 images)
    data/cifar10-small/{train,test}/<class>/NNNN.jpg    the first `--per-class` training images of each
                                                        class (file names 0000..) and the whole test set,
                                                        as hard links (no copies)
    data/cifar10-unlabeled/NNNNN.jpg                    the other training images (45,000), flat, in a
                                                        fixed shuffled order, their class in no name:
                                                        the unlabelled images of recipes/cifar10_semi
for `recipes/cifar10` (`--data.root data/cifar10-jpeg`), `recipes/cifar10_small` and
`recipes/cifar10_semi` (`data/cifar10-small` labelled, `data/cifar10-unlabeled` unlabelled). The archives are
checked against the sha256 sums of their README before anything is unpacked; a tree that is already
complete is left as it is. `--max-per-class N` unpacks only the first N images of each class and split
(a rehearsal's few hundred images, read from the start of each archive).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tarfile
from pathlib import Path

ARCHIVES = {
    "cifar10-train.tar.gz": "4908b7c51c62ded290cde8a473c07223a64fd1726fb9c14b73ff40eb4d2ea2e6",
    "cifar10-test.tar.gz": "f54bfc767aac94d52e005079818bfc9dced694e4f35e543ab82fa80e9d5b4929",
}
COUNTS = {"train": 50_000, "test": 6_000}
NUM_CLASSES = 10
DEFAULT_ARCHIVES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_images(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*/*.jpg")) if folder.is_dir() else 0


def _first_per_class(tar: tarfile.TarFile, limit: int):
    """The archive's first `limit` image members of each class, reading no further than needed."""
    taken: dict[str, int] = {}
    for member in tar:
        parts = member.name.split("/")
        if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
            continue
        if taken.get(parts[1], 0) < limit:
            taken[parts[1]] = taken.get(parts[1], 0) + 1
            yield member
        if len(taken) == NUM_CLASSES and all(n >= limit for n in taken.values()):
            return


def unpack(archives: Path, out: Path, max_per_class: int | None = None) -> Path:
    full = out / "cifar10-jpeg"
    for name, digest in ARCHIVES.items():
        split = name.split("-")[1].split(".")[0]
        expected = COUNTS[split] if max_per_class is None else min(COUNTS[split], NUM_CLASSES * max_per_class)
        if count_images(full / split) == expected:
            continue
        path = archives / name
        if not path.is_file():
            raise FileNotFoundError(f"--archives: {path} does not exist; point --archives at the folder with {name}")
        if sha256(path) != digest:
            raise ValueError(f"--archives: {path} has another sha256 than its README says; the file is damaged")
        with tarfile.open(path) as tar:
            members = None if max_per_class is None else _first_per_class(tar, max_per_class)
            tar.extractall(full, members=members, filter="data")
        if count_images(full / split) != expected:
            raise ValueError(f"{full / split} holds {count_images(full / split)} images after unpacking, "
                             f"expected {expected}")
    return full


def small_subset(full: Path, out: Path, per_class: int) -> Path:
    small = out / "cifar10-small"
    for split in ("train", "test"):
        for class_dir in sorted(d for d in (full / split).iterdir() if d.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if re.fullmatch(r"\d{4}\.jpg", p.name))
            if split == "train":
                files = files[:per_class]
            target = small / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = target / f.name
                if not link.exists():
                    os.link(f, link)
    return small


def unlabeled_rest(full: Path, out: Path, per_class: int) -> Path:
    """The training images cifar10-small leaves out (file index >= per_class in each class), as hard links
    in one flat folder, named by their position in a fixed shuffle (seed 0) so no name tells the class."""
    import random

    rest = sorted(p for class_dir in sorted(d for d in (full / "train").iterdir() if d.is_dir())
                  for p in sorted(class_dir.iterdir())[per_class:] if re.fullmatch(r"\d{4}\.jpg", p.name))
    random.Random(0).shuffle(rest)
    folder = out / "cifar10-unlabeled"
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(rest):
        link = folder / f"{k:05d}.jpg"
        if not link.exists():
            os.link(f, link)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archives", type=Path, default=DEFAULT_ARCHIVES, help="folder with the two .tar.gz archives")
    parser.add_argument("--out", type=Path, default=Path("data"), help="where the trees go (git-ignored data/)")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class of cifar10-small")
    parser.add_argument("--max-per-class", type=int, default=None,
                        help="unpack only the first N images of each class and split (default: all)")
    args = parser.parse_args(argv)
    if args.max_per_class is not None and args.max_per_class < 1:
        parser.error(f"--max-per-class {args.max_per_class}: give a positive number of images")
    full = unpack(args.archives, args.out, args.max_per_class)
    small = small_subset(full, args.out, args.per_class)
    unlabeled = unlabeled_rest(full, args.out, args.per_class)
    print(f"{full}: {count_images(full / 'train')} train, {count_images(full / 'test')} test images")
    print(f"{small}: {count_images(small / 'train')} train, {count_images(small / 'test')} test images")
    print(f"{unlabeled}: {sum(1 for _ in unlabeled.glob('*.jpg'))} unlabelled images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
