#!/usr/bin/env python
"""Training throughput of the distillation step: the project's DistillModule driven by a Lightning
Trainer against a plain PyTorch loop written the way DeiT's reference engine does it, on the same
models, batch, precision and device, alternating rounds in one process.

    # CPU (default preset: DeiT-tiny width, depth 12, 32px patch 4, CIFAR ResNet-18 teacher, batch 32)
    python tools/bench.py --threads 1 --warmup 2 --steps 10 --rounds 5 --json results/bench_cpu.json
    # Lightning's per-step host overhead, immune to other processes (thread CPU time, tiny model)
    python tools/bench.py --preset tiny --threads 1 --clock thread --warmup 10 --steps 40
    # one H100/H200: DeiT-S + RegNetY-16GF at 224px, batch 256, bf16
    python tools/bench.py --preset gpu --json results/bench_gpu.json
    # one H100/H200: a CIFAR-10 epoch (50,000 images) from the on-device dataset
    python tools/bench.py --mode epoch --preset cifar-epoch --json results/bench_gpu_epoch.json
    # ... on the real CIFAR-10 JPEG files (an ImageFolder tree, e.g. from tools/prepare_cifar10.py), compiled
    python tools/bench.py --mode epoch --data-root data/cifar10-jpeg --compile --configs student,live

Step mode measures, per round (median img/s over the timed steps of all rounds):
  lightning   DistillModule.training_step under `lightning.Trainer` (live teacher); timed from one
              `on_train_batch_start` to the next, so every per-step cost of the loop is included
  plain       DeiT engine style: student forward, teacher forward under no_grad, loss,
              `loss.item()` + isfinite check, zero_grad, backward, AdamW step, scheduler step
  teacher     the teacher's forward alone (no_grad, same precision)
  student     the plain step with the teacher's logits precomputed (what a perfect cache costs)
  cached      DistillModule with `teacher_cache` (stored top-k logits read from a memory map)
Both sides read the same pre-built batches from the device (data loading is not measured), use the
same AdamW (fused on CUDA) and the same autocast. On CUDA each step starts with a synchronize.
FLOPs come from `torch.utils.flop_counter` (matmuls, convolutions, attention); MFU needs
`--peak-tflops` (or a known GPU: H100/H200 SXM bf16 dense = 989.4).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from distill import DistillationLoss, DistillModule, build_student, build_teacher  # noqa: E402
from distill.models.meta import model_meta  # noqa: E402
from distill.teacher.cache import (  # noqa: E402
    TeacherCacheConfig, build_cache, precision_name, teacher_fields, weights_sha256, write_manifest,
)
from distill.training.optim import adamw, warmup_cosine  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # A meaningful small DeiT for a CPU: DeiT-tiny (width 192, depth 12, 3 heads) at 32px with patch 4
    # (64 tokens), batch 32: about 2 s per step on 2 cores.
    "cpu": dict(student="deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, embed_dim=192, depth=12,
                num_heads=3, teacher="cifar_resnet18", num_classes=10, batch=32, precision="32-true"),
    # The GPU set-up: DeiT-S student, RegNetY-16GF teacher, 224px, batch 256, bf16.
    "gpu": dict(student="deit_small_distilled_patch16_224", img_size=224, patch_size=None, embed_dim=None,
                depth=None, num_heads=None, teacher="regnety_160", num_classes=1000, batch=256,
                precision="bf16-mixed"),
    # Seconds on a CPU: for tests.
    "tiny": dict(student="deit_tiny_distilled_patch16_224", img_size=8, patch_size=2, embed_dim=32, depth=1,
                 num_heads=2, teacher="cifar_resnet10", teacher_kwargs={"base_width": 8}, num_classes=10, batch=8,
                 precision="32-true"),
    # CIFAR-10 epoch on device data: DeiT-tiny width, patch 4, CIFAR ResNet-18 teacher, bf16.
    "cifar-epoch": dict(student="deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, embed_dim=192,
                        depth=12, num_heads=3, teacher="cifar_resnet18", num_classes=10, batch=512,
                        precision="bf16-mixed", num_images=50_000),
}

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used when --peak-tflops is not given.
KNOWN_PEAKS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0)]


# ------------------------------------------------------------------------------------------- helpers
def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision in ("32-true", "32"):
        return contextlib.nullcontext
    if precision not in ("bf16-mixed", "16-mixed"):
        raise ValueError(f"--precision {precision!r}: use 32-true, bf16-mixed or 16-mixed")
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _median_rate(times: list[float], batch: int) -> float:
    return batch / statistics.median(times) if times else float("nan")


class Cycle:
    """An endless iterable over pre-built batches (no __len__: Lightning runs `max_steps`)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return itertools.cycle(self.batches)


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


