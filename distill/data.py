"""ImageDataModule: one LightningDataModule for the bundled digits, any ImageFolder tree, CIFAR and
synthetic data, with timm's augmentation and batch-level mixup/cutmix.

Mixup/cutmix runs in `on_after_batch_transfer`, i.e. on the batch the LightningModule receives, so the
teacher and the student always see the same mixed images.
"""
from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

log = logging.getLogger(__name__)

Source = Literal["digits", "imagefolder", "cifar10", "cifar100", "synthetic"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
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


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` with classes in sorted order; every image converted to `mode` (L or RGB).

    Files that cannot be decoded are skipped with a counted warning; past `max_bad_fraction` of the
    files it fails instead. Folders of up to `verify_limit` images are checked when opened (once per
    process); larger ones (ImageNet) are checked as they are read, the bad file replaced by the next.
    """

    verify_limit = 200_000
    _verified: dict[tuple[str, int], list[Path]] = {}  # (root, count) -> unreadable files

    def __init__(self, root: Path, classes: Sequence[str], mode: str, transform=None, max_bad_fraction: float = 0.01):
        self.root, self.classes, self.mode, self.transform = Path(root), list(classes), mode, transform
        self.max_bad_fraction = max_bad_fraction
        samples = []
        for label, c in enumerate(self.classes):
            folder = self.root / c
            if folder.is_dir():
                samples += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS]
        if not samples:
            raise ValueError(f"data.root: {str(self.root)!r} holds no images in class folders; expected {self.root}/<class>/*.jpg")
        self.samples = samples
        self.targets = [t for _, t in samples]
        self._bad_seen: set[int] = set()
        if len(samples) <= self.verify_limit:
            self._check_readable()

    def _too_many(self, bad: int, example) -> ValueError:
        return ValueError(
            f"data.root: {bad} of {len(self.samples)} images under {str(self.root)!r} are unreadable "
            f"(e.g. {example}), above data.max_bad_fraction={self.max_bad_fraction}; fix or remove them"
        )

    def _check_readable(self) -> None:
        key = (str(self.root.resolve()), len(self.samples))
        if key not in self._verified:
            bad = []
            for p, _ in self.samples:
                try:
                    with Image.open(p) as im:
                        im.verify()
                except Exception:  # noqa: BLE001 - any decode failure makes the file unusable
                    bad.append(p)
            self._verified[key] = bad
        bad = self._verified[key]
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


class ImageDataModule(L.LightningDataModule):
    """Images and labels for both distillation steps.

    Args:
        source: `digits` (scikit-learn's bundled 8x8 handwritten digits, 1,797 images, no download),
            `imagefolder` (`root/train/<class>/*` and `root/val/<class>/*` or `root/test/<class>/*`,
            grayscale or RGB), `cifar10` / `cifar100` (torchvision), `synthetic` (random tensors).
        root: data folder for imagefolder and cifar.
        img_size: side of the square images the models see (images are resized to it).
        batch_size: samples per device and step (the global batch is batch_size x devices x nodes).
        num_workers: data loader worker processes.
        val_fraction: share of digits / synthetic held out for validation (stratified, fixed by `seed`).
        seed: seed of the digits / synthetic split.
        mean: per-channel normalisation mean; None = the dataset's own (computed on training images).
        std: per-channel normalisation std; None = the dataset's own.
        crop: training crop: `pad` (random crop after zero padding of img_size/8, the CIFAR recipe),
            `rrc` (RandomResizedCrop, the ImageNet recipe) or `none`.
        hflip: probability of a horizontal flip in training (0 for digits and text).
        auto_augment: timm RandAugment/AutoAugment string, e.g. `rand-m9-mstd0.5-inc1` (DeiT); None = off.
        re_prob: random erasing probability (DeiT: 0.25).
        mixup: mixup alpha (DeiT: 0.8); 0 = off.
        cutmix: cutmix alpha (DeiT: 1.0); 0 = off.
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        download: let torchvision download CIFAR when the files are missing.
        pin_memory: pin host memory for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (when num_workers > 0).
        drop_last: drop the last incomplete training batch (needed by mixup, which pairs samples).
        max_bad_fraction: share of unreadable images in an image folder tolerated (skipped with a warning).
        num_samples: size of the synthetic dataset.
        num_classes_synthetic: classes of the synthetic dataset.
        in_chans_synthetic: channels of the synthetic dataset.
        keyed_views: training batches are `(x, y, keys)`: every sample's augmentation is drawn from
            an RNG seeded by (`seed`, view, index), so a view replays bit-identically, and `keys` (a
            host-side int64 array of (index, view) rows) names it; needed by `model.teacher_cache`.
            Also makes a resume from the middle of an epoch exact (step checkpoints,
            `checkpoint.every_n_train_steps`); other training loaders resume exactly only from
            epoch boundaries (see `distill.fault_tolerance.ResumeState`).
        view_epochs: with keyed_views, epoch `e` trains on view `e % view_epochs` (the number of
            views a teacher cache holds); None = a new view every epoch.
        on_device: keep the decoded images as one uint8 tensor on the training device and crop,
            flip, erase and normalise batches there (`distill.device_data`): for CIFAR-size data,
            where the host pipeline is the bottleneck. Supports crop pad/none, hflip, re_prob,
            mixup/cutmix; not rrc or auto_augment. num_workers is then only used to decode once.
    """

    def __init__(
        self,
        source: Source = "digits",
        root: str | None = None,
        img_size: int = 8,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        crop: Literal["pad", "rrc", "none"] = "none",
        hflip: float = 0.0,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        download: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        max_bad_fraction: float = 0.01,
        num_samples: int = 512,
        num_classes_synthetic: int = 10,
        in_chans_synthetic: int = 3,
        keyed_views: bool = False,
        view_epochs: int | None = None,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        if source not in ("digits", "imagefolder", "cifar10", "cifar100", "synthetic"):
            raise ValueError(f"data.source={source!r} is unknown; use digits, imagefolder, cifar10, cifar100 or synthetic")
        if source in ("imagefolder", "cifar10", "cifar100") and not root:
            raise ValueError(f"data.root is required for data.source={source}; pass --data.root DIR")
        if img_size < 1 or batch_size < 1:
            raise ValueError(f"data.img_size={img_size} and data.batch_size={batch_size} must be positive")
        self.save_hyperparameters()
        self.source, self.root, self.img_size, self.batch_size = source, root, img_size, batch_size
        self.num_workers = num_workers
        self._mean, self._std = mean, std
        self.mixup_fn = None
        self.train_set = self.val_set = self.test_set = None

    # ---------------------------------------------------------------------------- dataset metadata
    @cached_property
    def _folder(self) -> dict[str, Any]:
        root = Path(self.root).expanduser()
        train = root / "train"
        if not train.is_dir():
            raise ValueError(f"data.root: {str(root)!r} has no train/ folder; expected {root}/train/<class>/*")
        val = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if val is None:
            raise ValueError(f"data.root: {str(root)!r} has no val/ or test/ folder; add one with the same class folders")
        classes = sorted(d.name for d in train.iterdir() if d.is_dir())
        if len(classes) < 2:
            raise ValueError(f"data.root: {str(train)!r} has {len(classes)} class folder(s); at least 2 are needed")
        first = next((p for c in classes for p in sorted((train / c).iterdir()) if p.suffix.lower() in IMG_EXTENSIONS), None)
        if first is None:
            raise ValueError(f"data.root: {str(train)!r} holds no images; expected {train}/<class>/*.jpg")
        with Image.open(first) as im:
            mode = "L" if im.mode in ("L", "1", "I", "I;16", "LA") else "RGB"
        test = root / "test" if (root / "test").is_dir() else val
        return dict(train=train, val=val, test=test, classes=classes, mode=mode)

    @property
    def class_names(self) -> list[str]:
        if self.source == "digits":
            return [str(i) for i in range(10)]
        if self.source == "imagefolder":
            return self._folder["classes"]
        if self.source == "cifar10":
            return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        if self.source == "cifar100":
            return self._cifar(train=False, transform=None).classes
        return [f"class_{i}" for i in range(self.hparams.num_classes_synthetic)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        if self.source == "digits":
            return 1
        if self.source == "imagefolder":
            return 1 if self._folder["mode"] == "L" else 3
        if self.source == "synthetic":
            return self.hparams.in_chans_synthetic
        return 3

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self._mean) if self._mean is not None else self._stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self._std) if self._std is not None else self._stats[1]

    @cached_property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.source in CIFAR_STATS:
            return CIFAR_STATS[self.source]
        if self.source == "synthetic":
            return (0.0,) * self.in_chans, (1.0,) * self.in_chans
        # digits and image folders: the training images' own statistics (up to 2,000 of them)
        ds = self._raw_train()
        idx = np.random.default_rng(0).permutation(len(ds))[:2000]
        to_tensor = T.Compose([T.Resize((self.img_size, self.img_size)), T.ToTensor()])
        x = torch.stack([to_tensor(ds[int(i)][0]) for i in idx])
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())

    # ---------------------------------------------------------------------------------- datasets
    @cached_property
    def _digits(self) -> dict[str, Any]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        tr, va = train_test_split(
            np.arange(len(images)), test_size=self.hparams.val_fraction, stratify=d.target, random_state=self.hparams.seed
        )
        return dict(images=images, targets=d.target, train=tr, val=va)

    def _raw_train(self) -> Dataset:
        if self.source == "digits":
            d = self._digits
            return ArrayImageDataset(d["images"][d["train"]], d["targets"][d["train"]])
        f = self._folder
        return ImageFolderDataset(f["train"], f["classes"], f["mode"], None, self.hparams.max_bad_fraction)

    def _cifar(self, train: bool, transform):
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.source == "cifar10" else datasets.CIFAR100
        try:
            return cls(self.root, train=train, transform=transform, download=self.hparams.download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"data.root: {self.source} not found under {self.root!r} ({e}); pass --data.download true "
                f"to fetch it, or use data.source=imagefolder"
            ) from None

    def train_transform(self) -> T.Compose:
        hp, size = self.hparams, self.img_size
        ops: list = []
        if hp.crop == "rrc":
            ops.append(T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True))
        else:
            ops.append(T.Resize((size, size), antialias=True))
            if hp.crop == "pad":
                ops.append(T.RandomCrop(size, padding=max(1, size // 8)))
        if hp.hflip > 0:
            ops.append(T.RandomHorizontalFlip(hp.hflip))
        if hp.auto_augment:
            from timm.data.auto_augment import auto_augment_transform, rand_augment_transform

            fill = tuple(round(255 * m) for m in self.mean)
            aa_hp = dict(translate_const=max(1, int(size * 0.45)), img_mean=fill if len(fill) > 1 else fill[0])
            make = rand_augment_transform if hp.auto_augment.startswith("rand") else auto_augment_transform
            ops.append(make(hp.auto_augment, aa_hp))
        ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if hp.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            ops.append(RandomErasing(hp.re_prob, mode="pixel", device="cpu"))
        return T.Compose(ops)

    def eval_transform(self) -> T.Compose:
        return T.Compose([T.Resize((self.img_size, self.img_size), antialias=True), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        train_tf, eval_tf = self.train_transform(), self.eval_transform()
        if self.source == "digits":
            d = self._digits
            self.train_set = ArrayImageDataset(d["images"][d["train"]], d["targets"][d["train"]], train_tf)
            self.val_set = ArrayImageDataset(d["images"][d["val"]], d["targets"][d["val"]], eval_tf)
            self.test_set = self.val_set
        elif self.source == "imagefolder":
            f = self._folder
            self.train_set = ImageFolderDataset(f["train"], f["classes"], f["mode"], train_tf, hp.max_bad_fraction)
            self.val_set = ImageFolderDataset(f["val"], f["classes"], f["mode"], eval_tf, hp.max_bad_fraction)
            self.test_set = self.val_set if f["test"] == f["val"] else ImageFolderDataset(
                f["test"], f["classes"], f["mode"], eval_tf, hp.max_bad_fraction
            )
        elif self.source in ("cifar10", "cifar100"):
            self.train_set, self.val_set = self._cifar(True, train_tf), self._cifar(False, eval_tf)
            self.test_set = self.val_set
        else:
            n_val = max(1, int(hp.num_samples * hp.val_fraction))
            args = (hp.num_classes_synthetic, hp.in_chans_synthetic, self.img_size)
            self.train_set = SyntheticDataset(hp.num_samples - n_val, *args, seed=hp.seed)
            self.val_set = SyntheticDataset(n_val, *args, seed=hp.seed + 1)
            self.test_set = self.val_set
        if hp.drop_last and len(self.train_set) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} training images and "
                f"drop_last would leave no batch; lower data.batch_size or set data.drop_last false"
            )
        if hp.mixup > 0 or hp.cutmix > 0:
            from timm.data import Mixup

            # Label smoothing belongs to the loss (DistillationLoss / TeacherModule), not here.
            self.mixup_fn = Mixup(
                mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob,
                switch_prob=hp.mixup_switch_prob, label_smoothing=0.0, num_classes=self.num_classes,
            )

    # ------------------------------------------------------------------------------- dataloaders
    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        workers = self.num_workers
        sampler = None
        trainer = self.trainer
        if not train and trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads the last shard with repeated samples, which
            # would count them twice in the metrics: shard evaluation data without padding instead.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(ds, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                   shuffle=False)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train if sampler is None else False,
            sampler=sampler,
            drop_last=train and self.hparams.drop_last,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.persistent_workers and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.hparams.on_device:
            from .device_data import device_loader

            return device_loader(self, "train")
        if self.hparams.keyed_views:
            from .keyed_views import keyed_train_loader

            return keyed_train_loader(self)
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.hparams.on_device:
            from .device_data import device_loader

            return device_loader(self, "val")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.hparams.on_device:
            from .device_data import device_loader

            return device_loader(self, "test")
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Mix on the device, once per batch, before the module sees it: teacher and student get the same
        # mixed images, and the targets become soft (B, C) probabilities.
        if self.mixup_fn is not None and self.trainer is not None and self.trainer.training:
            x, y, *keys = batch  # keys: (x, y, keys) batches of keyed_views
            if x.shape[0] % 2 == 0:
                x, y = self.mixup_fn(x, y)
            return (x, y, *keys)
        return batch
