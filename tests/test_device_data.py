"""On-device dataset: batches cut, augmented and normalised on the device (here the CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill import DistillModule, ImageDataModule
from distill.data.device_loader import DeviceImageLoader, decode_uint8

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def images(n: int = 32, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_eval_batches_are_the_normalised_images_in_order():
    x, y = images(20)
    loader = DeviceImageLoader(x, y, 8, MEAN, STD, train=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and batches[-1][0].shape == (4, 3, 8, 8)
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), normalise(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_train_epoch_is_a_permutation_with_pad_crop_and_flip():
    x, y = images(32)
    loader = DeviceImageLoader(x, y, 8, MEAN, STD, crop="pad", pad=2, hflip=0.5, keyed=True, seed=1)
    seen = []
    for xb, yb, keys in loader:
        assert xb.shape == (8, 3, 8, 8) and xb.dtype == torch.float32 and keys.shape == (8, 2)
        assert torch.equal(yb, y[torch.from_numpy(keys[:, 0])])
        seen += keys[:, 0].tolist()
        # each image is a shifted (and maybe flipped) window of the zero-padded original
        for img, i in zip(xb, keys[:, 0]):
            padded = torch.nn.functional.pad(normalise(x[i : i + 1]), (2, 2, 2, 2), value=0.0)
            padded[:, :, :2] = padded[:, :, -2:] = padded[:, :, :, :2] = padded[:, :, :, -2:] = normalise(
                torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
            windows = [padded[0, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
            assert any(torch.allclose(img, w, atol=1e-5) or torch.allclose(img, w.flip(2), atol=1e-5) for w in windows)
    assert sorted(seen) == list(range(32))
    loader.set_epoch(1)
    assert [k[:, 0].tolist() for _, _, k in loader] != [s for s in [seen[i : i + 8] for i in range(0, 32, 8)]]


def test_views_replay_bit_identically_whatever_the_batch():
    x, y = images(32)
    a = DeviceImageLoader(x, y, 8, MEAN, STD, hflip=0.5, re_prob=0.5, keyed=True, seed=4, view_epochs=2)
    b = DeviceImageLoader(x, y, 5, MEAN, STD, hflip=0.5, re_prob=0.5, keyed=True, seed=4, view_epochs=2)
    a.set_epoch(3)  # view 1
    first = {int(k[0]): img for xb, _, keys in a for img, k in zip(xb, keys)}
    replay = {int(k[0]): img for xb, _, keys in b.view_batches(2) for img, k in zip(xb, keys) if k[1] == 1}
    assert set(first) == set(replay) and all(torch.equal(first[i], replay[i]) for i in first)
    view0 = {int(k[0]): img for xb, _, keys in b.view_batches(1) for img, k in zip(xb, keys)}
    assert sum(not torch.equal(first[i], view0[i]) for i in first) > 16


def test_ranks_split_the_epoch():
    x, y = images(30)
    parts = [DeviceImageLoader(x, y, 4, MEAN, STD, keyed=True, rank=r, world_size=3) for r in range(3)]
    ids = [sorted(int(i) for _, _, k in p for i in k[:, 0]) for p in parts]
    assert all(len(i) == 8 for i in ids) and not set(ids[0]) & set(ids[1]) and not set(ids[1]) & set(ids[2])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_on_device_batches(kind):
    """timm's Mixup on the device loader's training batches, against the same batch unmixed: the targets
    are the one-hot labels of the batch and of the batch reversed, weighed lam and 1 - lam (0 < lam < 1),
    and the images the same mix (mixup: every pixel; cutmix: a box from the reversed batch covering 1 - lam
    of each image)."""
    import torch.nn.functional as F
    from timm.data import Mixup

    x, y = images(16)
    np.random.seed(0)  # timm draws lam (and the box) from NumPy's global RNG
    mix = Mixup(mixup_alpha=0.8 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0,
                num_classes=10, label_smoothing=0.0)
    xb, yb = next(iter(DeviceImageLoader(x, y, 8, MEAN, STD, mixup_fn=mix)))
    xu, yu = next(iter(DeviceImageLoader(x, y, 8, MEAN, STD)))  # the same batch (seeded order), unmixed
    one_hot = F.one_hot(yu, 10).float()
    i = int(torch.nonzero(yu != yu.flip(0))[0])  # a sample paired with another class
    lam = float(yb[i, yu[i]])
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(yb, lam * one_hot + (1 - lam) * one_hot.flip(0))
    if kind == "mixup":
        torch.testing.assert_close(xb, lam * xu + (1 - lam) * xu.flip(0), atol=1e-5, rtol=0)
    else:
        own, other = (xb == xu).all(0).all(0), (xb == xu.flip(0)).all(0).all(0)  # (H, W): where each pixel is from
        assert (own | other).all() and other.any()
        assert float(other.float().mean()) == pytest.approx(1 - lam)


def test_decode_uint8_fast_path_and_datamodule(trainer_factory):
    dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", hflip=0.5, on_device=True, mixup=0.5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceImageLoader) and loader.images.dtype == torch.uint8
    assert loader.images.shape == (len(dm.train_set), 1, 8, 8)
    imgs, targets = decode_uint8(dm.val_set.__class__(dm.val_set.images, dm.val_set.targets))
    assert torch.equal(imgs[:, 0], torch.from_numpy(dm.val_set.images)) and len(targets) == len(dm.val_set)
    module = DistillModule(student=dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0),
                           teacher=_teacher(), warmup_epochs=0)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/acc" in trainer.callback_metrics


def test_on_device_resizes_and_refuses_host_only_augmentation():
    dm = ImageDataModule("digits", img_size=12, batch_size=32, crop="pad", on_device=True)
    dm.setup("fit")
    assert dm.val_dataloader().images.shape[-2:] == (12, 12)
    with pytest.raises(ValueError, match="auto_augment"):
        bad = ImageDataModule("digits", img_size=8, auto_augment="rand-m9-mstd0.5", on_device=True)
        bad.setup("fit")
        bad.train_dataloader()


def _teacher():
    from distill import build_teacher

    torch.manual_seed(0)
    return build_teacher("cifar_resnet10", 10, in_chans=1, img_size=8, base_width=8)


def test_keys_are_host_numpy():
    x, y = images(8)
    _, _, keys = next(iter(DeviceImageLoader(x, y, 8, MEAN, STD, keyed=True)))
    assert isinstance(keys, np.ndarray) and keys.dtype == np.int64


def test_non_square_folder_on_device_sees_what_evaluation_sees(tmp_path):
    """The decode pass resizes the shorter side and keeps the centre square, as the host eval transform
    (crop_pct 1.0) does; it does not stretch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    kwargs = dict(source="imagefolder", root=str(tmp_path), img_size=8, batch_size=4, mean=list(MEAN), std=list(STD))
    host = ImageDataModule(**kwargs)
    host.setup("fit")
    device = ImageDataModule(**kwargs, on_device=True)
    device.setup("fit")
    on_device = torch.cat([b[0] for b in device.val_dataloader()])
    on_host = torch.stack([host.val_set[i][0] for i in range(len(host.val_set))])
    # the same pixels up to uint8 rounding of the decode pass (one level in 255, normalised)
    torch.testing.assert_close(on_device, on_host, rtol=0, atol=1.01 / 255 / min(STD))
