"""Unlabelled training images: a folder nobody labelled (`data.unlabeled_root`) or the training images
whose labels are held back (`data.labels_per_class`).

Distillation can learn from images without labels: the teacher labels them. The student's training set
is then the labelled images followed by the unlabelled ones, whose label is -1 (PyTorch's
`ignore_index` convention): the ground-truth term of the loss reads the labelled ones only, the
distillation term every image (`distill.losses`). The teacher (step 1) never sees an unlabelled image,
nor a held-back label: `ImageDataModule` gives it the labelled images alone.

Held-out images must not come back as "unlabelled" ones (the student would then learn the test set
through its teacher): `held_out_duplicates` finds unlabelled files byte-identical to validation or test
files (or, for data held in arrays, with the same pixels).
"""
from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from .datasets import ImageFolderDataset
from .transforms import IMG_EXTENSIONS

log = logging.getLogger(__name__)

UNLABELED = -1  # the label of an unlabelled image in a batch (cross_entropy's ignore_index convention)


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, at any depth, sorted (folder names carry no meaning)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


class UnlabeledImages(ImageFolderDataset):
    """The images of a folder in any layout (flat or in sub-folders), each with label -1, converted to
    `mode` (the labelled data's: L or RGB). Unreadable files are skipped and counted as in an image
    folder (`ImageFolderDataset`), up to `max_bad_fraction`."""

    def __init__(self, root: str | Path, mode: str, transform=None, max_bad_fraction: float = 0.01) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ValueError(f"data.unlabeled_root: {str(root)!r} is not a folder; give a folder of images (any layout)")
        files = image_files(root)
        if not files:
            raise ValueError(f"data.unlabeled_root: {str(root)!r} holds no image files ({', '.join(IMG_EXTENSIONS)}) "
                             f"at any depth")
        self.root, self.classes, self.mode, self.transform = root, [], mode, transform
        self.max_bad_fraction = max_bad_fraction
        self.samples = [(p, UNLABELED) for p in files]
        self.targets = [UNLABELED] * len(files)
        self._bad_seen: set[int] = set()
        if len(files) <= self.verify_limit:
            self._check_readable()
        scan = self.scan(root, self.samples)
        if (mode == "L" and scan.colour) or (mode == "RGB" and scan.gray and not scan.colour):
            log.info("data.unlabeled_root: %d colour and %d grayscale images, read as %s like the labelled ones",
                     scan.colour, scan.gray, mode)

    def _too_many(self, bad: int, example) -> ValueError:
        return ValueError(
            f"data.unlabeled_root: {bad} of {len(self.samples)} images under {str(self.root)!r} are unreadable "
            f"(e.g. {example}), above data.max_bad_fraction={self.max_bad_fraction}; fix or remove them"
        )


