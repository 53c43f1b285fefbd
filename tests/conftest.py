"""Shared fixtures: quiet CPU trainers, a tiny step-1 teacher checkpoint and a teacher trained on digits.

The two teacher fixtures are session-scoped so each is trained once per test run; tests that modify a
teacher file copy it to their own tmp_path first.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tests use tiny models, and on a shared 2-core machine two OpenMP threads per
# process oversubscribe the CPU (measured: the digits teacher took >120 s with 2 threads under load, 12 s
# with 1). DISTILL_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("DISTILL_TEST_THREADS", "1")))

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def pytest_configure(config):
    # Noise from Lightning itself, not from this package: the frozen teacher is in eval mode on purpose.
    config.addinivalue_line("filterwarnings", "ignore:.*module\\(s\\) in eval mode.*")
    config.addinivalue_line("filterwarnings", "ignore:.*LeafSpec.*")


def pytest_collection_modifyitems(config, items):
    # `gpu` tests need CUDA: skipped elsewhere, so CI on a CPU machine stays green (tools/gpu_check.sh
    # runs them on a GPU machine with `pytest -m gpu`).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a gpu test; tools/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_trainer(root: str | os.PathLike, **kwargs) -> L.Trainer:
    """A quiet single-CPU Trainer writing under `root`; keyword arguments override the defaults."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def compile_without_inductor():
    """torch.compile through dynamo and AOT autograd only, without inductor's C++ code generation (which
    takes minutes on a 2-core CPU): what a compiled CPU test needs to check graphs and recompiles."""
    config = torch._dynamo.config
    if not hasattr(config, "debug_backend_override"):  # older torch: inductor it is
        yield
        return
    with config.patch(debug_backend_override=">=0:aot_eager"):
        yield


@pytest.fixture
def trainer_factory(tmp_path):
    """`trainer_factory(**overrides)` -> a quiet CPU Trainer rooted in this test's tmp_path."""
    return functools.partial(make_trainer, tmp_path)


# Tiny architecture used wherever a test needs a teacher with BatchNorm but not a good one.
TINY_TEACHER = dict(model="cifar_resnet10", model_kwargs={"base_width": 8})
TINY_STUDENT = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0)


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tmp_path_factory) -> Path:
    """A step-1 checkpoint of TeacherModule (cifar_resnet10 at width 8) after 3 steps on digits (8x8,
    1 channel, 10 classes). Read-only: copy it before changing it."""
    from distill import ImageDataModule, TeacherModule

    root = tmp_path_factory.mktemp("tiny_teacher")
    L.seed_everything(0, workers=True)
    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    module = TeacherModule(**TINY_TEACHER)
    trainer = make_trainer(root, max_steps=3, limit_val_batches=1)
    trainer.fit(module, dm)
    path = root / "tiny_teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory) -> SimpleNamespace:
    """Step 1 through the Python API: TeacherModule('cifar_resnet18_w32') trained 8 epochs on digits at
    8x8. Returns ckpt (best checkpoint path), val_acc (logged), seconds, datamodule."""
    from distill import ImageDataModule, TeacherModule

    root = tmp_path_factory.mktemp("trained_teacher")
    L.seed_everything(0, workers=True)
    dm = ImageDataModule("digits", img_size=8, batch_size=64, seed=0)
    module = TeacherModule("cifar_resnet18_w32")
    trainer = make_trainer(root, max_epochs=8, enable_checkpointing=True)
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    ckpt = trainer.checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).is_file()
    return SimpleNamespace(
        ckpt=Path(ckpt),
        val_acc=float(trainer.callback_metrics["val/acc"]),
        metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        seconds=seconds,
        datamodule=dm,
        module=module,
    )


def _accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    return correct / total


@pytest.fixture
def accuracy_of():
    """`accuracy_of(model, loader)`: top-1 accuracy counted by hand (eval mode, no grad)."""
    return _accuracy


@pytest.fixture
def tiny_student():
    """Keyword arguments of a tiny DeiT student (patch 2, width 32, depth 1, 2 heads, no drop path)."""
    return dict(TINY_STUDENT)


@pytest.fixture
def tiny_teacher_kwargs():
    """TeacherModule keyword arguments of a tiny BatchNorm CNN (cifar_resnet10 at width 8)."""
    return {**TINY_TEACHER, "model_kwargs": dict(TINY_TEACHER["model_kwargs"])}


def load_tool(name: str):
    """A script from tools/ imported as a module (tools/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"distill_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def earlier_threads() -> set[int]:
    """The threads running now other than this one: those an earlier test left behind (wandb's service
    threads reach its server now and then). Network guards refuse their connections without blaming the test."""
    import threading

    return {t.ident for t in threading.enumerate() if t.ident is not None} - {threading.get_ident()}
