"""Every shipped recipe (recipes/*/*.yaml, so recipes added later are covered) with its real transforms:
thousands of images through its training transform (the Pillow 13 posterize crash of DeiT's RandAugment
happened about twice in 2,000 images), the data settings the ImageNet recipes claim are DeiT's, and a few
training steps of each recipe through the real LightningCLI parser on a tiny image folder."""
from __future__ import annotations

import functools
import io
import os
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill import ImageDataModule
from distill.commands.recipe_cli import DistillCLI
from distill.data.datasets import CIFAR_STATS
from distill.data.transforms import augment_ops, posterize_old_pillow

REPO = Path(__file__).resolve().parent.parent
# the step recipes (teacher*.yaml, student*.yaml), not the extra configs some recipes ship (guidance.yaml)
RECIPES = sorted(p for p in (REPO / "recipes").glob("*/*.yaml") if p.name.startswith(("teacher", "student")))
RECIPE_DIRS = sorted({p.parent for p in RECIPES})
# The shared benchmark data next to the checkout (../shared/data), or where DISTILL_CIFAR10_JPEG says. Where
# it is expected (that variable is set, or the shared data folder exists, as on the development machine and
# a clone beside it), a missing archive fails the CIFAR recipes' test instead of pushing random noise.
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_DIR = Path(os.environ.get("DISTILL_CIFAR10_JPEG") or SHARED_DATA / "cifar10-jpeg")
CIFAR_TEST = CIFAR_DIR / "cifar10-test.tar.gz"
CIFAR_EXPECTED = bool(os.environ.get("DISTILL_CIFAR10_JPEG")) or SHARED_DATA.is_dir()
PUSHED = 2400  # images through each distinct training transform
DEIT_RA = "rand-m9-mstd0.5-inc1"
# LightningCLI warns when args are passed while sys.argv holds pytest's own
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")


def recipe_id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def data_section(recipe: Path) -> dict:
    """The recipe's resolved `data:` section (defaults filled in by the real parser), a fresh copy."""
    return dict(_parsed_data(recipe))


@functools.lru_cache(maxsize=None)
def _parsed_data(recipe: Path) -> tuple:
    config = DistillCLI.parse_recipe(["--config", str(recipe)])
    return tuple(vars(config.data).items())


def is_cifar(recipe: Path, data: dict) -> bool:
    return "cifar" in recipe.parent.name or "cifar" in str(data.get("root") or "") or data["source"].startswith("cifar")


