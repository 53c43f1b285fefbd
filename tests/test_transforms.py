"""Train and eval transforms against DeiT's (facebookresearch/deit datasets.py build_transform): the
Pillow-13-safe posterize, centre crop instead of stretching, crop_pct and interpolation, and the eval
transform recorded in checkpoints and used by predict / attention / export."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from distill import DistillationLoss, DistillModule, ImageDataModule, StudentConfig, TeacherModule, load_student
from distill.data.transforms import augment_ops, build_auto_augment, build_eval_transform, posterize_old_pillow
from distill.models.meta import eval_spec_of

DEIT_RA = "rand-m9-mstd0.5-inc1"
LEFT, MIDDLE, RIGHT = (255, 0, 0), (255, 255, 255), (0, 0, 255)


def three_band_image(w: int = 80, h: int = 20) -> Image.Image:
    """A wide image: red left quarter, white middle half, blue right quarter. A centre crop of the
    shorter side keeps only white; stretching the whole width into a square keeps red and blue too."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 4], arr[:, w // 4: 3 * w // 4], arr[:, 3 * w // 4:] = LEFT, MIDDLE, RIGHT
    return Image.fromarray(arr)


def unnormalise(x: torch.Tensor, dm: ImageDataModule) -> torch.Tensor:
    return x * torch.tensor(dm.std).view(-1, 1, 1) + torch.tensor(dm.mean).view(-1, 1, 1)


# ------------------------------------------------------------------------------------------ posterize
def posterize_op(seed_magnitude: float = 9.0):
    """DeiT's increasing posterize as RandAugment builds it: magnitude 9 with std 0.5, always applied."""
    from timm.data.auto_augment import AugmentOp

    return AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=seed_magnitude, hparams={"magnitude_std": 0.5})


def test_timm_posterize_crashes_on_pillow_13_with_a_fixed_seed():
    """The bug itself: timm's op draws magnitude 10 (9 + N(0, 0.5) clipped) -> 0 bits -> Pillow 13 refuses."""
    op, img = posterize_op(), three_band_image()
    random.seed(0)
    with pytest.raises(ValueError, match="bits must be between"):
        for _ in range(500):  # P(magnitude >= 10) ~ 2.3 % per call: fails within the first ~100 calls at seed 0
            op(img)


def test_fixed_op_gives_old_pillows_black_image_and_timms_result_otherwise():
    from timm.data.auto_augment import posterize as timm_posterize

    op, img = posterize_op(), three_band_image()
    assert op.aug_fn is timm_posterize
    fixed = posterize_op()
    fixed.aug_fn = posterize_old_pillow
    random.seed(0)
    black = 0
    for _ in range(500):
        state = random.getstate()
        out = fixed(img)
        random.setstate(state)
        try:
            expected = op(img)
        except ValueError:  # the 0-bit draws: Pillow < 13 gave lut[i] = i & ~(2**8 - 1) = 0, a black image
            expected = Image.new("RGB", img.size, 0)
            black += 1
        assert out.mode == img.mode and np.array_equal(np.asarray(out), np.asarray(expected))
    assert black > 0


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_posterize_old_pillow_is_the_old_pillow_formula(mode):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (6, 7) if mode == "L" else (6, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr, mode)
    for bits in range(0, 9):
        mask = ~(2 ** (8 - bits) - 1) & 0xFF  # Pillow < 13's ImageOps.posterize, bits 0..8
        got = np.asarray(posterize_old_pillow(img, bits))
        assert np.array_equal(got, arr & mask), bits


@pytest.mark.parametrize("config", [DEIT_RA, "rand-m10-inc1", "rand-m10-n2", "v0", "original", "augmix-m10-w2-d2"])
def test_every_posterize_op_of_the_built_augmentation_is_replaced(config):
    from timm.data.auto_augment import posterize as timm_posterize

    aug = build_auto_augment(config, 32, (0.5, 0.5, 0.5))
    ops = augment_ops(aug)
    assert ops, config
    assert not [op for op in ops if op.aug_fn is timm_posterize]
    if "Posterize" in " ".join(op.name for op in ops):
        assert any(op.aug_fn is posterize_old_pillow for op in ops)


