"""On-device data for small datasets (CIFAR-size): decode once, keep every image as uint8 on the
accelerator, and cut batches there.

A CIFAR-10 epoch on a DeiT-tiny student at 32px takes about a second of GPU time, less than the host
needs to decode and augment 50,000 PIL images with a few workers. Here the whole training set lives
on the device as one `(N, C, H, W)` uint8 tensor (150 MB for CIFAR-10) and each batch is a gather,
a padded random crop, a flip, optional random erasing and the normalisation, all batched tensor ops.
Mixup/cutmix stay where they are for host data (`ImageDataModule.on_after_batch_transfer`, already on
the device), or `mixup_fn` here for standalone use.

Every random choice is a hash of `(seed, view, sample index)` with `view = epoch % view_epochs` (or
the epoch), so a view can be replayed bit-identically: the teacher cache keys on it, and the result
does not depend on the batch a sample lands in or on the number of devices.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32-style) on int64 tensors holding values < 2**32; every product
    stays below 2**63, so nothing overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def key_hash(seed: int, view: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Deterministic 32-bit random integers, one per sample index, for (seed, view, stream)."""
    base = _mix(torch.tensor([(seed * 0x9E3779B1 + view * 0x85EBCA6B + stream * 0xC2B2AE35) & _M32],
                             dtype=torch.int64, device=index.device))
    return _mix((index.to(torch.int64) & _M32) ^ base)


