"""Repeated augmentation (Hoffer et al. 2020; DeiT's `RASampler`, facebookresearch/deit samplers.py).

Each epoch, every training index is repeated `repeats` times in a row of a seeded permutation, and the
ranks take every `world`-th entry, so the copies of one image (augmented independently by the data
loader) land on different ranks. DeiT then keeps only `floor(len // 256 * 256 / world)` indices per
rank: an epoch is as long as without repetition (rounded down to a multiple of 256 images), so
repeated augmentation trades distinct images per epoch for augmented copies at the same cost.

It is a `DistributedSampler`, which Lightning keeps as it is under DDP (instead of putting its own in)
and calls `set_epoch` on at every epoch, on one device too. The order of epoch `e` is seeded with
`seed + e` (DeiT: `e` alone, i.e. seed 0).
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, DistributedSampler

ROUND = 256  # DeiT rounds the epoch down to a multiple of 256 images


def repeated_aug_epoch_length(num_samples: int, world_size: int) -> int:
    """Indices one rank draws per epoch, DeiT's `floor(len // 256 * 256 / world)`."""
    return int(math.floor(num_samples // ROUND * ROUND / world_size))


class RepeatedAugSampler(DistributedSampler):
    """DeiT's RASampler with `repeats` copies (DeiT: 3), as a DistributedSampler.

    Args:
        dataset: the training set.
        num_replicas: number of processes (world size); 1 on one device.
        rank: this process's rank.
        repeats: copies of each index per epoch (>= 2).
        shuffle: permute the indices each epoch (seeded by seed + epoch); False keeps 0..N-1.
        seed: base seed of the permutations; must be equal on every rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, repeats: int = 3,
                 shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        if repeats < 2:
            raise ValueError(f"data.repeated_aug={repeats}: repeated augmentation needs at least 2 copies (DeiT: 3); "
                             f"use 0 to turn it off")
        n = len(dataset)
        self.repeats = int(repeats)
        self.num_samples = int(math.ceil(n * self.repeats / self.num_replicas))  # per rank, before selection
        self.total_size = self.num_samples * self.num_replicas
        self.num_selected = repeated_aug_epoch_length(n, self.num_replicas)
        if self.num_selected < 1:
            raise ValueError(f"data.repeated_aug={repeats}: {n} training images on {self.num_replicas} process(es) "
                             f"give empty epochs (DeiT's sampler rounds an epoch down to a multiple of {ROUND} "
                             f"images); use at least {ROUND} images or data.repeated_aug 0")

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        indices = torch.repeat_interleave(order, self.repeats).tolist()
        indices += indices[: self.total_size - len(indices)]  # evenly divisible by the world size
        mine = indices[self.rank:self.total_size:self.num_replicas]
        return iter(mine[: self.num_selected])

    def __len__(self) -> int:
        return self.num_selected


class LabeledShare:
    """`data.labeled_fraction`: the order of an epoch in which every batch holds `round(fraction * batch)`
    labelled images (at least 1, at most batch - 1) and unlabelled ones for the rest, shuffled within the
    batch (so that mixup, which pairs image i with image B-1-i, pairs labelled images with each other too).

    An epoch is as long as a plain one: `len // (batch * world)` batches per process. Each kind is drawn
    from its own stream of seeded permutations (a new one each time it runs out), so with a share above
    the data's the labelled images come several times an epoch and only part of the unlabelled ones do;
    a new epoch draws anew. The order depends on `(seed, epoch)` alone: a resumed epoch replays it, and
    the processes of a DDP run take every `world`-th batch of one global order.

    Args:
        labeled: bool mask over the training set (True: has a label).
        batch_size: samples per batch and process.
        fraction: the labelled share of a batch, in (0, 1).
        seed: seed of every epoch's order.
    """

    def __init__(self, labeled, batch_size: int, fraction: float, seed: int) -> None:
        import numpy as np

        self.labeled = np.flatnonzero(np.asarray(labeled, dtype=bool))
        self.unlabeled = np.flatnonzero(~np.asarray(labeled, dtype=bool))
        self.n, self.batch_size, self.seed = len(labeled), int(batch_size), int(seed)
        self.k = min(max(int(round(float(fraction) * self.batch_size)), 1), self.batch_size - 1)
        if not len(self.labeled) or not len(self.unlabeled) or self.batch_size < 2:
            raise ValueError(f"data.labeled_fraction={fraction} needs labelled and unlabelled training images and "
                             f"batches of at least 2; this training set has {len(self.labeled)} labelled and "
                             f"{len(self.unlabeled)} unlabelled images, batches of {self.batch_size}")

    def batches(self, world: int = 1) -> int:
        """Batches per process and epoch."""
        return self.n // (self.batch_size * world)

    def order(self, epoch: int, rank: int = 0, world: int = 1):
        """This process's indices of epoch `epoch`, batch after batch (batches(world) * batch_size of them)."""
        import numpy as np

        total = self.batches(world) * world
        rng = np.random.default_rng([self.seed, int(epoch), 0x1ABE1])

        def stream(pool, count: int):
            rounds = -(-count // len(pool)) if count else 0
            return np.concatenate([rng.permutation(pool) for _ in range(rounds)] or [pool[:0]])[:count]

        labeled = stream(self.labeled, total * self.k).reshape(total, self.k)
        unlabeled = stream(self.unlabeled, total * (self.batch_size - self.k)).reshape(total, self.batch_size - self.k)
        order = rng.permuted(np.concatenate([labeled, unlabeled], axis=1), axis=1)
        return order[rank::world].reshape(-1)


class LabeledShareSampler(DistributedSampler):
    """The host loader's sampler for `LabeledShare`: a DistributedSampler (Lightning keeps it under DDP
    and calls `set_epoch` every epoch) yielding this process's order of the epoch."""

    def __init__(self, dataset: Dataset, share: LabeledShare, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=share.seed, drop_last=True)
        self.share = share

    def __iter__(self):
        return iter(self.share.order(self.epoch, self.rank, self.num_replicas).tolist())

    def __len__(self) -> int:
        return self.share.batches(self.num_replicas) * self.share.batch_size