# ------------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def cifar_images() -> list[Image.Image] | None:
    """PUSHED real CIFAR-10 test JPEGs (all ten classes), or None where the archive is absent and not
    expected (then a warning says the CIFAR recipes got random noise)."""
    if not CIFAR_TEST.is_file():
        where = "DISTILL_CIFAR10_JPEG" if os.environ.get("DISTILL_CIFAR10_JPEG") else f"the shared data folder {SHARED_DATA}"
        if CIFAR_EXPECTED:
            pytest.fail(f"{CIFAR_TEST} is missing, but {where} says the CIFAR-10 JPEG archives are there; "
                        f"restore them or point DISTILL_CIFAR10_JPEG at their folder")
        warnings.warn(f"{CIFAR_TEST} not found: the CIFAR recipes' transforms get random noise, not CIFAR-10 images "
                      f"(set DISTILL_CIFAR10_JPEG to the folder of cifar10-test.tar.gz)")
        return None
    with tarfile.open(CIFAR_TEST) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        members = members[:: max(1, len(members) // PUSHED)][:PUSHED]
        images = []
        for m in members:
            with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                images.append(im.convert("RGB"))
    return images


def random_images(size: int, n: int, mode: str, seed: int = 0) -> list[Image.Image]:
    """n random images around `size` (some wider, some taller); a pool of 64 cycled keeps this fast."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(min(n, 64)):
        h, w = max(1, int(size * rng.uniform(0.8, 1.3))), max(1, int(size * rng.uniform(0.8, 1.3)))
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        pool.append(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode))
    return [pool[i % len(pool)] for i in range(n)]


def write_folder(root: Path, images: list[Image.Image], per_split: dict[str, int]) -> Path:
    for split, n in per_split.items():
        for i in range(n):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            images[i % len(images)].save(folder / f"{i}.png")
    return root


def recipe_datamodule(recipe: Path, tmp_path: Path, cifar_images) -> tuple[ImageDataModule, list[Image.Image], str]:
    """The recipe's datamodule (its data section, root pointed at a small folder of the images pushed,
    from which statistics are computed where the recipe gives none), the images to push and where they
    come from (`digits`, `cifar10-test.tar.gz` or `random noise`)."""
    data = data_section(recipe)
    if data["source"] in ("digits", "synthetic"):
        dm = ImageDataModule(**data)
        if data["source"] == "digits":
            d = dm._digits
            pool, source = [Image.fromarray(d["images"][i]) for i in d["train"]], "digits"
        else:
            pool, source = random_images(dm.img_size, PUSHED, "RGB" if dm.in_chans == 3 else "L"), "random noise"
        return dm, [pool[i % len(pool)] for i in range(PUSHED)], source
    if is_cifar(recipe, data) and cifar_images is not None:
        images, source = cifar_images, CIFAR_TEST.name
    else:
        images, source = random_images(data["img_size"], PUSHED, "L" if data.get("in_chans") == 1 else "RGB"), "random noise"
    if data["source"] in CIFAR_STATS and data.get("mean") is None:
        data["mean"], data["std"] = (list(v) for v in CIFAR_STATS[data["source"]])
    data.update(source="imagefolder", root=str(write_folder(tmp_path / "stats", images[:32], {"train": 16, "val": 4})))
    return ImageDataModule(**data), images, source


# ----------------------------------------------------------------------------------- the transforms
_pushed: dict[str, int] = {}  # transform repr -> zero-bit posterize draws, for recipes sharing a transform


def stress_params():
    """Recipes above 64 px take ~4 ms an image (RandomResizedCrop + RandAugment at 224): slow-marked."""
    return [pytest.param(r, id=recipe_id(r), marks=[pytest.mark.slow] if data_section(r)["img_size"] > 64 else [])
            for r in RECIPES]


@pytest.mark.parametrize("recipe", stress_params())
def test_training_transform_takes_thousands_of_images(recipe, tmp_path, cifar_images, record_property):
    dm, images, source = recipe_datamodule(recipe, tmp_path, cifar_images)
    record_property("images", source)  # in the JUnit report; the warning above says when CIFAR fell back to noise
    if is_cifar(recipe, data_section(recipe)):
        assert source == (CIFAR_TEST.name if cifar_images is not None else "random noise")
        assert cifar_images is not None or not CIFAR_EXPECTED
    tf = dm.train_transform()
    key = f"{repr(tf)}|{dm.hparams.get('interpolation')}|{is_cifar(recipe, data_section(recipe))}"
    if key not in _pushed:
        zero_bits = [0]
        for t in tf.transforms:
            for op in augment_ops(t):
                if op.aug_fn is posterize_old_pillow:
                    def counting(img, bits, _count=zero_bits, **kw):
                        _count[0] += int(bits) <= 0
                        return posterize_old_pillow(img, bits, **kw)
                    op.aug_fn = counting
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        for img in images:  # with timm's posterize on Pillow 13 this raised ValueError for the DeiT recipes
            x = tf(img)
            assert x.shape == (dm.in_chans, dm.img_size, dm.img_size) and torch.isfinite(x).all()
        _pushed[key] = zero_bits[0]
    if dm.hparams.auto_augment == DEIT_RA:
        assert _pushed[key] > 0, "the 0-bit posterize was never drawn: push more images"


def test_the_deit_randaugment_recipes_exist():
    """The stress test above is only worth its time while recipes use DeiT's RandAugment."""
    assert any(data_section(r)["auto_augment"] == DEIT_RA for r in RECIPES)


# -------------------------------------------------------------------------------- recipe settings
def test_imagenet_recipes_use_deits_data_settings():
    for recipe in sorted((REPO / "recipes" / "imagenet").glob("*.yaml")):
        d = data_section(recipe)
        assert d["crop"] == "rrc" and d["hflip"] == 0.5, recipe.name
        assert d["interpolation"] == "bicubic" and d["crop_pct"] == 0.875, recipe.name
        assert d["auto_augment"] == DEIT_RA and d["re_prob"] == 0.25, recipe.name
        assert d["repeated_aug"] == 3, recipe.name
        assert d["mean"] == [0.485, 0.456, 0.406] and d["std"] == [0.229, 0.224, 0.225], recipe.name
        if recipe.name.startswith("student"):
            assert d["mixup"] == 0.8 and d["cutmix"] == 1.0, recipe.name


def test_cifar_recipes_evaluate_the_whole_image():
    cifar = [r for r in RECIPES if is_cifar(r, data_section(r))]
    assert cifar
    for recipe in cifar:
        assert data_section(recipe)["crop_pct"] == 1.0, recipe_id(recipe)


def test_recipe_headers_state_the_posterize_choice():
    for recipe in RECIPES:
        if data_section(recipe)["auto_augment"]:
            header = "".join(line for line in recipe.read_text().splitlines(True) if line.startswith("#"))
            assert "posterize" in header.lower(), recipe_id(recipe)


# ------------------------------------------------------------------------------- a few real steps
CPU_TINY = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
    "--trainer.precision", "32-true", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1", "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0",
]
# tiny networks from random weights (the transfer recipe's pretrained ones would need the network)
TINY_TEACHER = ["--model.init_args.model", "cifar_resnet10", "--model.init_args.model_kwargs", '{"base_width": 8}',
                "--model.init_args.pretrained", "null"]