def test_datamodule_randaugment_survives_zero_bit_posterize():
    """Magnitude 10 with every layer applied: the increasing posterize keeps 0 bits whenever it is picked."""
    dm = ImageDataModule("digits", img_size=8, auto_augment="rand-m10-p1.0-inc1", mean=[0.0], std=[1.0])
    tf = dm.train_transform()
    random.seed(0)
    np.random.seed(0)
    img = Image.fromarray(np.full((8, 8), 200, np.uint8))
    outs = torch.stack([tf(img) for _ in range(300)])  # crashed (Pillow 13) before the fix
    assert (outs.flatten(1).amax(1) == 0).any()  # some came out black, as with Pillow < 13


def test_bad_auto_augment_string_is_a_one_line_error():
    with pytest.raises(ValueError, match="data.auto_augment='autoaug'"):
        ImageDataModule("digits", auto_augment="autoaug").train_transform()


# ---------------------------------------------------------------------------------- eval: no stretch
def folder_with(tmp_path, image: Image.Image, n: int = 2):
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                image.save(d / f"{i}.png")
    return tmp_path / "data"


def test_eval_centre_crops_a_non_square_image_instead_of_stretching(tmp_path):
    dm = ImageDataModule("imagefolder", root=str(folder_with(tmp_path, three_band_image())), img_size=10,
                         batch_size=2, mean=[0.0] * 3, std=[1.0] * 3)
    x = dm.eval_transform()(three_band_image())
    assert x.shape == (3, 10, 10)
    torch.testing.assert_close(x, torch.ones(3, 10, 10))  # only the white middle: nothing stretched in
    dm.setup("fit")
    xv, _ = dm.val_set[0]
    torch.testing.assert_close(xv, torch.ones(3, 10, 10))


@pytest.mark.parametrize("crop", ["none", "pad"])
def test_training_without_rrc_does_not_stretch_either(tmp_path, crop):
    dm = ImageDataModule("imagefolder", root=str(folder_with(tmp_path, three_band_image())), img_size=16,
                         batch_size=2, crop=crop, mean=[0.0] * 3, std=[1.0] * 3)
    tf = dm.train_transform()
    torch.manual_seed(0)
    for _ in range(20):
        x = tf(three_band_image())
        assert x.shape == (3, 16, 16)
        pixels = x.permute(1, 2, 0).reshape(-1, 3)
        # white, or black zero padding (crop pad): never the red/blue sides
        assert all(tuple(p) in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)) for p in pixels.tolist())


