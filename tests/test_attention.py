"""Attention extraction, rollout, the `distill attention` command and the AttentionLogger callback."""
from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from distill import DistillationLoss, DistillModule, ImageDataModule, StudentConfig, build_student
from distill.commands.attention import main as attention_main
from distill.inspect.attention import attention_maps, attention_probs, rollout
from distill.inspect.plots import figure_size

DPI = 40  # small PNGs keep the tests fast; sizes scale exactly with dpi


# --------------------------------------------------------------------------------------------- helpers
def tiny_vit(distilled: bool = True, img_size: int = 8, patch_size: int = 2, in_chans: int = 1, depth: int = 2):
    torch.manual_seed(0)
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    return build_student(name, num_classes=10, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         embed_dim=32, depth=depth, num_heads=2, drop_path_rate=0.1, distilled=distilled).eval()


def student_checkpoint(root: Path, dm: ImageDataModule, **student) -> Path:
    """A step-2 checkpoint after 2 training steps (loss mode none: no teacher needed)."""
    L.seed_everything(0)
    cfg = StudentConfig(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0, **student)
    module = DistillModule(cfg, loss=DistillationLoss("none"), lr=1e-3, warmup_epochs=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root))
    trainer.fit(module, dm)
    path = root / "student.ckpt"
    trainer.save_checkpoint(path)
    return path


def assert_png(path: Path, size_in: tuple[float, float], dpi: int = DPI) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(size_in[0] * dpi), round(size_in[1] * dpi))
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "the figure is (nearly) a single colour"