TINY_STUDENT = ["--model.init_args.student.patch_size", "8", "--model.init_args.student.embed_dim", "32",
                "--model.init_args.student.depth", "1", "--model.init_args.student.num_heads", "2",
                "--model.init_args.student.pretrained", "null"]


@pytest.fixture(scope="module")
def tiny_rgb_folder(tmp_path_factory) -> Path:
    """2 classes of non-square random RGB images: 260 to train (>= 256 for repeated augmentation), 8 to validate."""
    root = tmp_path_factory.mktemp("tiny_rgb")
    return write_folder(root, random_images(40, 64, "RGB", seed=1), {"train": 260, "val": 8})


@pytest.fixture(scope="module")
def tiny_unlabeled_folder(tmp_path_factory) -> Path:
    """40 random RGB images with no class folders, none of them the labelled folder's (other seed)."""
    root = tmp_path_factory.mktemp("tiny_unlabeled")
    for i, image in enumerate(random_images(40, 40, "RGB", seed=2)):
        image.save(root / f"{i}.png")
    return root


def fit_recipe(recipe: Path, args: list[str], root: Path) -> Path:
    from distill.training.lineage import finish_wandb

    cli = DistillCLI(args=["--config", str(recipe), *args, "--trainer.default_root_dir", str(root)], run=False)
    assert cli.datamodule.hparams.auto_augment == data_section(recipe)["auto_augment"]  # augmentation kept
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finish_wandb()
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file()
    return last


@pytest.mark.parametrize("folder", RECIPE_DIRS, ids=lambda p: p.name)
def test_every_recipe_trains_a_few_steps_through_its_real_transforms(folder, tiny_rgb_folder, tiny_unlabeled_folder,
                                                                      tmp_path, compile_without_inductor):
    # a recipe that compiles (cifar10_budget) goes through dynamo and AOT autograd here, without inductor's C++
    # code generation (two minutes on a 2-core CPU for two steps); tests/test_gpu.py compiles with inductor
    data = ["--data.source", "imagefolder", "--data.root", str(tiny_rgb_folder)]
    teacher = fit_recipe(folder / "teacher.yaml", [*CPU_TINY, *data, *TINY_TEACHER], tmp_path / "teacher")
    for student in sorted(folder.glob("student*.yaml")):
        # a recipe that reads unlabelled images (cifar10_semi) reads them from a folder of their own here
        unlabeled = (["--data.unlabeled_root", str(tiny_unlabeled_folder)]
                     if data_section(student).get("unlabeled_root") else [])
        fit_recipe(student, [*CPU_TINY, *data, *unlabeled, *TINY_STUDENT, "--model.init_args.teacher", str(teacher)],
                   tmp_path / student.stem)