def test_training_without_rrc_resizes_and_crops_as_evaluation_does():
    """crop none, no flip: the training images are the evaluation's, crop_pct included (the shorter side
    resized to floor(16 / 0.8) = 20, then the centre 16x16), as torchvision composes it by hand."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    dm = ImageDataModule("imagefolder", root="/nowhere", img_size=16, crop="none", hflip=0.0, crop_pct=0.8,
                         mean=mean, std=std, in_chans=3)  # no file is read
    by_hand = T.Compose([T.Resize(20), T.CenterCrop(16), T.ToTensor(), T.Normalize(mean, std)])
    torch.testing.assert_close(dm.train_transform()(img), by_hand(img))
    torch.testing.assert_close(dm.eval_transform()(img), by_hand(img))


def test_crop_pct_and_bicubic_equal_deits_eval_transform():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    dm = ImageDataModule("imagefolder", root="/nowhere", img_size=224, crop_pct=0.875, interpolation="bicubic",
                         mean=list(mean), std=list(std), in_chans=3)  # no file is read
    deit = T.Compose([T.Resize(int(224 / 0.875), interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(mean, std)])  # deit/datasets.py build_transform, eval
    torch.testing.assert_close(dm.eval_transform()(img), deit(img))


def test_interpolation_reaches_rrc_eval_and_randaugment():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    dm = ImageDataModule("synthetic", img_size=32, crop="rrc", interpolation="bicubic", auto_augment=DEIT_RA)
    tf = dm.train_transform().transforms
    assert isinstance(tf[0], RandomResizedCropAndInterpolation) and tf[0].interpolation == InterpolationMode.BICUBIC
    assert tf[0].scale == (0.08, 1.0) and tf[0].ratio == pytest.approx((3 / 4, 4 / 3))
    aa = next(t for t in tf if augment_ops(t))
    assert {op.kwargs["resample"] for op in augment_ops(aa)} == {Image.BICUBIC}
    assert dm.eval_transform().transforms[0].interpolation == InterpolationMode.BICUBIC


@pytest.mark.parametrize("kwargs, words", [
    (dict(crop_pct=1.5), "data.crop_pct=1.5 must lie in (0, 1]"),
    (dict(crop_pct=0.0), "data.crop_pct=0.0 must lie in (0, 1]"),
    (dict(interpolation="cubic"), "data.interpolation='cubic' is unknown"),
    (dict(on_device=True, crop_pct=0.875), "data.on_device"),
])
def test_bad_eval_fields_are_one_line_errors(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
        ImageDataModule("digits", **kwargs)


def test_eval_spec_rebuilds_the_datamodules_transform(tmp_path):
    root = folder_with(tmp_path, three_band_image(37, 23))
    dm = ImageDataModule("imagefolder", root=str(root), img_size=12, crop_pct=0.8, interpolation="bicubic")
    spec = dm.eval_spec
    assert set(spec) == {"img_size", "crop_pct", "interpolation", "mean", "std", "in_chans"}
    assert spec["crop_pct"] == 0.8 and spec["interpolation"] == "bicubic" and spec["in_chans"] == 3
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (23, 37, 3), dtype=np.uint8))
    torch.testing.assert_close(build_eval_transform(spec)(img), dm.eval_transform()(img))


def test_legacy_spec_without_crop_pct_keeps_the_old_stretching_resize():
    img = three_band_image()
    spec = dict(img_size=10, mean=[0.0] * 3, std=[1.0] * 3, in_chans=3)  # a checkpoint written before crop_pct
    old = T.Compose([T.Resize((10, 10), antialias=True), T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])
    torch.testing.assert_close(build_eval_transform(spec)(img), old(img))


# --------------------------------------------------------------------------- checkpoints and commands
def fit(module, dm, root, steps: int = 1):
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root))
    trainer.fit(module, dm)
    return trainer


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A student and a teacher trained one step on a folder of non-square RGB images, with crop_pct 0.75
    and bicubic, and the non-square test images."""
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / "data" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (14 + i, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    dm_kwargs = dict(source="imagefolder", root=str(root / "data"), img_size=8, batch_size=4, crop_pct=0.75,
                     interpolation="bicubic")
    student_dm = ImageDataModule(**dm_kwargs)
    student = DistillModule(StudentConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2),
                            loss=DistillationLoss("none"), lr=1e-2, warmup_epochs=0)
    fit(student, student_dm, root).save_checkpoint(root / "student.ckpt")
    teacher_dm = ImageDataModule(**{**dm_kwargs, "img_size": 12, "crop_pct": 0.9})
    teacher = TeacherModule("cifar_resnet10", model_kwargs={"base_width": 8}, lr=1e-2, warmup_epochs=0)
    fit(teacher, teacher_dm, root).save_checkpoint(root / "teacher.ckpt")
    images = []
    for i, (h, w) in enumerate([(20, 41), (33, 17)]):
        p = root / f"wide{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        images.append(p)
    return dict(student=root / "student.ckpt", teacher=root / "teacher.ckpt", student_dm=student_dm,
                teacher_dm=teacher_dm, images=images)


