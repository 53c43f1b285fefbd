"""Unpack the CIFAR-10 (JPEG) archives into ImageFolder trees the recipes read.

    python tools/prepare_cifar10.py                      # ../shared/data/cifar10-jpeg -> data/
    python tools/prepare_cifar10.py --archives DIR --out data --per-class 500

writes
    data/cifar10-jpeg/{train,test}/<class>/NNNN.jpg     the archives as they are (50,000 + 6,000 images)
    data/cifar10-small/{train,test}/<class>/NNNN.jpg    the first `--per-class` training images of each
                                                        class (file names 0000..) and the whole test set,
                                                        as hard links (no copies)
for `recipes/cifar10` (`--data.root data/cifar10-jpeg`) and `recipes/cifar10_small`. The archives are
checked against the sha256 sums of their README before anything is unpacked; a tree that is already
complete is left as it is.
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
DEFAULT_ARCHIVES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_images(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*/*.jpg")) if folder.is_dir() else 0


def unpack(archives: Path, out: Path) -> Path:
    full = out / "cifar10-jpeg"
    for name, digest in ARCHIVES.items():
        split = name.split("-")[1].split(".")[0]
        if count_images(full / split) == COUNTS[split]:
            continue
        path = archives / name
        if not path.is_file():
            raise FileNotFoundError(f"--archives: {path} does not exist; point --archives at the folder with {name}")
        if sha256(path) != digest:
            raise ValueError(f"--archives: {path} has another sha256 than its README says; the file is damaged")
        with tarfile.open(path) as tar:
            tar.extractall(full, filter="data")
        if count_images(full / split) != COUNTS[split]:
            raise ValueError(f"{full / split} holds {count_images(full / split)} images after unpacking, "
                             f"expected {COUNTS[split]}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archives", type=Path, default=DEFAULT_ARCHIVES, help="folder with the two .tar.gz archives")
    parser.add_argument("--out", type=Path, default=Path("data"), help="where the trees go (git-ignored data/)")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class of cifar10-small")
    args = parser.parse_args(argv)
    full = unpack(args.archives, args.out)
    small = small_subset(full, args.out, args.per_class)
    print(f"{full}: {count_images(full / 'train')} train, {count_images(full / 'test')} test images")
    print(f"{small}: {count_images(small / 'train')} train, {count_images(small / 'test')} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