def write_digit_pngs(folder: Path, n: int = 3) -> list[Path]:
    from sklearn.datasets import load_digits

    d = load_digits()
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sub = folder / "nested" if i == n - 1 else folder
        p = sub / f"digit{i}.png"
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((24, 24)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("attn_digits")
    return student_checkpoint(root, ImageDataModule("digits", img_size=8, batch_size=32), patch_size=2)


@pytest.fixture(scope="module")
def rgb_plain_ckpt(tmp_path_factory) -> Path:
    """A plain ViT (one prefix token) on 3-channel 12x12 synthetic data with 4x4 patches."""
    root = tmp_path_factory.mktemp("attn_rgb")
    dm = ImageDataModule("synthetic", img_size=12, batch_size=16, num_samples=64, in_chans_synthetic=3)
    return student_checkpoint(root, dm, patch_size=4, name="deit_tiny_patch16_224", distilled=False)


# ------------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("distilled", [True, False])
def test_rows_sum_to_one_and_shapes(distilled):
    model = tiny_vit(distilled)
    layers = attention_probs(model, torch.randn(3, 1, 8, 8))
    n_prefix = 2 if distilled else 1
    assert len(layers) == 2
    for a in layers:
        assert a.shape == (3, 2, n_prefix + 16, n_prefix + 16)
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_matches_timm_unfused_attention():
    """The recomputed probabilities equal those timm's non-fused path materialises (captured at attn_drop)."""
    model = tiny_vit(True, img_size=12, patch_size=3, in_chans=3)
    x = torch.randn(2, 3, 12, 12)
    ours = attention_probs(model, x)

    slow = copy.deepcopy(model)
    seen = []
    for blk in slow.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    slow.forward_features(x)
    assert len(seen) == len(ours)
    for a, b in zip(ours, seen):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_model_is_left_as_it_was():
    model = tiny_vit(True).train()
    x = torch.randn(2, 1, 8, 8)
    attention_probs(model, x)
    assert model.training, "the model's mode must be restored"
    assert all(not b.attn._forward_pre_hooks for b in model.blocks), "hooks must be removed"
    assert all(b.attn.fused_attn == tiny_vit(True).blocks[0].attn.fused_attn for b in model.blocks)


def test_token_maps_and_rollout_maps():
    model = tiny_vit(True)
    maps = attention_maps(model, torch.randn(2, 1, 8, 8))
    assert maps.tokens == {"class": 0, "distillation": 1} and maps.grid == (4, 4)
    assert maps.token_map("class").shape == (2, 4, 4)
    assert maps.head_maps("distillation").shape == (2, 2, 4, 4)
    # patch share of the class row in the last block: 1 minus what goes to the two tokens
    last = maps.layers[-1].mean(1)[:, 0]
    torch.testing.assert_close(maps.token_map("class").sum((-1, -2)), 1 - last[:, :2].sum(-1))
    torch.testing.assert_close(maps.rollout_map("class").sum((-1, -2)), torch.ones(2))
    torch.testing.assert_close(maps.rollout.sum(-1), torch.ones(2, 18))
    plain = attention_maps(tiny_vit(False), torch.randn(1, 1, 8, 8))
    assert plain.tokens == {"class": 0} and plain.num_prefix_tokens == 1


# --------------------------------------------------------------------------------------------- rollout
def test_rollout_two_layer_hand_computed():
    # layer 1: two heads whose mean is [[.5,.25,.25],[0,1,0],[0,0,1]] -> 0.5*A + 0.5*I:
    #   A1' = [[.75,.125,.125],[0,1,0],[0,0,1]]
    h0 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    h1 = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # layer 2: both heads a cyclic shift -> A2' = [[.5,.5,0],[0,.5,.5],[.5,0,.5]]
    shift = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    layers = [torch.stack([h0, h1])[None], torch.stack([shift, shift])[None]]  # (1, heads, 3, 3)
    # rollout = A2' @ A1', by hand:
    expected = torch.tensor([
        [0.375, 0.5625, 0.0625],   # .5*[.75,.125,.125] + .5*[0,1,0]
        [0.0, 0.5, 0.5],           # .5*[0,1,0] + .5*[0,0,1]
        [0.375, 0.0625, 0.5625],   # .5*[.75,.125,.125] + .5*[0,0,1]
    ])
    torch.testing.assert_close(rollout(layers)[0], expected)
    torch.testing.assert_close(rollout([l[0] for l in layers]), expected)  # without a batch dimension
    # one layer: just the residual-mixed, row-normalised head mean
    torch.testing.assert_close(rollout(layers[:1])[0], torch.tensor([[0.75, 0.125, 0.125], [0, 1, 0], [0, 0, 1.0]]))


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_one_png_per_image(digits_ckpt, tmp_path, capsys):
    images = write_digit_pngs(tmp_path / "imgs")
    Image.new("RGB", (30, 20), (200, 30, 30)).save(tmp_path / "imgs" / "red.jpg")  # RGB, not square
    out = tmp_path / "out"
    rc = attention_main([str(digits_ckpt), str(tmp_path / "imgs"), "--out", str(out), "--dpi", str(DPI)])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted([p.stem + ".png" for p in images] + ["red.png"])  # nested/ included
    for name in written:
        assert_png(out / name, figure_size(num_heads=2, num_tokens=2))


def test_cli_plain_vit_rgb_layer_and_head(rgb_plain_ckpt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(img)
    (tmp_path / "b").mkdir()
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "b" / "noise.png")
    out = tmp_path / "out"
    rc = attention_main([str(rgb_plain_ckpt), str(img), str(tmp_path / "b"), "--out", str(out),
                         "--layer", "0", "--head", "1", "--dpi", str(DPI)])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["noise-2.png", "noise.png"]  # same stem: made unique
    for p in out.glob("*.png"):
        assert_png(p, figure_size(num_heads=2, num_tokens=1))


@pytest.mark.parametrize("case", ["missing_ckpt", "not_a_ckpt", "missing_image", "empty_folder", "not_an_image",
                                  "bad_layer", "bad_head", "out_is_file"])
def test_cli_errors_are_one_line(case, digits_ckpt, tmp_path, capsys):
    img = write_digit_pngs(tmp_path / "imgs", n=1)[0]
    ckpt, images, extra = str(digits_ckpt), [str(img)], []
    if case == "missing_ckpt":
        ckpt = str(tmp_path / "nope.ckpt")
    elif case == "not_a_ckpt":
        ckpt = str(tmp_path / "junk.ckpt")
        Path(ckpt).write_text("not a checkpoint")
    elif case == "missing_image":
        images = [str(tmp_path / "nope.png")]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        images = [str(tmp_path / "empty")]
    elif case == "not_an_image":
        (tmp_path / "fake.png").write_text("text")
        images = [str(tmp_path / "fake.png")]
    elif case == "bad_layer":
        extra = ["--layer", "5"]
    elif case == "bad_head":
        extra = ["--head", "2"]
    elif case == "out_is_file":
        (tmp_path / "file").write_text("")
    out = str(tmp_path / ("file" if case == "out_is_file" else "out"))
    rc = attention_main([ckpt, *images, "--out", out, *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("distill attention: error:"), err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules.*:RuntimeWarning")
def test_cli_runs_as_module(tmp_path, monkeypatch, capsys):
    """`python -m distill.commands.attention ...` (run in-process: a fresh interpreter costs ~10 s of imports)."""
    monkeypatch.setattr(sys, "argv", ["attention_cli", str(tmp_path / "missing.ckpt"), str(tmp_path), "--out", "o"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("distill.commands.attention", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


# -------------------------------------------------------------------------------------------- callback
def test_attention_logger_writes_pngs_and_logs_to_wandb(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

    from distill.inspect.callbacks import AttentionLogger

    class FakeWandb(WandbLogger):
        """A WandbLogger that records log_image calls instead of starting a W&B run."""

        def __init__(self):
            Logger.__init__(self)
            self.images = []

        name = version = property(lambda self: "fake")
        save_dir = experiment = property(lambda self: None)

        def log_hyperparams(self, *args, **kwargs): pass
        def log_metrics(self, *args, **kwargs): pass
        def after_save_checkpoint(self, *args, **kwargs): pass
        def finalize(self, *args, **kwargs): pass
        def save(self): pass

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, list(images), step))

    L.seed_everything(0)
    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    module = DistillModule(StudentConfig(patch_size=2, embed_dim=32, depth=2, num_heads=2),
                           loss=DistillationLoss("none"), warmup_epochs=0)
    wandb = FakeWandb()
    cb = AttentionLogger(every_n_epochs=2, num_images=2, dpi=DPI)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2, limit_val_batches=2,
                        num_sanity_val_steps=1, log_every_n_steps=1, callbacks=[cb], logger=[CSVLogger(tmp_path), wandb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, dm)

    root = Path(trainer.log_dir) / "attention"
    assert sorted(p.name for p in root.iterdir()) == ["epoch=001"]  # every 2nd validation, no sanity check
    pngs = sorted((root / "epoch=001").glob("*.png"))
    assert [p.name for p in pngs] == ["0.png", "1.png"]
    for p in pngs:
        assert_png(p, figure_size(num_heads=2, num_tokens=2))
    assert len(wandb.images) == 1
    key, images, step = wandb.images[0]
    assert key == "val/attention" and images == [str(p) for p in pngs] and step == trainer.global_step
    assert cb.state_dict() == {"validations": 2}
    # the fixed set is the first validation images
    torch.testing.assert_close(cb._images, torch.stack([dm.val_set[i][0] for i in range(2)]))