class StepTimer(L.Callback):
    """Time between consecutive `on_train_batch_start` calls (synchronised on CUDA)."""

    def __init__(self, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> None:
        self.sync, self.clock, self.starts = sync, clock, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sync()
        self.starts.append(self.clock())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


class EpochTimer(L.Callback):
    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.seconds, self._t0 = sync, [], 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.sync()
        self.seconds.append(time.perf_counter() - self._t0)


def _trainer(device: torch.device, precision: str, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=callbacks, benchmark=True if device.type == "cuda" else None,
        default_root_dir=tempfile.gettempdir(), **kwargs,
    )


def _teacher_cast(dtype: str | None, precision: str) -> torch.dtype | None:
    """The dtype DistillModule keeps the teacher in (`teacher_dtype`; bfloat16 under bf16-mixed), None for float32."""
    name = dtype if dtype is not None else ("bfloat16" if precision == "bf16-mixed" else None)
    return getattr(torch, name) if name and name != "float32" else None


def _cache_precision(cfg: dict[str, Any]) -> str:
    """The precision a cache built here records: what the DistillModule reading it computes (the cache
    refuses another)."""
    trainer_precision = "32-true" if cfg["precision"] == "32" else cfg["precision"]
    return precision_name(trainer_precision, _teacher_cast(cfg["teacher_dtype"], cfg["precision"]))


def _prepare_teacher(teacher: torch.nn.Module, dtype: str | None, channels_last: bool, compile_: bool,
                     precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain loop's teacher with the same speed options DistillModule applies."""
    cast = _teacher_cast(dtype, precision)
    if cast is not None:
        teacher.to(dtype=cast)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    if compile_:
        teacher.compile()

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        if cast is not None:
            x = x.to(cast)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return teacher(x)

    return forward


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _peak(device: torch.device, precision: str, peak: float | None) -> float | None:
    if peak is not None or device.type != "cuda" or precision == "32-true":
        return peak
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in KNOWN_PEAKS if key in name), None)


def _models(cfg: dict[str, Any], device: torch.device):
    torch.manual_seed(cfg["seed"])
    student = build_student(cfg["student"], num_classes=cfg["num_classes"], img_size=cfg["img_size"],
                            patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                            num_heads=cfg["num_heads"], drop_path_rate=0.1).to(device)
    teacher = build_teacher(cfg["teacher"], cfg["num_classes"], img_size=cfg["img_size"],
                            **(cfg.get("teacher_kwargs") or {})).to(device).eval().requires_grad_(False)
    return student, teacher


def _config(preset: str | None, device: torch.device, overrides: dict[str, Any]) -> dict[str, Any]:
    preset = preset or ("gpu" if device.type == "cuda" else "cpu")
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset], preset=preset, loss="hard", alpha=0.5, tau=1.0, seed=0, lr=5e-4, weight_decay=0.05,
               teacher_dtype=None, teacher_channels_last=device.type == "cuda", compile_student=False,
               compile_teacher=False, cache_topk=10, cache_dtype="float16")
    cfg.update(overrides)
    return cfg


def _module(cfg: dict[str, Any], student, teacher, cache: TeacherCacheConfig | None = None) -> DistillModule:
    return DistillModule(
        student=student, teacher=teacher, loss=DistillationLoss(cfg["loss"], alpha=cfg["alpha"], tau=cfg["tau"]),
        lr=cfg["lr"], weight_decay=cfg["weight_decay"], warmup_epochs=0.0, teacher_dtype=cfg["teacher_dtype"],
        teacher_channels_last=cfg["teacher_channels_last"], compile_student=cfg["compile_student"],
        compile_teacher=cfg["compile_teacher"], teacher_cache=cache,
    )


