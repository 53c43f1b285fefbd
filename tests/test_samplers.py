"""Repeated augmentation: DeiT's RASampler semantics (facebookresearch/deit samplers.py) as a
DistributedSampler, on one device and as Lightning keeps it under DDP."""
from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from distill import ImageDataModule
from distill.data.samplers import RepeatedAugSampler


class Sized(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i


def epoch(n: int, world: int, ep: int, repeats: int = 3, seed: int = 0) -> list[list[int]]:
    """The indices every rank draws in epoch `ep`."""
    out = []
    for rank in range(world):
        s = RepeatedAugSampler(Sized(n), num_replicas=world, rank=rank, repeats=repeats, seed=seed)
        s.set_epoch(ep)
        out.append(list(s))
    return out


def deit_rasampler(n: int, world: int, rank: int, ep: int) -> list[int]:
    """deit/samplers.py RASampler.__iter__ (3 repeats, seeded by the epoch), written out as a reference."""
    num_samples = int(math.ceil(n * 3.0 / world))
    total = num_samples * world
    g = torch.Generator()
    g.manual_seed(ep)
    indices = torch.randperm(n, generator=g).tolist()
    indices = [e for e in indices for _ in range(3)]
    indices += indices[: total - len(indices)]
    return indices[rank:total:world][: int(math.floor(n // 256 * 256 / world))]


@pytest.mark.parametrize("n, world", [(1000, 1), (1000, 2), (1281, 8), (50000, 4), (513, 3)])
def test_epoch_length_per_rank_is_deits(n, world):
    ranks = epoch(n, world, 0)
    expected = math.floor(n // 256 * 256 / world)
    assert [len(r) for r in ranks] == [expected] * world
    s = RepeatedAugSampler(Sized(n), num_replicas=world, rank=0)
    assert len(s) == expected


@pytest.mark.parametrize("n, world", [(700, 2), (1000, 3)])
def test_same_indices_as_deits_rasampler_at_seed_zero(n, world):
    for ep in (0, 1, 5):
        assert epoch(n, world, ep) == [deit_rasampler(n, world, r, ep) for r in range(world)]


def test_copies_of_each_sample_land_on_both_ranks():
    r0, r1 = epoch(1024, 2, 3)
    c0, c1, both = Counter(r0), Counter(r1), Counter(r0 + r1)
    repeated = [i for i, c in both.items() if c >= 2]
    assert len(repeated) > 300  # 1024 drawn indices hold ~341 images 3 times
    assert max(both.values()) == 3
    for i in repeated:  # consecutive copies alternate ranks: never all on one
        assert c0[i] >= 1 and c1[i] >= 1, i


def test_epochs_differ_and_an_epoch_replays():
    a, b, a_again = epoch(600, 2, 0), epoch(600, 2, 1), epoch(600, 2, 0)
    assert a == a_again
    assert a != b
    assert epoch(600, 2, 0, seed=1) != a  # seed + epoch


def test_too_small_for_deits_rounding_is_a_one_line_error():
    with pytest.raises(ValueError, match="data.repeated_aug=3: 255 training images.*at least 256 images"):
        RepeatedAugSampler(Sized(255), num_replicas=2, rank=0)
    dm = ImageDataModule("synthetic", num_samples=300, repeated_aug=3)  # 240 for training
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, lightning_module=None)  # two processes
    with pytest.raises(ValueError, match="at least 256 images"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="at least 2 copies"):
        RepeatedAugSampler(Sized(400), repeats=1)


@pytest.mark.parametrize("other", [dict(keyed_views=True), dict(on_device=True)])
def test_refused_with_keyed_views_and_on_device(other):
    with pytest.raises(ValueError, match=f"data.repeated_aug=3 does not work with data.{next(iter(other))}"):
        ImageDataModule("digits", repeated_aug=3, **other)


def test_lightning_sets_the_epoch_of_the_sampler(trainer_factory, tiny_teacher_kwargs):
    """A fit calls set_epoch on the datamodule's sampler every epoch (as it does under DDP, where the
    datamodule builds it; here the sampler of rank 0 of two processes is handed in on one device)."""
    from distill import TeacherModule

    dm = ImageDataModule("digits", img_size=8, batch_size=64, repeated_aug=3)
    dm.setup("fit")
    epochs = []

    class Spy(RepeatedAugSampler):
        def __iter__(self):
            epochs.append(self.epoch)
            return super().__iter__()

    dm.train_sampler = lambda: Spy(dm.train_set, num_replicas=2, rank=0, repeats=3)
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 1437 // 256 * 256 // 2 and len(loader) == 640 // 64
    L.seed_everything(0)
    trainer = trainer_factory(max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(TeacherModule(**tiny_teacher_kwargs), dm)
    assert epochs == [0, 1, 2]


def test_lightning_keeps_it_under_ddp(tmp_path):
    """Lightning replaces a loader's sampler under DDP unless it is a DistributedSampler: ask its own
    data connector what it does with ours (a 2-process CPU trainer, not started)."""
    from lightning.pytorch.trainer.states import RunningStage

    dm = ImageDataModule("digits", img_size=8, batch_size=32, repeated_aug=3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=str(tmp_path))
    assert trainer._accelerator_connector.is_distributed
    dm.trainer = trainer  # world 2, rank 0 (not launched)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RepeatedAugSampler) and isinstance(loader.sampler, DistributedSampler)
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared.sampler is loader.sampler


@pytest.mark.slow
def test_two_process_ddp_run_draws_deits_epoch_length(tmp_path):
    """A real 2-process DDP fit (gloo, CPU): 1,437 digits -> 1437 // 256 * 256 / 2 = 640 images per process,
    20 steps of 32 per epoch (Lightning's own sampler would give ceil(1437 / 2) / 32 -> 22)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    root = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "distill.cli", "fit", "--config", str(repo / "recipes/digits/teacher.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--model.init_args.model", "cifar_resnet10",
         "--model.init_args.model_kwargs", '{"base_width": 8}', "--data.batch_size", "32",
         "--data.repeated_aug", "3", "--trainer.default_root_dir", str(root)],
        capture_output=True, text=True, env=env, timeout=600, cwd=repo)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 20


def test_on_one_device_an_epoch_is_a_plain_shuffle_of_every_image_once(trainer_factory, caplog):
    """DeiT repeats augmentations only when distributed (main.py: RASampler under --dist, RandomSampler
    otherwise): on one device the 3 copies of an image would share a batch and an epoch would see a
    third of the images."""
    import logging

    dm = ImageDataModule("digits", img_size=8, batch_size=64, repeated_aug=3, drop_last=False)
    dm.trainer = trainer_factory()  # one CPU device
    with caplog.at_level(logging.INFO, logger="distill"):
        dm.setup("fit")
        loader = dm.train_dataloader()
    seen = [i for batch in loader.batch_sampler for i in batch]
    assert sorted(seen) == list(range(len(dm.train_set)))  # 1,437 distinct images, each once
    assert seen != sorted(seen)  # shuffled
    notes = [r.getMessage() for r in caplog.records if "repeated_aug" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "one process" in notes[0]
