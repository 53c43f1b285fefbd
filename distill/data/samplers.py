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