# ----------------------------------------------------------------------------------------- step mode
def run_bench(*args: Any, threads: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Runs the step benchmark and returns (and optionally writes as JSON) its figures; `threads` sets
    torch's intra-op threads for the run (1 gives steadier numbers on a shared, busy CPU).

    Keyword arguments: preset, device, warmup, steps, rounds, distinct_batches, parts, cache,
    peak_tflops, json_path, quiet, and preset fields to override: student, teacher, img_size,
    patch_size, embed_dim, depth, num_heads, num_classes, batch, precision, loss, teacher_dtype,
    teacher_channels_last, compile_student, compile_teacher, cache_topk, cache_dtype, seed.
    """
    with _threads(threads):
        return _run_bench(*args, **kwargs)


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_bench(
    preset: str | None = None,
    device: str = "auto",
    warmup: int = 3,
    steps: int = 10,
    rounds: int = 3,
    distinct_batches: int = 4,
    parts: bool = True,
    cache: bool = True,
    peak_tflops: float | None = None,
    json_path: str | os.PathLike | None = None,
    quiet: bool = False,
    clock: str = "wall",
    **overrides: Any,
) -> dict[str, Any]:
    dev = _device(device)
    cfg = _config(preset, dev, overrides)
    clock_name, clock = clock, CLOCKS[clock]
    if clock_name == "thread" and (dev.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("--clock thread (this thread's CPU time) measures a CPU run with --threads 1 only")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|in eval mode|LeafSpec|GPU available).*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)

    B, C, S = cfg["batch"], cfg["num_classes"], cfg["img_size"]
    student, teacher = _models(cfg, dev)
    autocast, sync = _autocast(dev, cfg["precision"]), _sync(dev)
    g = torch.Generator().manual_seed(cfg["seed"])
    batches = []
    for b in range(distinct_batches):
        x = torch.randn(B, 3, S, S, generator=g).to(dev)
        y = torch.randint(0, C, (B,), generator=g).to(dev)
        keys = np.stack([np.arange(b * B, (b + 1) * B), np.zeros(B, dtype=np.int64)], 1).astype(np.int64)
        batches.append((x, y, keys))
    plain_batches = [(x, y) for x, y, _ in batches]

    # FLOPs per image (uncompiled copies, 2 images, before any dtype change)
    probe = copy.deepcopy(student).train()
    x2 = batches[0][0][:2]

    def student_step() -> None:
        with autocast():
            out = probe(x2)
            loss = sum(o.float().sum() for o in (out if isinstance(out, (tuple, list)) else (out,)))
        loss.backward()

    flops_student = count_flops(student_step) / 2
    with torch.no_grad(), autocast():
        flops_teacher = count_flops(lambda: teacher(x2)) / 2
    del probe

    loss_fn = DistillationLoss(cfg["loss"], alpha=cfg["alpha"], tau=cfg["tau"])
    # Each side trains its own copy of the same initial student; each has its own teacher copy so that
    # speed options (dtype, channels_last, compile) are applied by the side that uses it.
    student_l, student_p = copy.deepcopy(student), copy.deepcopy(student)
    teacher_l = copy.deepcopy(teacher)
    teacher_fn = _prepare_teacher(teacher, cfg["teacher_dtype"], cfg["teacher_channels_last"],
                                  cfg["compile_teacher"], cfg["precision"])
    if cfg["compile_student"]:
        student_p.compile()
    module = _module(cfg, student_l, teacher_l)

    cached_module, cache_dir = None, None
    if cache:
        cache_dir = tempfile.mkdtemp(prefix="distill-bench-cache-")
        teacher_c = copy.deepcopy(teacher_l)
        identity = dict(weights_sha256=weights_sha256(teacher_c), architecture=model_meta(teacher_c)["name"],
                        num_classes=C)
        build_cache(cache_dir, teacher_fn, batches, num_samples=distinct_batches * B, num_classes=C, views=1,
                    topk=cfg["cache_topk"], dtype=cfg["cache_dtype"], device=dev, autocast=autocast)
        k = min(cfg["cache_topk"], C) if cfg["cache_topk"] else None
        write_manifest(cache_dir, dict(teacher=teacher_fields(identity, torch.nn.Identity()),
                                       precision=_cache_precision(cfg)),
                       num_samples=distinct_batches * B, num_classes=C, topk=k, dtype=cfg["cache_dtype"],
                       world_size=1)
        cached_module = _module(cfg, copy.deepcopy(student), teacher_c,
                                TeacherCacheConfig(dir=cache_dir, topk=cfg["cache_topk"], dtype=cfg["cache_dtype"],
                                                   build=False, verify_batches=1))

    # precomputed teacher logits for the student-only step
    with torch.no_grad(), autocast():
        z_fixed = [teacher_fn(x) for x, _ in plain_batches]

    def plain_round(n: int, with_teacher: bool) -> list[float]:
        opt = adamw(student_p, cfg["lr"], cfg["weight_decay"])
        sched = warmup_cosine(opt, 10**9, 0)
        scaler = torch.amp.GradScaler(dev.type, enabled=cfg["precision"] == "16-mixed")
        student_p.train()
        it = iter(Cycle(list(zip(plain_batches, z_fixed))))
        starts = []
        for _ in range(n):
            sync()
            starts.append(clock())
            (x, y), z = next(it)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with autocast():
                out = student_p(x)
                z_t = teacher_fn(x) if with_teacher else z
                loss = loss_fn(out, z_t, y).total
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"plain loop: loss is {loss_value}")
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        sync()
        return [b - a for a, b in zip(starts, starts[1:])]

    def teacher_round(n: int) -> list[float]:
        starts = []
        it = iter(Cycle(plain_batches))
        for _ in range(n):
            sync()
            starts.append(clock())
            x, _ = next(it)
            with autocast():
                teacher_fn(x)
        sync()
        return [b - a for a, b in zip(starts, starts[1:])]

    def lightning_round(mod: DistillModule, data: list, n: int) -> list[float]:
        timer = StepTimer(sync, clock)
        trainer = _trainer(dev, cfg["precision"], [timer], max_steps=n)
        trainer.fit(mod, train_dataloaders=Cycle(data))
        return timer.intervals()

    n = warmup + steps + 1
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    times: dict[str, list[float]] = {k: [] for k in ("lightning", "plain", "teacher", "student", "cached")}
    per_round = []
    t_start = time.perf_counter()
    for r in range(rounds):
        lt = lightning_round(module, plain_batches, n)[-steps:]
        pt = plain_round(n, with_teacher=True)[-steps:]
        times["lightning"] += lt
        times["plain"] += pt
        per_round.append(statistics.median(pt) / statistics.median(lt))
        if parts:
            times["teacher"] += teacher_round(n)[-steps:]
            times["student"] += plain_round(n, with_teacher=False)[-steps:]
        if cached_module is not None:
            times["cached"] += lightning_round(cached_module, batches, n)[-steps:]
        log(f"  round {r + 1}/{rounds}: lightning {_median_rate(lt, B):.1f} img/s, plain {_median_rate(pt, B):.1f} img/s "
            f"({time.perf_counter() - t_start:.0f} s)")

    rates = {k: _median_rate(v, B) for k, v in times.items() if v}
    step_ms = {k: 1e3 * statistics.median(v) for k, v in times.items() if v}
    peak = _peak(dev, cfg["precision"], peak_tflops)
    tflops = {}
    if "student" in rates:
        tflops["student_step"] = flops_student * rates["student"] / 1e12
    tflops["lightning_step"] = (flops_student + flops_teacher) * rates["lightning"] / 1e12
    tflops["plain_step"] = (flops_student + flops_teacher) * rates["plain"] / 1e12
    if "teacher" in rates:
        tflops["teacher_forward"] = flops_teacher * rates["teacher"] / 1e12
    if "cached" in rates:
        tflops["cached_step"] = flops_student * rates["cached"] / 1e12
    result: dict[str, Any] = dict(
        mode="step",
        config={k: v for k, v in cfg.items()} | dict(warmup=warmup, steps=steps, rounds=rounds,
                                                      distinct_batches=distinct_batches, clock=clock_name),
        device=_device_name(dev),
        versions=dict(torch=torch.__version__, lightning=L.__version__, python=platform.python_version()),
        threads=torch.get_num_threads(),
        load_average=dict(start=load_start, end=list(os.getloadavg())) if hasattr(os, "getloadavg") else None,
        img_per_s=rates,
        step_ms=step_ms,
        ratio=rates["lightning"] / rates["plain"],
        ratio_per_round=per_round,
        teacher_share=(step_ms["teacher"] / step_ms["plain"]) if "teacher" in step_ms else None,
        teacher_share_by_difference=(1 - step_ms["student"] / step_ms["plain"]) if "student" in step_ms else None,
        cache_speedup=(rates["cached"] / rates["lightning"]) if "cached" in rates else None,
        flops_per_img=dict(student_train=flops_student, teacher_forward=flops_teacher),
        tflops=tflops,
        peak_tflops=peak,
        mfu={k: v / peak for k, v in tflops.items()} if peak else None,
        seconds=time.perf_counter() - t_start,
    )
    if cache_dir:
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
    log(format_table(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def format_table(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"device {r['device']}, {c['precision']}, batch {c['batch']}, student {c['student']} "
        f"(img {c['img_size']}, patch {c['patch_size']}, dim {c['embed_dim']}, depth {c['depth']}), teacher {c['teacher']}",
        f"{'':34s}{'img/s':>10s}{'ms/step':>10s}{'TFLOP/s':>10s}" + (f"{'MFU':>8s}" if r.get("mfu") else ""),
    ]
    names = dict(lightning=("lightning step (live teacher)", "lightning_step"),
                 plain=("plain DeiT loop (live teacher)", "plain_step"),
                 teacher=("teacher forward alone", "teacher_forward"),
                 student=("student step, no teacher", "student_step"),
                 cached=("lightning step + teacher cache", "cached_step"))
    for key, (label, fl) in names.items():
        if key not in r["img_per_s"]:
            continue
        tf = r["tflops"].get(fl)
        mfu = f"{100 * r['mfu'][fl]:7.1f}%" if r.get("mfu") and fl in r["mfu"] else ""
        lines.append(f"{label:34s}{r['img_per_s'][key]:10.1f}{r['step_ms'][key]:10.2f}"
                     f"{(tf if tf is not None else float('nan')):10.3f}{mfu}")
    lines.append(f"ratio lightning / plain: {r['ratio']:.3f} (per round: "
                 f"{', '.join(f'{v:.3f}' for v in r['ratio_per_round'])})")
    if r.get("teacher_share") is not None:
        lines.append(f"teacher share of the step: {100 * r['teacher_share']:.1f}% (forward alone / plain step; "
                     f"by difference with the student-only step: {100 * r['teacher_share_by_difference']:.1f}%)")
    if r.get("cache_speedup") is not None:
        lines.append(f"teacher cache speed-up over the live-teacher lightning step: {r['cache_speedup']:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- epoch mode
def run_epoch_bench(*args: Any, threads: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Seconds per training epoch (the last of `epochs`; the first warms up) of DistillModule under a
    Trainer fed by `DeviceImageLoader` (crop + flip on the device): `student` (no teacher term),
    `live` (live teacher), `cached` (teacher cache with one keyed view)."""
    with _threads(threads):
        return _run_epoch_bench(*args, **kwargs)


def _run_epoch_bench(
    preset: str = "cifar-epoch",
    device: str = "auto",
    num_images: int | None = None,
    data_root: str | None = None,
    epochs: int = 2,
    configs: tuple[str, ...] = ("student", "live", "cached"),
    json_path: str | os.PathLike | None = None,
    quiet: bool = False,
    num_workers: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    from distill.data.device_loader import DeviceImageLoader

    dev = _device(device)
    cfg = _config(preset, dev, overrides)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|in eval mode|LeafSpec|GPU available|"
                                              r"IterableDataset|train_dataloader).*")
    unknown = set(configs) - {"student", "live", "cached"}
    if unknown or not configs:
        raise ValueError(f"--configs {','.join(configs)}: choose among student, live, cached")
    n, S, C = int(num_images or cfg.get("num_images", 50_000)), cfg["img_size"], cfg["num_classes"]
    decode_seconds = None
    if data_root:
        t0 = time.perf_counter()
        images, targets = _decode_training_images(Path(data_root), n, S, num_workers)
        decode_seconds = time.perf_counter() - t0
        n = len(targets)
        log(f"  decoded {n} training images of {data_root} in {decode_seconds:.1f} s")
    else:
        g = torch.Generator().manual_seed(cfg["seed"])
        images = torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)
        targets = torch.randint(0, C, (n,), generator=g)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    autocast, sync = _autocast(dev, cfg["precision"]), _sync(dev)
    student, teacher = _models(cfg, dev)
    result: dict[str, Any] = dict(mode="epoch", config=cfg | dict(num_images=n, epochs=epochs, data_root=data_root,
                                                                  configs=list(configs)),
                                  device=_device_name(dev), versions=dict(torch=torch.__version__,
                                                                          lightning=L.__version__),
                                  decode_seconds=decode_seconds, epoch_seconds={}, img_per_s={},
                                  first_epoch_seconds={})
    for name in configs:
        keyed = name == "cached"
        loader = DeviceImageLoader(images, targets, cfg["batch"], mean, std, train=True, crop="pad", hflip=0.5,
                                   seed=cfg["seed"], keyed=keyed, view_epochs=1 if keyed else None, device=dev)
        c = dict(cfg, loss="none") if name == "student" else cfg
        t = copy.deepcopy(teacher)
        cache_cfg = None
        if keyed:
            cache_dir = tempfile.mkdtemp(prefix="distill-bench-epoch-cache-")
            fn = _prepare_teacher(copy.deepcopy(teacher), cfg["teacher_dtype"], cfg["teacher_channels_last"], False,
                                  cfg["precision"])
            build_cache(cache_dir, fn, loader.view_batches(1), num_samples=n, num_classes=C, views=1,
                        topk=cfg["cache_topk"], dtype=cfg["cache_dtype"], device=dev, autocast=autocast)
            identity = dict(weights_sha256=weights_sha256(t), architecture=model_meta(t)["name"], num_classes=C)
            write_manifest(cache_dir, dict(teacher=teacher_fields(identity, torch.nn.Identity()),
                                           precision=_cache_precision(cfg)), num_samples=n, num_classes=C,
                           topk=min(cfg["cache_topk"], C) if cfg["cache_topk"] else None, dtype=cfg["cache_dtype"],
                           world_size=1)
            cache_cfg = TeacherCacheConfig(dir=cache_dir, topk=cfg["cache_topk"], dtype=cfg["cache_dtype"], build=False,
                                           verify_batches=1)
        module = _module(c, copy.deepcopy(student), t, cache_cfg)
        timer = EpochTimer(sync)
        trainer = _trainer(dev, cfg["precision"], [timer], max_epochs=epochs)
        trainer.fit(module, train_dataloaders=loader)
        sec = timer.seconds[-1]
        result["epoch_seconds"][name] = sec
        result["first_epoch_seconds"][name] = timer.seconds[0]  # with compilation and warm-up
        result["img_per_s"][name] = len(loader) * cfg["batch"] / sec
        log(f"  {name:8s} epoch of {len(loader) * cfg['batch']} images: {sec:.2f} s "
            f"({result['img_per_s'][name]:.0f} img/s)")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _decode_training_images(root: Path, n: int, img_size: int, num_workers: int | None):
    """The first `n` training images (all classes, spread evenly) of a CIFAR-10 folder as uint8
    `(N, 3, S, S)` and labels: an ImageFolder tree (`root/train/<class>/*.jpg`, the shared JPEG set) or
    torchvision's CIFAR-10 batches (`root/cifar-10-batches-py`)."""
    from distill.data.device_loader import decode_uint8

    if not (root / "train").is_dir():
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(str(root), train=True, download=False)
        order = _spread(len(ds.targets), n)
        return torch.from_numpy(ds.data[order]).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)[order]
    from torchvision import transforms as T

    from distill.data.datasets import ImageFolderDataset

    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    ds = ImageFolderDataset(root / "train", classes, "RGB", T.Compose([T.Resize(img_size), T.CenterCrop(img_size),
                                                                      T.PILToTensor()]))
    if n < len(ds):
        order = _spread(len(ds), n)
        ds.samples = [ds.samples[int(i)] for i in order]
        ds.targets = [ds.targets[int(i)] for i in order]
    return decode_uint8(ds, num_workers=min(8, os.cpu_count() or 1) if num_workers is None else num_workers)


