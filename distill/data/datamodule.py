"""ImageDataModule: one LightningDataModule for the bundled digits, any ImageFolder tree, Hugging Face
`datasets` data, CIFAR and synthetic data, with timm's augmentation and batch-level mixup/cutmix.

Mixup/cutmix runs in `on_after_batch_transfer`, i.e. on the batch the LightningModule receives, so the
teacher and the student always see the same mixed images.
"""
from __future__ import annotations

import hashlib
import logging
import math
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .datasets import (CIFAR_STATS, ArrayImageDataset, ImageFolderDataset, SyntheticDataset, digits_split, open_cifar,
                       scan_image_folder, synthetic_splits)

log = logging.getLogger(__name__)

Source = Literal["digits", "imagefolder", "hfds", "cifar10", "cifar100", "synthetic"]
HFDS_ONLY = ("image_key", "label_key", "train_split", "val_split", "unlabeled_split")  # arguments of hfds alone


def _sha(*parts: Any) -> str:
    """sha256 of the parts, each bytes or its repr, with a separator that no part can fake."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class ImageDataModule(L.LightningDataModule):
    """Images and labels for both distillation steps.

    Args:
        source: `digits` (scikit-learn's bundled 8x8 handwritten digits, 1,797 images, no download),
            `imagefolder` (`root/train/<class>/*` and `root/val/<class>/*` or `root/test/<class>/*`,
            grayscale or RGB), `hfds` (Hugging Face `datasets` data: `distill.data.hf_datasets`), `cifar10` /
            `cifar100` (torchvision), `synthetic` (random tensors).
        root: data folder for imagefolder and cifar; for hfds a `save_to_disk` folder (DatasetDict or
            Dataset), a folder of parquet or arrow files (splits from the file and folder names), or a Hub
            name `ORG/NAME[@REVISION]` (read from datasets' local cache when offline; never waits on a
            network that is not there).
        img_size: side of the square images the models see; None = the pretrained weights' input size
            when the model starts from pretrained weights, else 8.
        batch_size: samples per device and step (the global batch is batch_size x devices x nodes).
        num_workers: data loader worker processes.
        val_fraction: share of digits / synthetic (and of hfds data with a training split alone) held out
            for validation (stratified, fixed by `seed`).
        seed: seed of the digits / synthetic split and of the repeated-augmentation order
            (`split_fingerprint` tells whether two runs hold out the same images).
        mean: per-channel normalisation mean; None = the pretrained weights' when the model starts from
            pretrained weights, else the dataset's own (computed on training images).
        std: per-channel normalisation std; None = the pretrained weights', else the dataset's own.
        crop: training crop: `pad` (random crop after zero padding of img_size/8, the CIFAR recipe),
            `rrc` (RandomResizedCrop, the ImageNet recipe) or `none`. `pad` and `none` start from what
            evaluation sees (shorter side resized, centre crop: no stretching).
        crop_pct: evaluation crop, as in DeiT/timm: the shorter side is resized to img_size / crop_pct
            and the centre img_size square is kept. 1.0 (default, the CIFAR convention) keeps the whole
            centre square; DeiT's ImageNet value is 0.875 (resize to 256, crop 224). In (0, 1].
        interpolation: resampling of the evaluation resize, the RandomResizedCrop and the geometric ops
            of auto_augment: nearest, bilinear (default), bicubic (DeiT), box, hamming or lanczos.
        in_chans: channels of an image folder or hfds data: None = detected from its images (all grayscale
            -> 1, any colour image -> 3); 1 or 3 converts every image. Other sources have fixed channels.
        repeated_aug: repeated augmentation (DeiT's RASampler, `distill.data.samplers`): each training image
            appears this many times per epoch, spread over the processes, with the epoch kept at
            DeiT's length; DeiT uses 3 on ImageNet. 0 or 1 = off. Needs >= 256 training images.
            Used only with several processes (DDP), as in DeiT; one process shuffles plainly.
        hflip: probability of a horizontal flip in training (0 for digits and text).
        auto_augment: timm RandAugment/AutoAugment/AugMix string, e.g. `rand-m9-mstd0.5-inc1` (DeiT);
            None = off. Posterize keeping 0 bits gives a black image, as with the Pillow < 13 DeiT ran
            on (`distill.data.transforms.posterize_old_pillow`).
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
            epoch boundaries (see `distill.training.fault_tolerance.ResumeState`).
        view_epochs: with keyed_views, epoch `e` trains on view `e % view_epochs` (the number of
            views a teacher cache holds); None = a new view every epoch.
        unlabeled_root: a folder of training images without labels, in any layout (flat or in
            sub-folders; folder names are ignored), read with an image folder's checks. The student
            (step 2) trains on them too with label -1: its distillation term reads every image, the
            ground-truth term the labelled ones (`distill.losses`). The teacher (step 1) never sees them.
            Files byte-identical to validation or test images are refused.
        labels_per_class: keep the labels of this many training images per class (drawn with `seed`,
            recorded in `split_fingerprint`) and hold the rest back as unlabelled (label -1): how
            semi-supervised benchmarks are built. The teacher trains on the labelled ones alone, and a
            student whose labelled images differ from its teacher's is refused. None = every label.
        labeled_fraction: share of labelled images in every training batch of a set with unlabelled
            images, e.g. 0.5 (the labelled images are then drawn more often than the others, each batch
            shuffled); None (default) = as in the data (a plain shuffle of all training images). An
            epoch is one pass's worth of batches over all training images either way.
        on_device: keep the decoded images as one uint8 tensor on the training device and crop,
            flip, erase and normalise batches there (`distill.data.device_loader`): for CIFAR-size data,
            where the host pipeline is the bottleneck. Supports crop pad/none, hflip, re_prob,
            mixup/cutmix; not rrc or auto_augment. num_workers is then only used to decode once.
        image_key: hfds: the column of the images; None = the one `Image` feature.
        label_key: hfds: the column of the labels; None = the one `ClassLabel` feature (whose names are
            the class names; an integer column without one gives classes named 0..N-1). Training rows
            labelled -1 or None are unlabelled images (as data.unlabeled_root's).
        train_split: hfds: the split training reads.
        val_split: hfds: the split validation reads; None = `validation`, else `test`, else (data with a
            training split alone) data.val_fraction of its labelled rows. A `test` split other than it
            is the test set.
        unlabeled_split: hfds: a split of images without labels (label -1) for the student, as
            data.unlabeled_root (the teacher never sees it).
    """

    def __init__(
        self,
        source: Source = "digits",
        root: str | None = None,
        img_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        crop: Literal["pad", "rrc", "none"] = "none",
        crop_pct: float = 1.0,
        interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"] = "bilinear",
        in_chans: int | None = None,
        repeated_aug: int = 0,
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
        unlabeled_root: str | None = None,
        labels_per_class: int | None = None,
        labeled_fraction: float | None = None,
        image_key: str | None = None,
        label_key: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        unlabeled_split: str | None = None,
    ) -> None:
        super().__init__()
        if source not in ("digits", "imagefolder", "hfds", "cifar10", "cifar100", "synthetic"):
            raise ValueError(f"data.source={source!r} is unknown; use digits, imagefolder, hfds, cifar10, cifar100 or "
                             f"synthetic")
        if source in ("imagefolder", "hfds", "cifar10", "cifar100") and not root:
            raise ValueError(f"data.root is required for data.source={source}; pass --data.root DIR")
        given = dict(image_key=image_key, label_key=label_key, train_split=train_split if train_split != "train" else None,
                     val_split=val_split, unlabeled_split=unlabeled_split)
        stray = [k for k in HFDS_ONLY if given[k] is not None]
        if source != "hfds" and stray:
            raise ValueError(f"data.{stray[0]} applies to data.source hfds only (this is {source}); remove it")
        if unlabeled_split is not None and unlabeled_root is not None:
            raise ValueError("data.unlabeled_split and data.unlabeled_root both add unlabelled images; use one of them")
        self._img_size_given = img_size is not None
        img_size = 8 if img_size is None else img_size
        if img_size < 1 or batch_size < 1:
            raise ValueError(f"data.img_size={img_size} and data.batch_size={batch_size} must be positive")
        from .transforms import check_crop_pct, check_interpolation

        check_crop_pct(crop_pct)
        check_interpolation(interpolation)
        if in_chans not in (None, 1, 3):
            raise ValueError(f"data.in_chans={in_chans} is not supported; use 1 (grayscale), 3 (RGB) or leave it "
                             f"unset to detect it from the images")
        if repeated_aug < 0:
            raise ValueError(f"data.repeated_aug={repeated_aug} must be >= 0 (0 or 1 = off, DeiT uses 3)")
        if repeated_aug > 1 and (keyed_views or on_device):
            which = "keyed_views" if keyed_views else "on_device"
            raise ValueError(f"data.repeated_aug={repeated_aug} does not work with data.{which}: true (they draw "
                             f"their own sample order); turn one of them off")
        if on_device and (crop_pct != 1.0 or interpolation != "bilinear"):
            raise ValueError(f"data.on_device resizes with a bilinear Resize to img_size x img_size; it takes "
                             f"data.crop_pct 1.0 and data.interpolation bilinear, not {crop_pct} and {interpolation}")
        if labels_per_class is not None and (isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int)
                                             or labels_per_class < 1):
            raise ValueError(f"data.labels_per_class={labels_per_class!r} must be a whole number >= 1 (labelled "
                             f"training images kept per class), or null to keep every label")
        if labeled_fraction is not None:
            if not 0.0 < float(labeled_fraction) < 1.0:
                raise ValueError(f"data.labeled_fraction={labeled_fraction} must lie strictly between 0 and 1 (the "
                                 f"share of labelled images in a batch), or be null for the share in the data")
            if unlabeled_root is None and labels_per_class is None and unlabeled_split is None and source != "hfds":
                raise ValueError("data.labeled_fraction needs unlabelled images: set data.unlabeled_root or "
                                 "data.labels_per_class, or remove data.labeled_fraction")
            if repeated_aug > 1:
                raise ValueError(f"data.labeled_fraction does not work with data.repeated_aug={repeated_aug} (both "
                                 f"draw the sample order); turn one of them off")
        self.save_hyperparameters()
        self.source, self.root, self.img_size, self.batch_size = source, root, img_size, batch_size
        self.num_workers = num_workers
        self._mean, self._std = mean, std
        self.mixup_fn = None
        self.train_set = self.val_set = self.test_set = None

    # ---------------------------------------------------------------------------- dataset metadata
    @cached_property
    def _folder(self) -> dict[str, Any]:
        return scan_image_folder(Path(self.root).expanduser(), self.hparams.in_chans)

    @cached_property
    def _hf(self):
        """The splits and columns of hfds data (`distill.data.hf_datasets.HFImageSource`), opened once."""
        from .hf_datasets import HFImageSource

        hp = self.hparams
        return HFImageSource(self.root, image_key=hp.get("image_key"), label_key=hp.get("label_key"),
                             train_split=hp.get("train_split", "train"), val_split=hp.get("val_split"),
                             unlabeled_split=hp.get("unlabeled_split"), val_fraction=hp.val_fraction, seed=hp.seed,
                             max_bad_fraction=hp.max_bad_fraction)

    @property
    def class_names(self) -> list[str]:
        if self.source == "digits":
            return [str(i) for i in range(10)]
        if self.source == "imagefolder":
            return self._folder["classes"]
        if self.source == "hfds":
            return self._hf.class_names
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
            if self.hparams.in_chans not in (None, 1):
                raise ValueError(f"data.in_chans={self.hparams.in_chans} only converts image folders; digits has "
                                 f"1 channel: remove data.in_chans")
            return 1
        if self.source == "imagefolder":
            return self.hparams.in_chans or (1 if self._folder["mode"] == "L" else 3)
        if self.source == "hfds":
            return self.hparams.in_chans or (1 if self._hf.mode == "L" else 3)
        fixed = self.hparams.in_chans_synthetic if self.source == "synthetic" else 3
        forced = self.hparams.in_chans
        if forced is not None and forced != fixed:
            raise ValueError(f"data.in_chans={forced} only converts image folders; data.source={self.source} has "
                             f"{fixed} channel(s): remove data.in_chans")
        return fixed

    @property
    def eval_spec(self) -> dict[str, Any]:
        """The evaluation transform as a plain dict (img_size, crop_pct, interpolation, mean, std,
        in_chans): what checkpoints record and `distill.data.transforms.build_eval_transform` rebuilds."""
        from .transforms import eval_spec

        hp = self.hparams
        return eval_spec(img_size=self.img_size, crop_pct=hp.crop_pct, interpolation=hp.interpolation,
                         mean=self.mean, std=self.std, in_chans=self.in_chans)

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
        from .transforms import interp_mode

        # digits, image folders and hfds: the training images' own statistics (up to 2,000 of them), seen as
        # evaluation sees them (shorter side resized, centre crop), unnormalised
        ds = self._raw_train()
        idx = np.random.default_rng(0).permutation(len(ds))[:2000]
        hp = self.hparams
        to_tensor = T.Compose([T.Resize(math.floor(self.img_size / hp.crop_pct), interpolation=interp_mode(hp.interpolation)),
                               T.CenterCrop(self.img_size), T.ToTensor()])
        x = torch.stack([to_tensor(ds[int(i)][0]) for i in idx])
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())

    # ---------------------------------------------------------------------------------- datasets
    @cached_property
    def _digits(self) -> dict[str, Any]:
        return digits_split(self.hparams.val_fraction, self.hparams.seed)

    def _synthetic(self) -> tuple[SyntheticDataset, SyntheticDataset]:
        hp = self.hparams
        return synthetic_splits(hp.num_samples, hp.val_fraction, hp.num_classes_synthetic, hp.in_chans_synthetic,
                                self.img_size, hp.seed)

    @property
    def split_fingerprint(self) -> dict[str, str]:
        """Which data, and which of it is held out or labelled (plain sha256 strings):

        - `dataset`: the source and all its samples, whatever the split;
        - `val`: the samples held out for validation;
        - `train`: every training sample; `labeled`: the training samples whose label is used
          (`data.labels_per_class`; equal to `train` without it).

        `val` changes when data.seed or data.val_fraction moves other images into validation (digits,
        synthetic); for image folders and CIFAR the split is fixed by the files (image folders: the
        relative file lists of train/ and val/, not their contents; the root may differ). A student
        whose `val` differs from its teacher's validates on images the teacher trained on; one whose
        `labeled` differs learns from a teacher that saw labels the student is meant not to have (or
        not the ones it has). Unlabelled folders (`data.unlabeled_root`) are in none of them: the
        teacher never sees them. hfds: rows named by split and position within data identified by its
        labels and a sample of its image bytes (`HFImageSource.fingerprint` says why); training rows
        without a label are in `train`, not in `labeled`.
        """
        keep = self._labels_kept
        if self.source == "hfds":
            fp = self._hf.fingerprint()
            return dict(dataset=fp["dataset"], val=_sha(*sorted(fp["val"])), **self._train_fingerprints(fp["train"], keep))
        if self.source == "digits":
            d = self._digits
            keys = [_sha(img.tobytes(), int(t)) for img, t in zip(d["images"], d["targets"])]
            train = [keys[i] for i in d["train"]]
            return dict(dataset=_sha("digits", *keys), val=_sha(*sorted(keys[i] for i in d["val"])),
                        **self._train_fingerprints(train, keep))
        if self.source == "imagefolder":
            f = self._folder
            root = Path(self.root).expanduser()
            train, val = ([p.relative_to(root).as_posix() for p, _ in f["samples"][k]] for k in ("train", "val"))
            read = [p.relative_to(root).as_posix() for p, _ in self._raw_train().samples]  # unreadable files left out
            return dict(dataset=_sha("imagefolder", *sorted(train + val)), val=_sha(*sorted(val)),
                        **self._train_fingerprints(read, keep))
        if self.source == "synthetic":
            train_set, val_set = self._synthetic()
            train, val = ([_sha(ds.x[i].numpy().tobytes(), ds.targets[i]) for i in range(len(ds))] for ds in (train_set, val_set))
            return dict(dataset=_sha("synthetic", *sorted(train + val)), val=_sha(*sorted(val)),
                        **self._train_fingerprints(train, keep))
        train, val = self._cifar(True, None), self._cifar(False, None)
        arrays = [_sha(np.ascontiguousarray(ds.data).tobytes(), np.asarray(ds.targets, np.int64).tobytes())
                  for ds in (train, val)]
        labeled = arrays[0] if keep is None else _sha(arrays[0], keep.tobytes())
        return dict(dataset=_sha(self.source, *arrays), val=arrays[1], train=arrays[0], labeled=labeled)

    @staticmethod
    def _train_fingerprints(train_keys: list[str], keep: np.ndarray | None) -> dict[str, str]:
        train = _sha(*sorted(train_keys))
        labeled = train if keep is None else _sha(*sorted(k for k, kept in zip(train_keys, keep) if kept))
        return dict(train=train, labeled=labeled)

    @cached_property
    def _labels_kept(self) -> np.ndarray | None:
        """`data.labels_per_class`: which training images (in the training set's order) keep their label.
        hfds: never the rows without a label (-1 or None)."""
        per_class = self.hparams.get("labels_per_class")
        if self.source == "hfds" and per_class is None:
            return self._hf.labeled_rows()
        if per_class is None:
            return None
        from .unlabeled import labels_per_class_mask

        return labels_per_class_mask(self._raw_train().targets, per_class, self.hparams.seed, self.class_names)

    def _raw_train(self) -> Dataset:
        """The training images (labelled, untransformed), in the order the training set holds them."""
        if self.source == "digits":
            d = self._digits
            return ArrayImageDataset(d["images"][d["train"]], d["targets"][d["train"]])
        if self.source == "synthetic":
            return self._synthetic()[0]
        if self.source in ("cifar10", "cifar100"):
            return self._cifar(True, None)
        if self.source == "hfds":
            return self._hf.dataset("train", None, self._folder_mode())
        f = self._folder
        return ImageFolderDataset(f["train"], f["classes"], f["mode"], None, self.hparams.max_bad_fraction)

    def _cifar(self, train: bool, transform):
        return open_cifar(self.source, self.root, train, transform, self.hparams.download)

    def train_transform(self) -> T.Compose:
        from .transforms import build_train_transform

        hp = self.hparams
        return build_train_transform(img_size=self.img_size, crop=hp.crop, hflip=hp.hflip, auto_augment=hp.auto_augment,
                                     re_prob=hp.re_prob, mean=self.mean, std=self.std, crop_pct=hp.crop_pct,
                                     interpolation=hp.interpolation)

    def eval_transform(self) -> T.Compose:
        from .transforms import build_eval_transform

        return build_eval_transform(self.eval_spec)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._adopt_pretrained_input()
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
        elif self.source == "hfds":
            mode = self._folder_mode()
            self.train_set, self.val_set = self._hf.dataset("train", train_tf, mode), self._hf.dataset("val", eval_tf, mode)
            self.test_set = self.val_set if self._hf.test == self._hf.val else self._hf.dataset("test", eval_tf, mode)
        elif self.source in ("cifar10", "cifar100"):
            self.train_set, self.val_set = self._cifar(True, train_tf), self._cifar(False, eval_tf)
            self.test_set = self.val_set
        else:
            self.train_set, self.val_set = self._synthetic()
            self.test_set = self.val_set
        self.train_set = self._with_unlabeled(self.train_set, train_tf)
        if hp.drop_last and len(self.train_set) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} training images and "
                f"drop_last would leave no batch; lower data.batch_size or set data.drop_last false"
            )
        sampler = self.train_sampler()  # refuses data too small for repeated augmentation
        if sampler is not None and hp.drop_last and len(sampler) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(sampler)} images one process draws per "
                f"epoch with data.repeated_aug={hp.repeated_aug}; lower data.batch_size or set data.repeated_aug 0"
            )
        if hp.mixup > 0 or hp.cutmix > 0:
            from timm.data import Mixup

            # Label smoothing belongs to the loss (DistillationLoss / TeacherModule), not here. With
            # unlabelled images, "unlabelled" is one more class to timm (`UnlabeledMixup`).
            self.mixup_fn = Mixup(
                mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob,
                switch_prob=hp.mixup_switch_prob, label_smoothing=0.0,
                num_classes=self.num_classes + (1 if self.num_unlabeled else 0),
            )
            if self.num_unlabeled:
                from .unlabeled import UnlabeledMixup

                self.mixup_fn = UnlabeledMixup(self.mixup_fn, self.num_classes)

    @property
    def num_unlabeled(self) -> int:
        """Training images without a label (-1) in the training set as set up: held back by
        data.labels_per_class or added by data.unlabeled_root; 0 for a model that does not read them."""
        ds = self.train_set
        return len(ds) - ds.num_labeled if ds is not None and hasattr(ds, "num_labeled") else 0

    def _reads_unlabeled(self) -> bool:
        """Whether the model being trained learns from unlabelled images: a LightningModule says so with
        `reads_unlabeled` (the student: when its loss has a teacher term); one that does not say, like the
        teacher, gets the labelled images alone. Without a trainer (set up by hand): yes."""
        if self.trainer is None:
            return True
        return bool(getattr(self.trainer.lightning_module, "reads_unlabeled", False))

    def _with_unlabeled(self, labeled: Dataset, transform) -> Dataset:
        """The training set with data.labels_per_class and data.unlabeled_root (or, for hfds, its training
        rows without a label and data.unlabeled_split) applied (`distill.data.unlabeled`): the labelled
        images then the unlabelled ones (label -1) for a model that reads them, else the labelled images
        alone."""
        hp = self.hparams
        keep, root, split = self._labels_kept, hp.get("unlabeled_root"), hp.get("unlabeled_split")
        if keep is None and root is None and split is None:
            if hp.get("labeled_fraction") is not None:  # hfds data whose training rows all have labels
                raise ValueError(f"data.labeled_fraction needs unlabelled images, and every row of split "
                                 f"{self._hf.train!r} has a label: set data.unlabeled_split, data.unlabeled_root or "
                                 f"data.labels_per_class, or remove data.labeled_fraction")
            return labeled
        from .unlabeled import UnlabeledImages, WithUnlabeled

        if not self._reads_unlabeled():
            unlabeled_rows = int((np.asarray(labeled.targets) < 0).sum())  # hfds rows without a label
            held = int((~keep).sum()) - unlabeled_rows if keep is not None else 0
            left = ([f"{held:,} held back by data.labels_per_class"] if held else []) + \
                   ([f"{unlabeled_rows:,} training rows without a label"] if unlabeled_rows else []) + \
                   ([f"the images of data.unlabeled_root"] if root else []) + \
                   ([f"the images of data.unlabeled_split {split!r}"] if split else [])
            log.info("data: training on the %s labelled images alone (%s): this model learns from labels only",
                     f"{int(keep.sum()) if keep is not None else len(labeled):,}", " and ".join(left))
            return WithUnlabeled(labeled, None, keep, labeled_only=True) if keep is not None else labeled
        folder = UnlabeledImages(root, self._folder_mode(), transform, hp.max_bad_fraction) if root else None
        if folder is not None:
            self._refuse_held_out_duplicates(folder)
        if self.source == "hfds":
            from .hf_datasets import refuse_held_out_duplicates

            folder = self._hf.dataset("unlabeled", transform, self._folder_mode()) if split else folder
            refuse_held_out_duplicates(labeled, folder, list({id(d): d for d in (self.val_set, self.test_set)}.values()))
        ds = WithUnlabeled(labeled, folder, keep)
        log.info("data: %s labelled + %s unlabelled training images (label -1)", f"{ds.num_labeled:,}",
                 f"{len(ds) - ds.num_labeled:,}")
        return ds

    def _folder_mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    def _refuse_held_out_duplicates(self, folder) -> None:
        from .unlabeled import held_out_duplicates

        found = []
        for held_out in {id(d): d for d in (self.val_set, self.test_set) if d is not None}.values():
            found += held_out_duplicates(folder, held_out)
        if found:
            path, dup = found[0]
            raise ValueError(f"data.unlabeled_root: {len(found)} of {len(folder):,} unlabelled images are validation/test "
                             f"images too (e.g. {path} is {dup}); remove them from the folder: the student would learn "
                             f"the held-out images through its teacher and every score would be inflated")

    def _adopt_pretrained_input(self) -> None:
        """mean/std/img_size of the model's pretrained weights, for those fields the recipe left unset.
        Lightning sets up the datamodule before the LightningModule, so the datamodule asks the module
        (`pretrained_input(in_chans)`, None without pretrained weights) before building transforms."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        ask = getattr(module, "pretrained_input", None)
        cfg = ask(self.in_chans) if callable(ask) else None
        if not cfg:
            return
        self._check_recorded_normalisation(cfg)
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            self._mean = list(cfg["mean"]) if self._mean is None else self._mean
            self._std = list(cfg["std"]) if self._std is None else self._std
        self.img_size = self.img_size if self._img_size_given else int(cfg["img_size"])
        log.info("input as the pretrained weights expect: mean %s, std %s, %d px", self.mean, self.std, self.img_size)

    def _check_recorded_normalisation(self, cfg: dict[str, Any]) -> None:
        """Weights whose file records no input normalisation (`distill.models.pretrained.input_config`):
        another library's file (renamed or paired by order) needs data.mean/std from the recipe; a file in
        timm's names gets timm's pretrained_cfg of the named model, said in one line."""
        if cfg.get("recorded", True):
            return
        given = self._mean is not None and self._std is not None
        where = f"{cfg.get('field', 'pretrained')}: {cfg.get('source')}"
        if given:
            log.warning("%s records no input normalisation; using data.mean %s and data.std %s of the recipe",
                        where, list(self._mean), list(self._std))
        elif cfg.get("foreign"):
            raise ValueError(f"{where} records no input normalisation and comes from another library (renamed or "
                             f"paired by order), so nothing here knows it; set data.mean and data.std to what the "
                             f"weights were trained with (e.g. [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225] for "
                             f"ImageNet statistics, [0.5, 0.5, 0.5] / [0.5, 0.5, 0.5] for TensorFlow's [-1, 1])")
        elif cfg.get("mean") is not None:
            log.warning("%s records no input normalisation; assuming timm's pretrained_cfg of the named model "
                        "(mean %s, std %s): set data.mean and data.std if the weights were trained otherwise",
                        where, [round(v, 4) for v in cfg["mean"]], [round(v, 4) for v in cfg["std"]])

    # ------------------------------------------------------------------------------- dataloaders
    def train_sampler(self):
        """DeiT's repeated-augmentation sampler for this process (`distill.data.samplers`), or None when
        data.repeated_aug is off or there is one process (the loader then shuffles, and Lightning shards
        it under DDP). DeiT repeats augmentations only when distributed and shuffles plainly otherwise
        (its main.py): on one process the copies of an image would share a batch and an epoch would
        see 1 / repeated_aug of the images."""
        hp = self.hparams
        if hp.repeated_aug <= 1:
            return None
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if world == 1:
            if not getattr(self, "_noted_one_process", False):
                self._noted_one_process = True
                log.warning("data.repeated_aug=%d is off on one process, as in DeiT (it repeats augmentations across "
                         "processes only): a plain shuffle of every training image each epoch", hp.repeated_aug)
            return None
        from .samplers import RepeatedAugSampler

        return RepeatedAugSampler(self.train_set, num_replicas=world, rank=rank, repeats=hp.repeated_aug, seed=hp.seed)

    def labeled_share(self):
        """The `distill.data.samplers.LabeledShare` of data.labeled_fraction for the training set as set
        up, or None (no share asked for, or no unlabelled image in it: e.g. a teacher's)."""
        fraction = self.hparams.get("labeled_fraction")
        if fraction is None or not self.num_unlabeled:
            return None
        from .samplers import LabeledShare

        return LabeledShare(np.asarray(self.train_set.targets) >= 0, self.batch_size, fraction, self.hparams.seed)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        workers = self.num_workers
        sampler = self.train_sampler() if train else None
        trainer = self.trainer
        share = self.labeled_share() if train else None
        if share is not None:
            from .samplers import LabeledShareSampler

            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = LabeledShareSampler(ds, share, num_replicas=world, rank=rank)
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
            from .device_loader import device_loader

            return device_loader(self, "train")
        if self.hparams.keyed_views:
            from .keyed_views import keyed_train_loader

            return keyed_train_loader(self)
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.hparams.on_device:
            from .device_loader import device_loader

            return device_loader(self, "val")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.hparams.on_device:
            from .device_loader import device_loader

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
