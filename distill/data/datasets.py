"""The datasets `ImageDataModule` serves, and how each source is found and split: scikit-learn's digits,
an image folder (class folders scanned, unreadable files skipped, colour mode detected), CIFAR from
torchvision, synthetic tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import IMG_EXTENSIONS

log = logging.getLogger(__name__)

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class ArrayImageDataset(Dataset):
    """uint8 images `(N, H, W)` or `(N, H, W, C)` with integer labels, served as PIL images."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform=None) -> None:
        self.images, self.targets, self.transform = images, list(map(int, targets)), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def list_samples(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """`(path, label)` of the image files in `root/<class>/`, classes in the given order, files sorted."""
    samples: list[tuple[Path, int]] = []
    for label, c in enumerate(classes):
        folder = Path(root) / c
        if folder.is_dir():
            samples += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS]
    return samples


@dataclass(frozen=True)
class FolderScan:
    """What opening the files of a folder found: unreadable files (None when only a sample was opened)
    and how many of the opened files are grayscale or colour."""

    bad: list[Path] | None
    gray: int
    colour: int


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` with classes in sorted order; every image converted to `mode` (L or RGB).

    Files that cannot be decoded are skipped with a counted warning; past `max_bad_fraction` of the
    files it fails instead. Folders of up to `verify_limit` images are checked when opened (once per
    process); larger ones (ImageNet) are checked as they are read, the bad file replaced by the next.
    `scan` also counts grayscale and colour files (all of them, or `mode_sample` spread over a larger
    folder), from which `ImageDataModule` picks the colour mode.
    """

    verify_limit = 200_000
    mode_sample = 2_000
    _scans: dict[tuple[str, int, bool], FolderScan] = {}  # (root, count, full) -> what opening the files found

    def __init__(self, root: Path, classes: Sequence[str], mode: str, transform=None, max_bad_fraction: float = 0.01):
        self.root, self.classes, self.mode, self.transform = Path(root), list(classes), mode, transform
        self.max_bad_fraction = max_bad_fraction
        samples = list_samples(self.root, self.classes)
        if not samples:
            raise ValueError(f"data.root: {str(self.root)!r} holds no images in class folders; expected {self.root}/<class>/*.jpg")
        self.samples = samples
        self.targets = [t for _, t in samples]
        self._bad_seen: set[int] = set()
        if len(samples) <= self.verify_limit:
            self._check_readable()

    @classmethod
    def scan(cls, root: Path, samples: Sequence[tuple[Path, int]]) -> FolderScan:
        """Opens every file (verifying it) when there are at most `verify_limit`, else `mode_sample` files
        spread evenly over the sorted list (mode only); cached per process."""
        full = len(samples) <= cls.verify_limit
        key = (str(Path(root).resolve()), len(samples), full)
        if key not in cls._scans:
            picked = samples
            if not full:
                picked = [samples[int(i)] for i in np.unique(np.linspace(0, len(samples) - 1, cls.mode_sample).round())]
            bad, gray, colour = [], 0, 0
            for p, _ in picked:
                try:
                    with Image.open(p) as im:
                        is_gray = Image.getmodebase(im.mode) == "L"
                        if full:
                            im.verify()
                except Exception:  # noqa: BLE001 - any decode failure makes the file unusable
                    bad.append(p)
                    continue
                gray, colour = gray + is_gray, colour + (not is_gray)
            cls._scans[key] = FolderScan(bad if full else None, gray, colour)
        return cls._scans[key]

    def _too_many(self, bad: int, example) -> ValueError:
        return ValueError(
            f"data.root: {bad} of {len(self.samples)} images under {str(self.root)!r} are unreadable "
            f"(e.g. {example}), above data.max_bad_fraction={self.max_bad_fraction}; fix or remove them"
        )

    def _check_readable(self) -> None:
        bad = self.scan(self.root, self.samples).bad
        if not bad:
            return
        if len(bad) > self.max_bad_fraction * len(self.samples):
            raise self._too_many(len(bad), bad[0])
        log.warning("skipping %d unreadable image(s) under %s, e.g. %s", len(bad), self.root, bad[0])
        bad_set = set(bad)
        self.samples = [s for s in self.samples if s[0] not in bad_set]
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        for j in range(i, i + len(self.samples)):
            path, target = self.samples[j % len(self.samples)]
            try:
                with Image.open(path) as im:
                    img = im.convert(self.mode)
                break
            except Exception:  # noqa: BLE001 - only reached for folders too large to check up front
                self._bad_seen.add(j % len(self.samples))
                if len(self._bad_seen) > self.max_bad_fraction * len(self.samples):
                    raise self._too_many(len(self._bad_seen), path) from None
                log.warning("skipping unreadable image %s (%d so far in this process)", path, len(self._bad_seen))
        return (self.transform(img) if self.transform else img), target


class SyntheticDataset(Dataset):
    """Random images with random labels (fixed by seed): for tests and benchmarks."""

    def __init__(self, n: int, num_classes: int, in_chans: int, img_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_chans, img_size, img_size, generator=g)
        self.targets = torch.randint(0, num_classes, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


# ------------------------------------------------------------------------------ sources, found and split
def scan_image_folder(root: Path, in_chans: int | None) -> dict[str, Any]:
    """`root/train/<class>/*` and `root/val/` (or `test/`): the split folders, the classes (sorted),
    the samples of train and val, and the colour mode (`folder_mode`)."""
    train = root / "train"
    if not train.is_dir():
        raise ValueError(f"data.root: {str(root)!r} has no train/ folder; expected {root}/train/<class>/*")
    val = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if val is None:
        raise ValueError(f"data.root: {str(root)!r} has no val/ or test/ folder; add one with the same class folders")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(f"data.root: {str(train)!r} has {len(classes)} class folder(s); at least 2 are needed")
    samples = {"train": list_samples(train, classes), "val": list_samples(val, classes)}
    if not samples["train"]:
        raise ValueError(f"data.root: {str(train)!r} holds no images; expected {train}/<class>/*.jpg")
    test = root / "test" if (root / "test").is_dir() else val
    for held_out in dict.fromkeys((val, test)):
        check_held_out_classes(held_out, classes)
    mode = folder_mode({train: samples["train"], val: samples["val"]}, in_chans)
    return dict(train=train, val=val, test=test, classes=classes, samples=samples, mode=mode)


def check_held_out_classes(folder: Path, classes: Sequence[str]) -> None:
    """A validation/test folder must hold train/'s classes: a class folder train/ lacks (a typo such as
    `Cat` for `cat`) would leave its images out of every score without a word, so it is refused; a class
    of train/ with no images there is said (its accuracy is never measured)."""
    held = sorted(d.name for d in folder.iterdir() if d.is_dir())
    extra = [c for c in held if c not in classes]
    if extra:
        raise ValueError(f"data.root: {str(folder)!r} has class folder(s) {', '.join(map(repr, extra))} that train/ lacks "
                         f"(train/ has {', '.join(classes)}); their images would be left out of every score: rename or "
                         f"remove them")
    empty = [c for c in classes if not any(p.suffix.lower() in IMG_EXTENSIONS for p in (folder / c).glob("*"))]
    if empty:
        log.warning("data.root: %s has no images of class(es) %s: their accuracy is not measured", folder,
                    ", ".join(empty))


def folder_mode(samples: dict[Path, list], forced: int | None) -> str:
    """L when every file checked is grayscale, RGB as soon as one is colour; data.in_chans forces it."""
    if forced is not None:
        return "L" if forced == 1 else "RGB"
    scans = [ImageFolderDataset.scan(folder, s) for folder, s in samples.items() if s]
    gray, colour = sum(sc.gray for sc in scans), sum(sc.colour for sc in scans)
    if gray and colour:
        log.info("data.root: %d grayscale and %d colour images checked: reading all as RGB "
                 "(set data.in_chans to force)", gray, colour)
    return "L" if gray and not colour else "RGB"


def digits_split(val_fraction: float, seed: int) -> dict[str, Any]:
    """scikit-learn's digits as uint8 images, with a stratified train/val split fixed by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    tr, va = train_test_split(
        np.arange(len(images)), test_size=val_fraction, stratify=d.target, random_state=seed
    )
    return dict(images=images, targets=d.target, train=tr, val=va)


def synthetic_splits(num_samples: int, val_fraction: float, num_classes: int, in_chans: int, img_size: int,
                     seed: int) -> tuple[SyntheticDataset, SyntheticDataset]:
    n_val = max(1, int(num_samples * val_fraction))
    args = (num_classes, in_chans, img_size)
    return SyntheticDataset(num_samples - n_val, *args, seed=seed), SyntheticDataset(n_val, *args, seed=seed + 1)


def open_cifar(source: str, root: str, train: bool, transform, download: bool):
    from torchvision import datasets

    cls = datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100
    try:
        return cls(root, train=train, transform=transform, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"data.root: {source} not found under {root!r} ({e}); pass --data.download true "
            f"to fetch it, or use data.source=imagefolder"
        ) from None
