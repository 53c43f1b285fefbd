"""ImageDataModule: digits, imagefolder (grayscale and RGB), synthetic, cifar without files, and
batch-level mixup in on_after_batch_transfer."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill import ImageDataModule, TeacherModule


def first_batch(loader):
    return next(iter(loader))


# ------------------------------------------------------------------------------------------ digits
def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as the module should see them: 0..16 scaled to 0..255 uint8, then /255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().clip(0, 255) / 255.0, d.target


def test_digits_metadata():
    dm = ImageDataModule("digits", img_size=8)
    assert dm.num_classes == 10
    assert dm.class_names == [str(i) for i in range(10)]
    assert dm.in_chans == 1
    assert len(dm.mean) == len(dm.std) == 1
    # the training images' own statistics: close to those of the whole dataset, computed here by hand
    pixels, _ = digits_pixels()
    assert dm.mean[0] == pytest.approx(pixels.mean(), abs=5e-3)
    assert dm.std[0] == pytest.approx(pixels.std(), abs=5e-3)


def test_digits_explicit_mean_std_win():
    dm = ImageDataModule("digits", mean=[0.5], std=[0.25])
    assert dm.mean == (0.5,) and dm.std == (0.25,)
    dm.setup("fit")
    x, _ = first_batch(dm.val_dataloader())
    raw = x * 0.25 + 0.5  # back to [0, 1]
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    assert raw.min() == pytest.approx(0.0, abs=1e-6)


def test_digits_batches():
    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    dm.setup("fit")
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    # 1,797 images, 20 % held out: every training batch is full (drop_last), validation keeps all
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == pytest.approx(0.2 * 1797, abs=1)
    assert sum(len(b[1]) for b in dm.val_dataloader()) == len(dm.val_set)
    assert all(len(b[1]) == 32 for b in dm.train_dataloader())
    # normalised with the training statistics: the training set has mean ~0 and std ~1
    xs = torch.cat([b[0] for b in dm.train_dataloader()])
    assert xs.mean().item() == pytest.approx(0.0, abs=0.02)
    assert xs.std().item() == pytest.approx(1.0, abs=0.02)


def test_digits_images_and_labels_match_sklearn():
    pixels, target = digits_pixels()
    dm = ImageDataModule("digits", img_size=8, mean=[0.0], std=[1.0])
    dm.setup("fit")
    x, y = dm.val_set[0]
    # find this image in the raw data: one of the raw images with this label is exactly it
    matches = [i for i in np.flatnonzero(target == y) if np.allclose(pixels[i], x[0].numpy(), atol=1e-6)]
    assert matches, "the validation image is not one of the digits with its label"


def _split(seed: int, val_fraction: float = 0.2):
    dm = ImageDataModule("digits", seed=seed, val_fraction=val_fraction)
    dm.setup("fit")
    return dm


def _keys(ds) -> list[tuple[int, bytes]]:
    return [(int(t), img.tobytes()) for img, t in zip(ds.images, ds.targets)]


def test_digits_split_deterministic_stratified_disjoint():
    _, target = digits_pixels()
    a, b, c = _split(0), _split(0), _split(1)
    # same seed, same split
    assert _keys(a.val_set) == _keys(b.val_set)
    assert _keys(a.train_set) == _keys(b.train_set)
    # another seed, another split
    assert _keys(a.val_set) != _keys(c.val_set)
    # disjoint and complete, by index
    tr, va = set(a._digits["train"].tolist()), set(a._digits["val"].tolist())
    assert not tr & va
    assert tr | va == set(range(len(target)))
    # no validation image in the training set, by content (digits has no exact duplicate images)
    train_keys = set(_keys(a.train_set))
    assert not any(k in train_keys for k in _keys(a.val_set))
    # stratified: every class holds out its share of 20 %, within one image
    counts_all = np.bincount(target, minlength=10)
    counts_val = np.bincount(np.array(a.val_set.targets), minlength=10)
    assert np.all(np.abs(counts_val - 0.2 * counts_all) <= 1.0), counts_val


def test_digits_val_fraction():
    dm = _split(0, val_fraction=0.5)
    assert len(dm.val_set) == pytest.approx(1797 / 2, abs=1)


# ------------------------------------------------------------------------------------- imagefolder
CLASSES = ["zebra", "ant", "bee"]  # written in this order, read back sorted
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2


def class_colour(name: str) -> tuple[int, int, int]:
    """A distinct constant colour per class, so a pixel tells its label."""
    level = {"ant": 40, "bee": 120, "zebra": 200}[name]
    return level, 255 - level, 100


def write_image_folder(root, mode: str, size=(12, 10)):
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            r, g, b = class_colour(name)
            for i in range(n):
                img = Image.new("L", size, r) if mode == "L" else Image.new("RGB", size, (r, g, b))
                img.save(folder / f"{i}.png")
    (root / "train" / "notes.txt").write_text("not a class folder")  # a stray file is no class
    return root


@pytest.mark.parametrize("mode, in_chans", [("L", 1), ("RGB", 3)])
def test_imagefolder(tmp_path, mode, in_chans):
    root = write_image_folder(tmp_path / "data", mode)
    dm = ImageDataModule("imagefolder", root=str(root), img_size=8, batch_size=4)
    assert dm.class_names == sorted(CLASSES) == ["ant", "bee", "zebra"]
    assert dm.num_classes == 3
    assert dm.in_chans == in_chans
    # statistics of the training images, by hand: equal counts of the three constant colours
    levels = np.array([class_colour(c) for c in CLASSES], dtype=float) / 255.0  # (3 classes, RGB)
    expected_mean = levels.mean(0)[:in_chans]
    expected_std = levels.std(0)[:in_chans]
    assert np.allclose(dm.mean, expected_mean, atol=1e-4)
    assert np.allclose(dm.std, expected_std, atol=2e-3)

    dm.setup("fit")
    assert len(dm.train_set) == 3 * TRAIN_PER_CLASS and len(dm.val_set) == 3 * VAL_PER_CLASS
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (4, in_chans, 8, 8) and y.shape == (4,)
    # every image is its class's colour: labels follow the sorted folder names
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for x, y in loader:
            raw = x * torch.tensor(dm.std).view(1, -1, 1, 1) + torch.tensor(dm.mean).view(1, -1, 1, 1)
            for img, label in zip(raw, y):
                colour = torch.tensor(class_colour(dm.class_names[int(label)])[:in_chans]) / 255.0
                torch.testing.assert_close(img, colour.view(-1, 1, 1).expand_as(img), atol=1e-3, rtol=0)


def test_imagefolder_test_folder_and_missing_folders(tmp_path):
    root = write_image_folder(tmp_path / "data", "RGB")
    (root / "val").rename(root / "test")  # test/ serves as validation when val/ is missing
    dm = ImageDataModule("imagefolder", root=str(root), img_size=8, batch_size=4)
    dm.setup("fit")
    assert len(dm.val_set) == 3 * VAL_PER_CLASS

    with pytest.raises(ValueError, match="train"):
        ImageDataModule("imagefolder", root=str(tmp_path / "nowhere"), batch_size=4).num_classes
    (root / "test").rename(root / "holdout")
    with pytest.raises(ValueError, match="val"):
        ImageDataModule("imagefolder", root=str(root), batch_size=4).num_classes


def test_imagefolder_needs_root():
    with pytest.raises(ValueError, match="root"):
        ImageDataModule("imagefolder")


def test_unknown_source():
    with pytest.raises(ValueError, match="source"):
        ImageDataModule("mnist")


def test_batch_larger_than_training_set(tmp_path):
    root = write_image_folder(tmp_path / "data", "L")
    dm = ImageDataModule("imagefolder", root=str(root), img_size=8, batch_size=64)
    with pytest.raises(ValueError, match="batch_size"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------- synthetic
def test_synthetic():
    kwargs = dict(num_samples=40, num_classes_synthetic=4, in_chans_synthetic=3, img_size=16, batch_size=8,
                  val_fraction=0.25)
    dm = ImageDataModule("synthetic", **kwargs)
    assert dm.num_classes == 4 and dm.in_chans == 3
    assert dm.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert dm.mean == (0.0, 0.0, 0.0) and dm.std == (1.0, 1.0, 1.0)
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,)
    assert int(y.min()) >= 0 and int(y.max()) < 4
    # fixed by seed
    again = ImageDataModule("synthetic", **kwargs)
    again.setup("fit")
    torch.testing.assert_close(dm.val_set.x, again.val_set.x)
    assert dm.val_set.targets == again.val_set.targets
    other = ImageDataModule("synthetic", seed=1, **kwargs)
    other.setup("fit")
    assert not torch.allclose(dm.val_set.x, other.val_set.x)


# ------------------------------------------------------------------------------------------- cifar
@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_without_files_asks_for_download(tmp_path, source):
    dm = ImageDataModule(source, root=str(tmp_path / "cifar"), img_size=32)
    if source == "cifar10":  # known without files
        assert dm.num_classes == 10 and dm.in_chans == 3 and dm.class_names[0] == "airplane"
    with pytest.raises(FileNotFoundError, match="download"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------- mixup
def _mixed_batch(dm, training: bool):
    dm.trainer = SimpleNamespace(training=training)  # what on_after_batch_transfer reads from the trainer
    x, y = first_batch(dm.train_dataloader())
    original = (x.clone(), y.clone())
    return original, dm.on_after_batch_transfer((x, y), 0)


def test_mixup_gives_soft_targets_consistent_with_mixed_images():
    torch.manual_seed(0)
    np.random.seed(0)  # timm's Mixup draws lambda with numpy
    dm = ImageDataModule("digits", batch_size=16, mixup=0.8, mean=[0.0], std=[1.0])
    dm.setup("fit")
    (x, y), (xm, ym) = _mixed_batch(dm, training=True)
    assert ym.shape == (16, 10) and ym.dtype.is_floating_point
    torch.testing.assert_close(ym.sum(1), torch.ones(16))
    assert (ym.max(1).values < 1).any()  # really soft
    # timm mixes each sample with the batch flipped: x' = lam x + (1 - lam) x.flip(0), same lam for y
    x_flip = x.flip(0)
    d = (x - x_flip).flatten()
    lam = float(((xm - x_flip).flatten() @ d) / (d @ d))
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x_flip, atol=1e-5, rtol=0)
    one_hot = F.one_hot(y, 10).float()
    torch.testing.assert_close(ym, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-5, rtol=0)


def test_mixup_off_outside_training_and_when_disabled():
    dm = ImageDataModule("digits", batch_size=16, mixup=0.8)
    dm.setup("fit")
    (x, y), (xm, ym) = _mixed_batch(dm, training=False)  # validation: untouched
    assert torch.equal(x, xm) and torch.equal(y, ym)
    plain = ImageDataModule("digits", batch_size=16)
    plain.setup("fit")
    (x, y), (xm, ym) = _mixed_batch(plain, training=True)
    assert torch.equal(x, xm) and torch.equal(y, ym) and ym.dtype == torch.int64


def test_mixup_in_a_real_fit(tmp_path, trainer_factory, tiny_teacher_kwargs):
    """Inside a Trainer the module's training_step receives soft targets, its validation_step hard ones."""
    seen = {"train": [], "val": []}

    class Spy(TeacherModule):
        def training_step(self, batch, batch_idx):
            seen["train"].append(batch[1].clone())
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            seen["val"].append(batch[1].clone())
            return super().validation_step(batch, batch_idx)

    L.seed_everything(0)
    dm = ImageDataModule("digits", batch_size=16, mixup=0.8, cutmix=1.0)
    trainer = trainer_factory(max_steps=2, limit_val_batches=1)
    module = Spy(**tiny_teacher_kwargs)
    trainer.fit(module, dm)
    trainer.validate(module, dm, verbose=False)
    assert len(seen["train"]) == 2 and len(seen["val"]) == 1
    for y in seen["train"]:
        assert y.shape == (16, 10) and y.dtype.is_floating_point
        torch.testing.assert_close(y.sum(1), torch.ones(16))
    assert seen["val"][0].shape == (16,) and seen["val"][0].dtype == torch.int64