def test_checkpoint_records_the_eval_transform_of_the_datamodule(wide_run):
    hp = torch.load(wide_run["student"], map_location="cpu", weights_only=True)["hyper_parameters"]
    dm = wide_run["student_dm"]
    assert {k: hp["data"][k] for k in dm.eval_spec} == dm.eval_spec
    assert eval_spec_of(load_student(wide_run["student"])) == dm.eval_spec
    thp = torch.load(wide_run["teacher"], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert thp["input_crop_pct"] == 0.9 and thp["input_interpolation"] == "bicubic"


def test_predict_on_non_square_images_equals_the_model_on_the_datamodules_tensors(wide_run):
    from distill.commands.predict import load_teacher, predict

    student, teacher = load_student(wide_run["student"]), load_teacher(wide_run["teacher"])
    results = predict(student, wide_run["images"], teacher=teacher, topk=2)
    s_tf, t_tf = wide_run["student_dm"].eval_transform(), wide_run["teacher_dm"].eval_transform()
    x_s = torch.stack([s_tf(Image.open(p).convert("RGB")) for p in wide_run["images"]])
    x_t = torch.stack([t_tf(Image.open(p).convert("RGB")) for p in wide_run["images"]])
    with torch.no_grad():
        fused, z_t = student(x_s).softmax(-1), teacher(x_t).softmax(-1)
    for i, r in enumerate(results):
        got = {row["index"]: row["prob"] for row in r["heads"]["fused"]}
        np.testing.assert_allclose([got[k] for k in range(2)], fused[i].tolist(), rtol=1e-5, atol=1e-6)
        got = {row["index"]: row["prob"] for row in r["heads"]["teacher"]}
        np.testing.assert_allclose([got[k] for k in range(2)], z_t[i].tolist(), rtol=1e-5, atol=1e-6)


def test_attention_command_prepares_images_like_validation(wide_run, tmp_path, monkeypatch):
    import distill.commands.attention as cli

    seen = []
    real = cli.load_images

    def spy(paths, spec):
        seen.append(dict(spec))
        return real(paths, spec)

    monkeypatch.setattr(cli, "load_images", spy)
    assert cli.main([str(wide_run["student"]), str(wide_run["images"][0]), "--out", str(tmp_path), "--dpi", "20"]) == 0
    assert seen and seen[0] == wide_run["student_dm"].eval_spec


def test_export_metadata_records_crop_pct_and_interpolation(wide_run, tmp_path):
    import json

    from safetensors import safe_open

    from distill.commands.export import export

    path = export(str(wide_run["student"]), "safetensors", "fused", str(tmp_path / "s.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["crop_pct"]) == 0.75 and json.loads(meta["interpolation"]) == "bicubic"


def test_old_checkpoint_without_crop_pct_predicts_with_the_old_resize(wide_run, tmp_path):
    from distill.commands.predict import predict

    ckpt = torch.load(wide_run["student"], map_location="cpu", weights_only=True)
    for key in ("crop_pct", "interpolation"):
        del ckpt["hyper_parameters"]["data"][key]
    torch.save(ckpt, tmp_path / "old.ckpt")
    model = load_student(tmp_path / "old.ckpt")
    data = ckpt["hyper_parameters"]["data"]
    old = T.Compose([T.Resize((8, 8), antialias=True), T.ToTensor(), T.Normalize(data["mean"], data["std"])])
    x = torch.stack([old(Image.open(p).convert("RGB")) for p in wide_run["images"]])
    with torch.no_grad():
        fused = model(x).softmax(-1)
    results = predict(model, wide_run["images"], topk=2)
    for i, r in enumerate(results):
        got = {row["index"]: row["prob"] for row in r["heads"]["fused"]}
        np.testing.assert_allclose([got[k] for k in range(2)], fused[i].tolist(), rtol=1e-5, atol=1e-6)