def _spread(total: int, n: int) -> np.ndarray:
    """`n` indices spread evenly over `total` (every class of a class-sorted folder), in order."""
    return np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(np.int64))


# ------------------------------------------------------------------------------------------------ CLI
def _none_or_int(v: str) -> int | None:
    return None if v.lower() == "none" else int(v)


OVERRIDES = ("student", "teacher", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes", "batch",
             "precision", "loss", "teacher_dtype", "teacher_channels_last", "cache_topk")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    unset = argparse.SUPPRESS  # preset fields only change when the flag is given ("none" = the named model's)
    p.add_argument("--mode", choices=("step", "epoch"), default="step")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="model set-up; default: cpu on a CPU, gpu on CUDA (step mode), cifar-epoch (epoch mode)")
    p.add_argument("--device", default="auto")
    p.add_argument("--student", default=unset)
    p.add_argument("--teacher", default=unset)
    p.add_argument("--img-size", type=int, default=unset)
    p.add_argument("--patch-size", type=_none_or_int, default=unset)
    p.add_argument("--embed-dim", type=_none_or_int, default=unset)
    p.add_argument("--depth", type=_none_or_int, default=unset)
    p.add_argument("--num-heads", type=_none_or_int, default=unset)
    p.add_argument("--num-classes", type=int, default=unset)
    p.add_argument("--batch", type=int, default=unset)
    p.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default=unset)
    p.add_argument("--loss", choices=("hard", "soft"), default=unset)
    p.add_argument("--teacher-dtype", choices=("float32", "bfloat16", "float16"), default=unset)
    p.add_argument("--teacher-channels-last", type=lambda v: v.lower() in ("1", "true", "yes"), default=unset,
                   help="true/false (default: true on CUDA)")
    p.add_argument("--cache-topk", type=_none_or_int, default=unset, help="classes stored per view (none = all)")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (both sides)")
    p.add_argument("--compile-student", action="store_true",
                   help="torch.compile the student only (both sides): the compiled student's MFU without the "
                        "minutes a large teacher takes to compile")
    p.add_argument("--no-cache", action="store_true", help="skip the teacher-cache measurement")
    p.add_argument("--no-parts", action="store_true", help="skip teacher-alone and student-alone measurements")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 = steadier on a shared CPU)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time (default) or this thread's CPU time (CPU, --threads 1: immune to other "
                        "processes on the machine; isolates per-step host overhead)")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s of the device in this precision, for MFU")
    p.add_argument("--num-images", type=int, help="epoch mode: images per epoch (default 50,000)")
    p.add_argument("--data-root", help="epoch mode: CIFAR-10 as an ImageFolder tree (root/train/<class>/*.jpg, "
                                       "the shared JPEG set) or torchvision's folder (default: random uint8 images)")
    p.add_argument("--epochs", type=int, default=2, help="epoch mode: epochs run (the last is timed)")
    p.add_argument("--configs", default="student,live,cached",
                   help="epoch mode: comma-separated, among student (no teacher term), live (live teacher), "
                        "cached (teacher cache)")
    p.add_argument("--num-workers", type=int, help="epoch mode: processes decoding the JPEG files (once)")
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in vars(a).items() if k in OVERRIDES}
    if a.compile or a.compile_student:
        overrides.update(compile_student=True, compile_teacher=a.compile)
    if a.mode == "epoch":
        return run_epoch_bench(preset=a.preset or "cifar-epoch", device=a.device, num_images=a.num_images,
                               data_root=a.data_root, epochs=a.epochs, json_path=a.json_path, threads=a.threads,
                               configs=tuple(c for c in a.configs.split(",") if c), num_workers=a.num_workers,
                               **overrides)
    return run_bench(preset=a.preset, device=a.device, warmup=a.warmup, steps=a.steps, rounds=a.rounds,
                     parts=not a.no_parts, cache=not a.no_cache, peak_tflops=a.peak_tflops, threads=a.threads,
                     json_path=a.json_path, clock=a.clock, **overrides)


if __name__ == "__main__":
    main()