# ------------------------------------------------------------------------------------- colour mode
def write_mixed_folder(root, gray_files: set[str], n: int = 3):
    """An image folder whose files are RGB except those named in `gray_files` (`split/class/i`)."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                name = f"{split}/{c}/{i}"
                img = Image.new("L", (9, 7), 90) if name in gray_files else Image.new("RGB", (9, 7), (200, 30, 60))
                img.save(folder / f"{i}.png")
    return root


def test_one_grayscale_file_first_does_not_make_an_rgb_folder_grayscale(tmp_path):
    root = write_mixed_folder(tmp_path / "data", {"train/a/0"})  # the first file read is grayscale
    dm = ImageDataModule("imagefolder", root=str(root), img_size=8, batch_size=2)
    assert dm.in_chans == 3
    dm.setup("fit")
    x, _ = dm.train_set[0]  # the grayscale file itself, replicated to 3 channels
    assert x.shape == (3, 8, 8)


def test_all_grayscale_folder_is_one_channel_and_in_chans_forces(tmp_path):
    every = {f"{s}/{c}/{i}" for s in ("train", "val") for c in ("a", "b") for i in range(3)}
    gray = write_mixed_folder(tmp_path / "gray", every)
    assert ImageDataModule("imagefolder", root=str(gray), img_size=8).in_chans == 1
    forced = ImageDataModule("imagefolder", root=str(gray), img_size=8, batch_size=2, in_chans=3)
    assert forced.in_chans == 3
    forced.setup("fit")
    assert forced.train_set[0][0].shape == (3, 8, 8) and len(forced.mean) == 3
    rgb = write_mixed_folder(tmp_path / "rgb", set())
    down = ImageDataModule("imagefolder", root=str(rgb), img_size=8, batch_size=2, in_chans=1)
    assert down.in_chans == 1
    down.setup("fit")
    assert down.train_set[0][0].shape == (1, 8, 8)


def test_large_folders_decide_the_colour_mode_from_a_spread_sample(tmp_path, monkeypatch):
    from distill.data.datasets import ImageFolderDataset

    monkeypatch.setattr(ImageFolderDataset, "verify_limit", 4)  # as if too large to open every file
    monkeypatch.setattr(ImageFolderDataset, "mode_sample", 3, raising=False)  # first, middle, last file of a split
    root = write_mixed_folder(tmp_path / "data", {"train/a/0", "train/a/1", "train/a/2", "train/b/0", "val/a/0"})
    assert ImageDataModule("imagefolder", root=str(root), img_size=8).in_chans == 3  # train/b/2 is colour


@pytest.mark.parametrize("source, kwargs", [("digits", dict(in_chans=3)), ("synthetic", dict(in_chans=1)),
                                            ("cifar10", dict(in_chans=1, root="/nowhere"))])
def test_in_chans_only_converts_image_folders(source, kwargs):
    with pytest.raises(ValueError, match=f"data.in_chans={kwargs['in_chans']} only converts image folders"):
        ImageDataModule(source, **kwargs).in_chans


def test_in_chans_must_be_1_or_3():
    with pytest.raises(ValueError, match="data.in_chans=4"):
        ImageDataModule("digits", in_chans=4)


# ---------------------------------------------------------------------------------- split fingerprint
def test_split_fingerprint_follows_the_digits_split():
    a, b, c = (ImageDataModule("digits", seed=s).split_fingerprint for s in (0, 0, 1))
    assert set(a) == {"dataset", "val", "train", "labeled"} and all(isinstance(v, str) for v in a.values())
    assert a["labeled"] == a["train"]  # every training label is used
    assert a == b
    assert c["dataset"] == a["dataset"] and c["val"] != a["val"]
    assert ImageDataModule("digits", val_fraction=0.3).split_fingerprint["val"] != a["val"]
    # not the seed itself but the images held out: equal splits under other settings stay equal
    assert ImageDataModule("digits", img_size=16, batch_size=8).split_fingerprint == a


def test_split_fingerprint_of_synthetic_and_image_folders(tmp_path):
    s0, s1 = (ImageDataModule("synthetic", num_samples=40, seed=s).split_fingerprint for s in (0, 1))
    assert s0["val"] != s1["val"]
    root = write_image_folder(tmp_path / "data", "RGB")
    f = ImageDataModule("imagefolder", root=str(root)).split_fingerprint
    assert f == ImageDataModule("imagefolder", root=str(root), seed=5).split_fingerprint
    # the same files elsewhere: same fingerprint; one file moved from train to val: another split
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert ImageDataModule("imagefolder", root=str(copy)).split_fingerprint == f
    (copy / "train" / "ant" / "0.png").rename(copy / "val" / "ant" / "moved.png")
    moved = ImageDataModule("imagefolder", root=str(copy)).split_fingerprint
    assert moved["val"] != f["val"]


def test_split_fingerprint_of_cifar_is_its_fixed_test_split(monkeypatch):
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    parts = {True: SimpleNamespace(data=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), targets=[0, 1, 2, 0, 1, 2]),
             False: SimpleNamespace(data=rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8), targets=[2, 1, 0])}
    def fingerprint(**kwargs):
        dm = ImageDataModule("cifar10", **kwargs)
        monkeypatch.setattr(dm, "_cifar", lambda train, transform: parts[train])  # torchvision's .data/.targets
        return dm.split_fingerprint

    f = fingerprint(root="/nowhere")
    assert fingerprint(root="/elsewhere", seed=3) == f  # the files decide, not the seed or where they are
    parts[False].targets = [2, 1, 1]
    g = fingerprint(root="/nowhere")
    assert g["val"] != f["val"] and g["dataset"] != f["dataset"]