def _uniform(seed: int, view: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    return key_hash(seed, view, index, stream).to(torch.float64).div_(2.0**32).float()


def decode_uint8(dataset: Dataset, num_workers: int = 0, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of `dataset` as one uint8 `(N, C, H, W)` tensor and the labels `(N,)`.

    Fast paths for arrays already in memory (CIFAR's `.data`, digits' `.images`, synthetic `.x`, kept
    as float); otherwise the dataset's own transform must produce uint8 tensors (e.g. Resize +
    PILToTensor) and it is read once with a DataLoader."""
    targets = torch.as_tensor(np.asarray(getattr(dataset, "targets")), dtype=torch.long)
    for attr in ("data", "images"):
        arr = getattr(dataset, attr, None)
        if isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and getattr(dataset, "transform", None) is None:
            t = torch.from_numpy(np.ascontiguousarray(arr))
            t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
            return t.contiguous(), targets
    x = getattr(dataset, "x", None)
    if torch.is_tensor(x):
        return x, targets
    parts = [xb for xb, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)]
    return torch.cat(parts), targets


class DeviceImageLoader:
    """Batches `(x, y)` (or `(x, y, keys)` with `keyed=True`) cut from images held on `device`.

    Args:
        images: `(N, C, H, W)` uint8 images (or float tensors already normalised, e.g. synthetic data).
        targets: `(N,)` integer labels.
        batch_size: samples per batch and process.
        mean, std: per-channel normalisation of uint8 images (in [0, 1] units).
        train: augment and shuffle (per epoch); false = the images in order, only normalised.
        crop: `pad` (random crop after zero padding of `pad` pixels, the CIFAR recipe) or `none`.
        pad: padding of the `pad` crop; None = max(1, H // 8), as `ImageDataModule` does.
        hflip: probability of a horizontal flip.
        re_prob: random erasing probability (a box of 2-33% of the image, aspect 0.3-3.3, filled
            with per-pixel normal noise, as timm's `mode="pixel"`).
        seed: seed of the order and of every augmentation.
        view_epochs: epoch `e` uses view `e % view_epochs`; None = a new view every epoch.
        keyed: also yield host-side keys `(B, 2)` = (sample index, view) as an int64 numpy array.
        drop_last: drop the last incomplete batch (training); evaluation keeps it.
        rank, world_size: this process's share of every epoch (each a disjoint slice).
        device: where the images live; None = where `images` already are.
        mixup_fn: optional `timm.data.Mixup` applied to each training batch (standalone use only:
            `ImageDataModule` mixes in `on_after_batch_transfer`).
        out_dtype: dtype of the yielded images (float32; bfloat16 halves the memory traffic).
        share: a `distill.data.samplers.LabeledShare` (training): every batch holds its labelled share.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        batch_size: int,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        *,
        train: bool = True,
        crop: Literal["pad", "none"] = "pad",
        pad: int | None = None,
        hflip: float = 0.5,
        re_prob: float = 0.0,
        seed: int = 0,
        view_epochs: int | None = None,
        keyed: bool = False,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        mixup_fn: Any = None,
        out_dtype: torch.dtype = torch.float32,
        share: Any = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"DeviceImageLoader: images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if crop not in ("pad", "none"):
            raise ValueError(f"DeviceImageLoader: crop={crop!r} is not supported on the device; use pad or none")
        device = torch.device(device) if device is not None else images.device
        self.images = images.to(device)
        self.targets_dev = torch.as_tensor(targets, dtype=torch.long).to(device)
        self.targets = self.targets_dev.cpu().numpy()
        self.n, c, self.h, self.w = self.images.shape
        self.batch_size, self.train, self.crop, self.hflip, self.re_prob = int(batch_size), train, crop, hflip, re_prob
        self.pad = (max(1, self.h // 8) if pad is None else int(pad)) if crop == "pad" else 0
        self.seed, self.view_epochs, self.keyed = int(seed), view_epochs, keyed
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.mixup_fn, self.out_dtype, self.epoch = mixup_fn, out_dtype, 0
        self.share = share if train else None
        self.uint8 = self.images.dtype == torch.uint8
        mean_t = torch.tensor(list(mean) * (c // len(mean) if len(mean) == 1 else 1), dtype=torch.float32)
        std_t = torch.tensor(list(std) * (c // len(std) if len(std) == 1 else 1), dtype=torch.float32)
        # x_normalised = x_uint8 * scale + shift
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1).to(device)
        self.device = device
        self._rows = torch.arange(self.h, device=device)
        self._cols = torch.arange(self.w, device=device)
        if len(self.targets) != self.n:
            raise ValueError(f"DeviceImageLoader: {self.n} images but {len(self.targets)} targets")

    # -------------------------------------------------------------------------------- epoch plan
    batch_sampler = None  # what Lightning inspects on a loader besides `sampler`

    @property
    def sampler(self) -> "DeviceImageLoader":  # Lightning calls `loader.sampler.set_epoch(epoch)`
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view(self, epoch: int | None = None) -> int:
        e = self.epoch if epoch is None else epoch
        return e % self.view_epochs if self.view_epochs else e

    def _order(self) -> np.ndarray:
        if self.share is not None:
            return self.share.order(self.epoch, self.rank, self.world_size)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        if self.world_size > 1:
            order = order[: self.n - self.n % self.world_size] if self.train else order
            order = order[self.rank :: self.world_size]
        return order

    def _per_rank(self) -> int:
        if self.share is not None:
            return self.share.batches(self.world_size) * self.batch_size
        if self.world_size == 1:
            return self.n
        return self.n // self.world_size if self.train else len(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple]:
        order = self._order()
        order_dev = torch.from_numpy(order).to(self.device, non_blocking=True)
        view = self.view()
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order_dev[sl]
            x, y = self.batch(idx, view)
            if self.mixup_fn is not None and self.train and x.shape[0] % 2 == 0:
                x, y = self.mixup_fn(x, y)
            if self.keyed:
                keys = np.stack([order[sl], np.full(len(order[sl]), view)], axis=1).astype(np.int64)
                yield x, y, keys
            else:
                yield x, y

    def view_batches(self, views, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        """(x, y, keys) for the given views (a count: every view < `views`; or the view ids) of the samples
        `i % world_size == rank`, in order: exactly the images training draws (for a teacher cache)."""
        bs = batch_size or self.batch_size
        mine = np.arange(rank, self.n, world_size)
        for v in (range(views) if isinstance(views, int) else views):
            for s in range(0, len(mine), bs):
                idx = mine[s : s + bs]
                x, y = self.batch(torch.from_numpy(idx).to(self.device), v)
                yield x, y, np.stack([idx, np.full(len(idx), v)], axis=1).astype(np.int64)

    # ------------------------------------------------------------------------------ augmentation
    def batch(self, idx: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `idx` (a device index tensor) of view `view`, augmented (train) and normalised."""
        x = self.images[idx]
        if self.train:
            if self.crop == "pad":
                x = self._pad_crop(x, idx, view)
            if self.hflip > 0:
                flip = _uniform(self.seed, view, idx, 3) < self.hflip
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = x.float() * self.scale + self.shift if self.uint8 else x.float()
        if self.train and self.re_prob > 0:
            x = self._erase(x, idx, view)
        return x.to(self.out_dtype), self.targets_dev[idx]

    def _pad_crop(self, x: torch.Tensor, idx: torch.Tensor, view: int) -> torch.Tensor:
        p = self.pad
        span = 2 * p + 1
        oy = key_hash(self.seed, view, idx, 1) % span
        ox = key_hash(self.seed, view, idx, 2) % span
        xp = F.pad(x, (p, p, p, p))
        rows = (oy[:, None] + self._rows)[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + self._cols)[:, None, :]  # (B, 1, W)
        b = torch.arange(x.shape[0], device=x.device)[:, None, None]
        return xp.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)  # gather (B, H, W, C) -> NCHW

    def _erase(self, x: torch.Tensor, idx: torch.Tensor, view: int) -> torch.Tensor:
        B, C, H, W = x.shape
        u = [_uniform(self.seed, view, idx, s) for s in range(4, 9)]
        on = u[0] < self.re_prob
        area = (0.02 + u[1] * (1 / 3 - 0.02)) * H * W
        log_r = math.log(0.3) + u[2] * (math.log(1 / 0.3) - math.log(0.3))
        h = (area * log_r.exp()).sqrt().round().clamp(1, H).long()
        w = (area / log_r.exp()).sqrt().round().clamp(1, W).long()
        top = (u[3] * (H - h + 1).float()).long()
        left = (u[4] * (W - w + 1).float()).long()
        r, c = self._rows.view(1, H, 1), self._cols.view(1, 1, W)
        box = (r >= top.view(B, 1, 1)) & (r < (top + h).view(B, 1, 1)) & (c >= left.view(B, 1, 1)) & (c < (left + w).view(B, 1, 1))
        box = (box & on.view(B, 1, 1))[:, None]
        # per-pixel normal noise from the key hash (Box-Muller), so erasing replays bit-identically
        pix = torch.arange(C * H * W, device=x.device).view(1, C, H, W)
        key = (idx.view(B, 1, 1, 1).to(torch.int64) * (C * H * W) + pix)
        u1 = (_uniform(self.seed, view, key, 9) + 1e-7).clamp(max=1.0)
        u2 = _uniform(self.seed, view, key, 10)
        noise = (-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)
        return torch.where(box, noise.to(x.dtype), x)

    def describe(self) -> str:
        """What determines the views, for the teacher cache manifest."""
        return (f"DeviceImageLoader(crop={self.crop}, pad={self.pad}, hflip={self.hflip}, re_prob={self.re_prob}, "
                f"size={self.h}x{self.w}, scale={[round(v, 6) for v in self.scale.flatten().tolist()]}, "
                f"shift={[round(v, 6) for v in self.shift.flatten().tolist()]})")


# --------------------------------------------------------------------------------- ImageDataModule
def device_loader(dm, split: Literal["train", "val", "test"]) -> DeviceImageLoader:
    """The on-device loader of an `ImageDataModule` with `on_device: true` (decoded once, cached)."""
    hp = dm.hparams
    if split == "train" and (hp.crop == "rrc" or hp.auto_augment):
        raise ValueError("data.on_device supports crop: pad or none, hflip, re_prob and mixup/cutmix; "
                         "crop: rrc and auto_augment need the host pipeline (on_device: false)")
    trainer = getattr(dm, "trainer", None)
    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    cache = dm.__dict__.setdefault("_device_decoded", {})
    ds = dm.train_set if split == "train" else (dm.val_set if split == "val" else dm.test_set)
    if (id(ds), str(device)) not in cache:  # decode once, without augmentation, at the model's size
        raw = ds if torch.is_tensor(getattr(ds, "x", None)) else _untransformed(ds, dm.img_size)
        images, targets = decode_uint8(raw, num_workers=dm.num_workers)
        cache[(id(ds), str(device))] = images.to(device), targets.to(device)
    images, targets = cache[(id(ds), str(device))]
    train = split == "train"
    loader = DeviceImageLoader(
        images, targets, dm.batch_size, dm.mean, dm.std, train=train,
        crop=hp.crop if train else "none", hflip=hp.hflip if train else 0.0, re_prob=hp.re_prob if train else 0.0,
        seed=hp.seed, view_epochs=hp.get("view_epochs"), keyed=train and bool(hp.get("keyed_views")),
        drop_last=train and hp.drop_last, rank=rank, world_size=world, device=device,
        share=dm.labeled_share() if train else None,
    )
    if train:
        dm._device_train = loader
    return loader


def _untransformed(ds: Dataset, img_size: int) -> Dataset:
    """A shallow copy of `ds` that yields uint8 tensors at `img_size` (the decode pass), leaving `ds`
    untouched: no transform at all when its in-memory uint8 array already has that size."""
    import copy

    from torchvision import transforms as T

    raw = copy.copy(ds)
    arr = next((getattr(raw, a) for a in ("data", "images") if isinstance(getattr(raw, a, None), np.ndarray)), None)
    if arr is not None and arr.dtype == np.uint8 and arr.shape[1] == arr.shape[2] == img_size:
        raw.transform = None
    else:
        # what evaluation sees at crop_pct 1.0: the shorter side resized, the centre square kept (no stretching)
        raw.transform = T.Compose([T.Resize(img_size, antialias=True), T.CenterCrop(img_size), T.PILToTensor()])
    return raw
