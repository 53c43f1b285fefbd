"""Keyed augmented views: every training sample's augmentation is drawn from an RNG seeded by
`(seed, view, index)`, so view `v` of sample `i` replays bit-identically, whatever the worker count,
batch or device it lands in. The teacher-output cache keys its stored outputs on these views (the idea
of FKD, Shen & Xing 2022); an interrupted run can also replay the rest of an epoch exactly.

`data.keyed_views: true` makes `ImageDataModule` serve training batches `(x, y, keys)` through
`keyed_train_loader`; epoch `e` trains on view `e % view_epochs` (or a new view per epoch).

Exact resume in the middle of an epoch: a sample's pixels depend only on `(seed, view, index)` and
the epoch's order only on `(seed, epoch)`, so the position in the epoch (how many batches were
trained) is all a checkpoint needs. `KeyedLoader` hands it to Lightning (which stores `state_dict()`
of stateful training loaders in the fit loop's checkpoint state and calls `load_state_dict()` when it
restarts mid-epoch), and `ViewKeySampler` then replays the epoch's order, skipping what was trained.
This holds for any `num_workers`: no augmentation draws from a worker's own RNG.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def view_seed(seed: int, view: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{view}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's CPU generator for one sample, then restore them, so training
    randomness elsewhere (mixup, dropout) is untouched when workers are off."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class KeyedViews(Dataset):
    """Wraps a map-style dataset with a random transform so that view `v` of sample `i` is drawn from
    an RNG seeded by `(seed, v, i)`: replaying it gives the same bytes, whatever the worker count.

    Indexed by `key = v * len(dataset) + i` (what `ViewKeySampler` yields); returns `(x, y, [i, v])`.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)
        self.n = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int):
        view, i = divmod(int(key), self.n)
        with seeded_rngs(view_seed(self.seed, view, i)):
            x, y = self.dataset[i]
        return x, y, np.array([i, view], dtype=np.int64)


def collate_keyed(samples: list) -> tuple:
    """default_collate for (x, y) and a host-side int64 numpy array of keys (B, 2): numpy arrays are
    not moved to the GPU by Lightning, so looking keys up never waits for the device."""
    from torch.utils.data import default_collate

    x, y = default_collate([(s[0], s[1]) for s in samples])
    return x, y, np.stack([s[2] for s in samples])


class ViewKeySampler(DistributedSampler):
    """A DistributedSampler (so Lightning neither replaces it nor forgets `set_epoch`) that yields
    `view * N + i`, with `view = epoch % view_epochs` (or the epoch itself when view_epochs is None).

    The order of an epoch depends only on `(seed, epoch)` (never on the global RNG, hence not on the
    rank's seed either), so `skip_once(epoch, k)` can replay an interrupted epoch without its first
    `k` samples of this rank's share."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, view_epochs: int | None = None, share=None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.view_epochs = view_epochs
        self.share = share  # a distill.data.samplers.LabeledShare: batches with a fixed labelled share
        self._skip: tuple[int, int] | None = None  # (epoch, samples) for the next pass over that epoch

    def view(self) -> int:
        return self.epoch % self.view_epochs if self.view_epochs else self.epoch

    def skip_once(self, epoch: int, samples: int) -> None:
        """The next pass over `epoch` starts after its first `samples` indices (then the skip is spent)."""
        self._skip = (int(epoch), int(samples)) if samples > 0 else None

    def __iter__(self):
        n, v = len(self.dataset), self.view()  # type: ignore[arg-type]
        if self.share is not None:
            indices: Iterator[int] = iter(self.share.order(self.epoch, self.rank, self.num_replicas).tolist())
        else:
            indices = super().__iter__()
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = islice(indices, self._skip[1], None)
            self._skip = None
        return (v * n + int(i) for i in indices)

    def __len__(self) -> int:
        if self.share is not None:
            return self.share.batches(self.num_replicas) * self.share.batch_size
        return super().__len__()


class KeyedLoader(DataLoader):
    """The keyed training DataLoader, stateful for Lightning: `state_dict()` is the position in the
    epoch (`{"epoch", "batches"}` trained, read from the trainer through `position`), and
    `load_state_dict()` sets the sampler to that epoch and skips the batches already trained.

    The position comes from the trainer's own progress rather than from counting batches here: a
    fetcher or worker prefetch may have drawn batches that were never trained."""

    def __init__(self, *args: Any, position: Callable[[], tuple[int, int] | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        where = self.position() if self.position is not None else None
        return {} if where is None else {"epoch": int(where[0]), "batches": int(where[1])}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state:
            return
        self.sampler.set_epoch(state["epoch"])  # type: ignore[union-attr]
        self.sampler.skip_once(state["epoch"], state["batches"] * self.batch_size)  # type: ignore[union-attr]


def _trainer_position(dm) -> Callable[[], tuple[int, int] | None]:
    def position() -> tuple[int, int] | None:
        trainer = getattr(dm, "trainer", None)
        if trainer is None:
            return None
        # Batches of this epoch that went through the training step (`processed` is counted before the
        # batch-end hooks, where step checkpoints are written, and equals `completed` afterwards).
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    return position


def keyed_train_loader(dm, shuffle: bool = True) -> DataLoader:
    """The training DataLoader of an `ImageDataModule` with `keyed_views: true`: a `KeyedLoader`."""
    hp = dm.hparams
    trainer = getattr(dm, "trainer", None)
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    ds = KeyedViews(dm.train_set, hp.seed)
    sampler = ViewKeySampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=hp.seed,
                             view_epochs=hp.view_epochs, share=dm.labeled_share())
    if trainer is not None:
        # Lightning builds the iterator (with workers, they draw the first indices at once) before it
        # calls set_epoch, e.g. when it reloads the loaders every n epochs: start at the trainer's
        # epoch, not 0. (On a resume the loaders are built before the epoch is restored; ResumeState
        # rebuilds the iterator there.)
        sampler.set_epoch(trainer.current_epoch)
    return KeyedLoader(
        ds, batch_size=dm.batch_size, sampler=sampler, drop_last=hp.drop_last, num_workers=dm.num_workers,
        collate_fn=collate_keyed, pin_memory=hp.pin_memory and torch.cuda.is_available(),
        persistent_workers=hp.persistent_workers and dm.num_workers > 0, position=_trainer_position(dm),
    )