def labels_per_class_mask(targets: Sequence[int], per_class: int, seed: int, class_names: Sequence[str]) -> np.ndarray:
    """Which training images keep their label: `per_class` of each class, drawn by a generator seeded
    with `seed` (the same images for the same seed, whatever else changes), the rest unlabelled."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"data.labels_per_class={per_class!r} must be a whole number >= 1 (labelled training images "
                         f"kept per class), or null to keep every label")
    targets = np.asarray(targets, dtype=np.int64)
    keep = np.zeros(len(targets), dtype=bool)
    rng = np.random.default_rng([int(seed), 0x1ABE1])
    for label, name in enumerate(class_names):
        members = np.flatnonzero(targets == label)
        if len(members) < per_class:
            raise ValueError(f"data.labels_per_class={per_class}: class {name!r} has only {len(members)} training "
                             f"images; lower data.labels_per_class to at most {len(members)}")
        keep[rng.choice(members, size=per_class, replace=False)] = True
    return keep


class WithUnlabeled(Dataset):
    """A training set with labels held back or unlabelled images added: the images of `labeled` (those
    outside the bool mask `keep` with their label held back, i.e. -1) followed by `unlabeled` (label -1).
    `labeled_only` serves the kept images alone instead (what the teacher trains on).

    `targets` holds every label (-1 included); `num_labeled` counts the labelled images. The transform is
    shared: setting `transform` sets it on both parts (`copy.copy` copies the parts too, so a copy with
    another transform leaves this one alone, as `distill.data.device_loader` needs). When it serves every
    image of `labeled` and nothing else, its arrays (`data`, `images`, `x`) stay readable here, so fast
    paths that read them (on-device decoding, the teacher cache's fingerprint) still apply."""

    def __init__(self, labeled: Dataset, unlabeled: UnlabeledImages | None = None, keep: np.ndarray | None = None,
                 labeled_only: bool = False) -> None:
        base = [int(t) for t in getattr(labeled, "targets")]
        self.labeled = labeled
        self.keep = np.ones(len(base), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
        self.index = np.flatnonzero(self.keep) if labeled_only else np.arange(len(base))
        self.unlabeled = None if labeled_only else unlabeled
        self.targets = [base[j] if self.keep[j] else UNLABELED for j in self.index]
        if self.unlabeled is not None:
            self.targets += [UNLABELED] * len(self.unlabeled)
        self.num_labeled = int(self.keep[self.index].sum())
        self._whole = self.unlabeled is None and len(self.index) == len(base)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if i < len(self.index):
            j = int(self.index[i])
            x, y = self.labeled[j]
            return x, (y if self.keep[j] else UNLABELED)
        return self.unlabeled[i - len(self.index)]

    @property
    def transform(self):
        return getattr(self.labeled, "transform", None)

    @transform.setter
    def transform(self, value) -> None:
        self.labeled.transform = value
        if self.unlabeled is not None:
            self.unlabeled.transform = value

    def __copy__(self) -> "WithUnlabeled":
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.labeled = copy.copy(self.labeled)
        new.unlabeled = copy.copy(self.unlabeled) if self.unlabeled is not None else None
        return new

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """(file, label) of every image served, when the images are files (image folders)."""
        own = getattr(self.labeled, "samples", None)
        if own is None:
            raise AttributeError("samples")
        files = [own[int(j)][0] for j in self.index] + [p for p, _ in (self.unlabeled.samples if self.unlabeled else [])]
        return list(zip(files, self.targets))

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found above: the labelled part's arrays, when it is the whole set,
        # and `image_bytes` when the labelled part keeps encoded images (Hugging Face datasets).
        state = self.__dict__
        if "labeled" in state and (name == "root" or (name in ("data", "images", "x") and state.get("_whole"))):
            return getattr(state["labeled"], name)
        if "labeled" in state and name == "image_bytes" and hasattr(state["labeled"], "image_bytes"):
            return self._image_bytes
        raise AttributeError(name)

    def _image_bytes(self, i: int) -> bytes:
        """The stored bytes of image `i` (the teacher cache's fingerprint): the labelled part's, or the
        unlabelled part's (its file's bytes for a folder)."""
        if i < len(self.index):
            return self.labeled.image_bytes(int(self.index[i]))
        j = i - len(self.index)
        if hasattr(self.unlabeled, "image_bytes"):
            return self.unlabeled.image_bytes(j)
        return Path(self.unlabeled.samples[j][0]).read_bytes()

    @property
    def unlabeled_root(self) -> Path | None:
        return self.unlabeled.root if self.unlabeled is not None else None


class UnlabeledMixup:
    """timm's `Mixup` for batches with unlabelled images (label -1), whose targets it cannot one-hot.

    "Unlabelled" is handed to timm as one more class (index `num_classes`; `mixup` is built for
    `num_classes + 1`), so its mixing stays timm's (mixup or cutmix, per batch, pair or element). A mixed
    image keeps a ground-truth target only when every image in it is labelled: a row with any weight on
    the extra class becomes all zeros, which `distill.losses` reads as "no label" (the distillation term
    still covers it: the teacher sees the mixed image). Rows of labelled pairs are timm's, unchanged."""

    def __init__(self, mixup, num_classes: int) -> None:
        self.mixup, self.num_classes = mixup, int(num_classes)

    def __call__(self, x, target):
        target = target.masked_fill(target < 0, self.num_classes)
        x, soft = self.mixup(x, target)
        labeled = soft[:, self.num_classes] == 0
        return x, soft[:, : self.num_classes] * labeled[:, None]


# --------------------------------------------------------------------------------- held-out duplicates
def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pixel_digest(image) -> str:
    arr = np.ascontiguousarray(np.asarray(image))
    return hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode() + arr.tobytes()).hexdigest()


def held_out_duplicates(unlabeled: UnlabeledImages, held_out: Dataset) -> list[tuple[Path, str]]:
    """The unlabelled files that are validation or test images too: byte-identical files when the held-out
    images are files (image folders) or stored encoded (Hugging Face datasets: `byte_digests`), the same
    pixels when they are arrays (digits, CIFAR's arrays). Returns (unlabelled file, what it duplicates) pairs."""
    digests = getattr(held_out, "byte_digests", None)
    if digests is not None:
        theirs = {}
        for i, digest in enumerate(digests()):
            theirs.setdefault(digest, held_out.describe(i))
        found = ((p, theirs.get(_file_digest(p))) for p, _ in unlabeled.samples)
        return [(p, dup) for p, dup in found if dup is not None]
    samples = getattr(held_out, "samples", None)
    if samples is not None:
        theirs = {}
        for p, _ in samples:
            theirs.setdefault(_file_digest(p), str(p))
        found = ((p, theirs.get(_file_digest(p))) for p, _ in unlabeled.samples)
        return [(p, dup) for p, dup in found if dup is not None]
    arrays = next((getattr(held_out, a) for a in ("images", "data") if isinstance(getattr(held_out, a, None), np.ndarray)), None)
    if arrays is None:
        return []  # synthetic tensors: nothing a file could duplicate
    theirs = {_pixel_digest(a): f"held-out image {i}" for i, a in enumerate(arrays)}
    sizes = {tuple(a.shape[:2]) for a in arrays[:1]}
    from PIL import Image

    out = []
    for p, _ in unlabeled.samples:
        try:
            with Image.open(p) as im:
                if (im.height, im.width) not in sizes:
                    continue
                img = im.convert(unlabeled.mode)
        except Exception:  # noqa: BLE001 - an unreadable file is skipped (and counted) elsewhere
            continue
        dup = theirs.get(_pixel_digest(img))
        if dup is not None:
            out.append((p, dup))
    return out
