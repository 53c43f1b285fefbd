"""What only a GPU shows: bf16 with a bf16 channels_last teacher, compiled student and teacher without
recompiling, the on-device CIFAR loader on CUDA, the teacher cache built and read on CUDA, an exact
resume after SIGKILL on CUDA, and `strategy: fsdp` with the frozen teacher outside FSDP.

Every test here is marked `gpu` and skipped without CUDA (tests/conftest.py); `tools/gpu_check.sh` runs
them on a GPU machine (`pytest -m gpu`). Models are tiny: what is tested is the CUDA code path, not speed.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from distill import DistillationLoss, DistillModule, ImageDataModule, build_student, build_teacher

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
# the shared CIFAR-10 JPEG archives: where DISTILL_CIFAR10_JPEG says (tools/gpu_check.sh points it at the
# carried copy), else next to the checkout
CIFAR_ARCHIVES = Path(os.environ.get("DISTILL_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg"))


def gpu_trainer(root: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="gpu", devices=1, precision="bf16-mixed", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                   default_root_dir=str(root))
    options.update(kwargs)
    return L.Trainer(**options)


def tiny_module(in_chans: int = 3, img_size: int = 16, loss: str = "soft", **kwargs) -> DistillModule:
    torch.manual_seed(0)
    teacher = build_teacher("cifar_resnet10", num_classes=10, in_chans=in_chans, img_size=img_size, base_width=8)
    student = build_student(num_classes=10, img_size=img_size, patch_size=4, in_chans=in_chans, embed_dim=32,
                            depth=1, num_heads=2)
    return DistillModule(student, teacher, DistillationLoss(loss, 0.5, tau=2.0), warmup_epochs=0, **kwargs)


# ------------------------------------------------------------------------------------ bf16, compile
def test_bf16_fit_with_a_bf16_channels_last_teacher(tmp_path):
    module = tiny_module(teacher_channels_last=True)  # teacher_dtype unset: bfloat16 under bf16-mixed
    dm = ImageDataModule("synthetic", img_size=16, batch_size=32, num_samples=320)
    trainer = gpu_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, dm)
    teacher_params = list(module.teacher.parameters())
    assert {(p.device.type, p.dtype) for p in teacher_params} == {("cuda", torch.bfloat16)}
    convs = [p for p in teacher_params if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert {(p.device.type, p.dtype) for p in module.student.parameters()} == {("cuda", torch.float32)}
    x = next(iter(dm.val_dataloader()))[0].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert module.teacher(x).dtype == torch.bfloat16
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0.0 <= float(trainer.callback_metrics["val/acc_teacher"]) <= 1.0


def test_compiled_student_and_teacher_do_not_recompile_over_20_steps(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = tiny_module(compile_student=True, compile_teacher=True, teacher_channels_last=True)
    # 160 training images in batches of 20 (8 a epoch, drop_last) and 40 validation images (2 batches): one
    # shape throughout, validated between epochs
    dm = ImageDataModule("synthetic", img_size=16, batch_size=20, num_samples=200)
    trainer = gpu_trainer(tmp_path, max_steps=20)
    trainer.fit(module, dm)
    assert trainer.global_step == 20
    # one graph for the student's training forward, one for the teacher's (always in eval mode)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


# ------------------------------------------------------------------------------- on-device CIFAR data
def cifar_folder(root: Path, per_class: dict[str, int]) -> Path:
    """An ImageFolder tree of real CIFAR-10 test JPEGs (`per_class[split]` images of each class and split),
    or of random 32x32 JPEGs where the shared archive is absent."""
    from PIL import Image

    archive = CIFAR_ARCHIVES / "cifar10-test.tar.gz"
    needed = sum(per_class.values())
    pools: dict[str, list[bytes]] = {}
    if archive.is_file():
        with tarfile.open(archive) as tar:
            for m in tar:
                parts = m.name.split("/")
                if m.isfile() and len(parts) == 3 and len(pools.setdefault(parts[1], [])) < needed:
                    pools[parts[1]].append(tar.extractfile(m).read())
                if len(pools) == 10 and all(len(v) >= needed for v in pools.values()):
                    break
    else:
        rng = np.random.default_rng(0)
        for c in range(10):
            for _ in range(needed):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                pools.setdefault(f"class{c}", []).append(buf.getvalue())
    for name, files in pools.items():
        start = 0
        for split, n in per_class.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(files[start:start + n]):
                (root / split / name / f"{i:04d}.jpg").write_bytes(data)
            start += n
    return root


def test_on_device_cifar_loader_on_cuda(tmp_path):
    from distill.data.device_loader import DeviceImageLoader

    root = cifar_folder(tmp_path / "cifar", {"train": 20, "val": 5})
    dm = ImageDataModule("imagefolder", root=str(root), img_size=32, batch_size=50, mean=CIFAR_MEAN, std=CIFAR_STD,
                         crop="pad", hflip=0.5, re_prob=0.25, mixup=0.8, cutmix=1.0, on_device=True)
    module = tiny_module(img_size=32, loss="hard", teacher_channels_last=True)
    trainer = gpu_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, dm)
    loader = dm._device_train
    assert loader.images.device.type == "cuda" and loader.images.dtype == torch.uint8
    assert loader.images.shape == (200, 3, 32, 32) and len(loader) == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/acc" in trainer.callback_metrics

    # the views CUDA draws are the CPU's: crops, flips and erasing come from a hash of (seed, view, index)
    images, targets = loader.images.cpu(), loader.targets_dev.cpu()
    kwargs = dict(crop="pad", hflip=0.5, re_prob=0.25, seed=3, keyed=True, view_epochs=2)
    on_gpu = DeviceImageLoader(images, targets, 64, CIFAR_MEAN, CIFAR_STD, device="cuda", **kwargs)
    on_cpu = DeviceImageLoader(images, targets, 64, CIFAR_MEAN, CIFAR_STD, device="cpu", **kwargs)
    on_gpu.set_epoch(3), on_cpu.set_epoch(3)
    for (xg, yg, kg), (xc, yc, kc) in zip(on_gpu, on_cpu):
        assert xg.device.type == "cuda" and np.array_equal(kg, kc) and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-4)
    # and a view replays bit-identically on CUDA (what the teacher cache keys on)
    first = {int(k[0]): img for xb, _, keys in on_gpu for img, k in zip(xb, keys)}
    replay = {int(k[0]): img for xb, _, keys in on_gpu.view_batches(2, batch_size=37) for img, k in zip(xb, keys)
              if k[1] == 1}
    assert len(first) == 192 and first.keys() <= replay.keys()  # 3 full batches of 64 (drop_last)
    assert all(torch.equal(first[i], replay[i]) for i in first)


# ------------------------------------------------------------------------------------- teacher cache
def test_teacher_cache_built_and_read_on_cuda(tmp_path):
    from distill.teacher.cache import TeacherCache, TeacherCacheConfig

    cache_dir = tmp_path / "cache"

    def fit(build: bool):
        teacher_net = tiny_module(img_size=32).teacher.network  # the same weights each time (seed 0)
        torch.manual_seed(1)
        student = build_student(num_classes=10, img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=1,
                                num_heads=2)
        module = DistillModule(student, teacher_net, DistillationLoss("hard", 0.5), warmup_epochs=0,
                               teacher_channels_last=True,
                               teacher_cache=TeacherCacheConfig(dir=str(cache_dir), build=build, verify_batches=2))
        dm = ImageDataModule("synthetic", img_size=32, batch_size=32, num_samples=160, crop="pad", hflip=0.5,
                             on_device=True, keyed_views=True, view_epochs=1)
        calls = []
        hook = module.teacher.network.register_forward_hook(lambda *a: calls.append(1))
        trainer = gpu_trainer(tmp_path / f"run-{build}", max_epochs=2, limit_val_batches=0)
        trainer.fit(module, dm)
        hook.remove()
        return module, trainer, len(calls)

    module, trainer, live_calls = fit(build=True)
    cache = TeacherCache(cache_dir)
    assert (cache.manifest["precision"], cache.built_views(), cache.manifest["num_samples"]) == ("bf16-mixed", [0], 128)
    assert "DeviceImageLoader" in cache.manifest["transform"]
    # the build pass (128 images in batches of 32) and the 2 verified batches ran the teacher; the other
    # 6 of the 8 training steps read the cache
    assert live_calls == 4 + 2 and module.teacher.cache is not None and module.teacher.cache.to_verify == 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])

    again, _, calls = fit(build=False)  # read, not rebuilt: build=false would fail on a missing cache
    assert calls == 2 and again.teacher.cache is not None
    keys = np.stack([np.arange(128), np.zeros(128, dtype=np.int64)], 1)
    z = cache.logits(keys, "cuda")
    assert z.device.type == "cuda" and z.shape == (128, 10) and torch.isfinite(z).all()


# ----------------------------------------------------------------------------------- exact resume
def test_student_resumes_after_sigkill_on_cuda_bit_identically(tmp_path, tiny_teacher_ckpt):
    """The CPU test of test_resume.py on CUDA, bf16: keyed views with RandAugment, mixup/cutmix, EMA,
    drop path, `trainer.deterministic`; killed two steps into epoch 1, after a step checkpoint."""
    from test_resume import STUDENT, QUIET, assert_same_weights, distill_fit, load

    common = [
        "--config", STUDENT, *QUIET, "--model.init_args.teacher", str(tiny_teacher_ckpt),
        "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
        "--model.init_args.student.depth", "2", "--model.init_args.student.embed_dim", "32",
        "--model.init_args.student.num_heads", "2", "--model.init_args.student.drop_path_rate", "0.2",
        "--model.init_args.ema_decay", "0.9", "--model.init_args.warmup_epochs", "1",
        "--model.init_args.teacher_channels_last", "true",
        "--data.keyed_views", "true", "--data.auto_augment", "rand-m9-n2-inc1", "--data.mixup", "0.8",
        "--data.cutmix", "1.0", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6",
        "--trainer.limit_val_batches", "2", "--trainer.deterministic", "true", "--checkpoint.every_n_train_steps", "4",
    ]
    clean = distill_fit(*common, root=tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = distill_fit(*common, "--trainer.callbacks", '[{"class_path": "killer.KillAtStep", "init_args": {"step": 10}}]',
                         root=tmp_path / "killed")
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 8
    resumed = distill_fit(*common, "--ckpt_path", "last", root=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load(tmp_path / "clean" / "checkpoints" / "last.ckpt"), load(last)
    assert a["global_step"] == b["global_step"] == 12
    assert_same_weights(a, b)
    assert a["distill_run"]["metrics"] == b["distill_run"]["metrics"]


# ------------------------------------------------------------------------------------------- FSDP
def test_fsdp_on_one_gpu_keeps_the_teacher_out_of_sharding_and_out_of_the_checkpoint(tmp_path, tiny_teacher_ckpt):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from distill import load_student

    def fit(max_steps: int, ckpt_path=None):
        torch.manual_seed(0)
        module = DistillModule(dict(patch_size=2, embed_dim=32, depth=1, num_heads=2), str(tiny_teacher_ckpt),
                               DistillationLoss("hard", 0.5), warmup_epochs=0)
        dm = ImageDataModule("digits", img_size=8, batch_size=32)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
        trainer = gpu_trainer(tmp_path, strategy="fsdp", max_steps=max_steps, limit_val_batches=2,
                              enable_checkpointing=True, callbacks=[ckpt])
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return module, trainer

    try:
        module, trainer = fit(4)
        wrapped = trainer.strategy.model
        assert isinstance(wrapped, FSDP)
        flattened = [fqn for unit in FSDP.fsdp_modules(wrapped) for handle in unit._all_handles
                     for fqn in handle.flat_param._fqns]
        assert any(f.startswith("student.") for f in flattened)
        assert not any(f.startswith("teacher.") for f in flattened), [f for f in flattened if "teacher" in f][:3]
        assert {(p.device.type, p.dtype) for p in module.teacher.parameters()} == {("cuda", torch.bfloat16)}
        assert torch.isfinite(trainer.callback_metrics["train/loss"])

        last = tmp_path / "checkpoints" / "last.ckpt"
        saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
        assert not [k for k in saved if k.startswith("teacher.")]
        assert {k for k in saved if k.startswith("student.")} == {f"student.{k}" for k in module.student.state_dict()}
        student = load_student(last)
        assert torch.isfinite(student(torch.zeros(2, 1, 8, 8))[0]).all()

        # and an FSDP run resumes from that checkpoint (strict loading without the teacher's weights)
        _, resumed = fit(6, ckpt_path=str(last))
        assert resumed.global_step == 6
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
