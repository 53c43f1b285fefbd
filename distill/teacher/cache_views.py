"""Building the views of a teacher cache while training runs: the view an epoch reads, when it starts, and
(`model.teacher_cache.build_ahead`) the next epoch's view ahead of time, on a background thread.

A view costs one teacher pass over every training sample. Built when its epoch starts, that pass stops
training for as long as it takes (on a CPU it was 40-65% of an epoch of the CIFAR-10 semi-supervised study).
Built ahead, it runs while the previous epoch trains: on a spare CPU core it costs no wall-clock time at all
when it is shorter than an epoch. The work done is the same, and so are the results: a view's pixels depend
only on `(seed, view, index)` (`KeyedViews`), and the ahead pass leaves the training process's random number
generators alone, so a run with or without it trains on the same bytes with the same random draws: images
from the host (`KeyedViews`, which seeds the process-wide generators for each sample) are made in a DataLoader
worker process, whose loader draws its seed from a generator of its own; on-device data (`data.on_device`)
hashes `(seed, view, index)` into every random choice and is made on the thread itself.

The thread runs this process's shard only, under the same per-view file lock as any other build (a run that
needs the view sooner waits for it, then reads it; a process killed mid-build leaves no `done` mark, and the
view is built again when next needed). It never calls a collective: the barrier that tells every rank that
every shard exists stays in the main thread, at the start of the epoch that reads the view. An error in the
thread is raised there too.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Iterable, Literal, Sequence

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from ..data.keyed_views import KeyedViews, collate_keyed
from .cache import (
    TeacherCache, TeacherCacheConfig, _build_lock, _view_source, build_cache, cache_dir, view_dir, view_done,
)


def resolve_build_ahead(value: bool | Literal["auto"], device: torch.device | str) -> bool:
    """`auto`: on when the teacher runs on the CPU and training leaves a core of this process idle (torch uses
    fewer threads than the cores it may run on: a study's one-thread workers, `OMP_NUM_THREADS=1`); off on
    an accelerator, where the teacher would only queue behind the student on the same device."""
    if value != "auto":
        if not isinstance(value, bool):
            raise ValueError(f"model.teacher_cache.build_ahead={value!r}: expected true, false or auto")
        return value
    if torch.device(device).type != "cpu":
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores


def view_batches(dm, views: Sequence[int], rank: int, world: int, batch_size: int | None,
                 background: bool = False) -> Iterable[tuple]:
    """(x, y, keys) batches over this rank's samples and the given views, augmented as training will.

    The loader draws its base seed from a generator of its own, never from the global one: building a view
    (or not, when the cache already holds it) must not change the random draws of the training that follows.
    `background`: the images are made in worker processes (at least one), because the keyed augmentation
    seeds the process-wide random number generators, which the training thread is using at the same time."""
    if dm.hparams.get("on_device"):
        loader = _view_source(dm)["loader"]
        return loader.view_batches(views, rank=rank, world_size=world, batch_size=batch_size)
    ds = KeyedViews(dm.train_set, dm.hparams.seed)
    n = len(ds)
    keys = [v * n + i for v in views for i in range(rank, n, world)]
    workers = max(1, dm.num_workers) if background else dm.num_workers
    return DataLoader(ds, batch_size=batch_size or dm.batch_size, sampler=keys, num_workers=workers,
                      collate_fn=collate_keyed, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(int(dm.hparams.seed)))


class ViewBuilder:
    """`builder(view)`: this process's shard of `view` built when missing (runs of a study that need it
    together build it once: the others wait on the lock, then read it), then a barrier so that every shard
    exists. `builder.start_ahead(view)` builds it on a background thread instead, for a later call to find
    done; the call waits for that thread first and raises what it raised."""

    def __init__(self, teacher, cfg: TeacherCacheConfig, trainer, device: torch.device | str = "cpu",
                 ahead: bool = False) -> None:
        self.teacher, self.cfg, self.trainer, self.device, self.ahead = teacher, cfg, trainer, device, ahead
        self.dm = trainer.datamodule
        self.directory = cache_dir(cfg, teacher)
        self.cache = TeacherCache(self.directory)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()

    def _done(self, view: int) -> bool:
        return view_done(self.directory, view, self.trainer.global_rank, self.trainer.world_size)

    def _build_shard(self, view: int, background: bool = False, batches: Iterable[tuple] | None = None) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self._done(view):
            return
        if not self.cfg.build:
            raise FileNotFoundError(f"model.teacher_cache: {str(self.directory)!r} holds no view {view} and build is false")
        with _build_lock(view_dir(self.directory, view), rank):
            if self._done(view):
                return
            from lightning.pytorch.utilities import rank_zero_info

            how = " ahead, on a background thread" if background else ""
            rank_zero_info(f"teacher cache: building view {view} ({self.cache.num_samples:,} samples){how} in "
                           f"{self.directory}")
            start, cpu = time.perf_counter(), time.thread_time()
            if batches is None:
                batches = view_batches(self.dm, [view], rank, world, self.cfg.batch_size, background)
            build_cache(self.directory, self._stoppable_teacher if background else self.teacher, batches, num_samples=self.cache.num_samples,
                        num_classes=self.cache.num_classes, views=[view], topk=self.cache.topk, dtype=self.cfg.dtype,
                        rank=rank, world_size=world, device=self.device,
                        autocast=self.trainer.precision_plugin.forward_context)
            took = time.perf_counter() - start
            if background:
                rank_zero_info(f"teacher cache: built view {view} ahead in {took:.1f} s "
                               f"({time.thread_time() - cpu:.1f} s of CPU time on its thread)")
            else:
                rank_zero_info(f"teacher cache: built view {view} in {took:.1f} s (the live teacher's cost of one epoch)")

    def _stoppable_teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher, for the background build: it stops between two batches when `stop_ahead` asks."""
        if self._stop.is_set():
            raise _Stopped
        return self.teacher(x)

    def wait_ahead(self) -> None:
        """Waits for the background build, if one runs, and raises its error."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"teacher cache: building a view ahead failed: {error}") from error

    def stop_ahead(self) -> None:
        """Stops the background build, if one runs, before its next batch (training ended before the epoch
        that would read the view: early stopping, an error, the end of a fit the limits did not foresee). The
        view is left unmarked, and built again when an epoch reads it."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        try:
            self.wait_ahead()
        except RuntimeError as e:
            if not isinstance(e.__cause__, _Stopped):
                raise
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"teacher cache: stopped building a view ahead ({thread.name}): training ended first")
        finally:
            self._stop.clear()

    def start_ahead(self, view: int) -> None:
        """Builds `view` on a background thread (when `ahead` is on and the view is missing)."""
        if not self.ahead or self._done(view):
            return
        self.wait_ahead()
        # The loader's worker processes start here, in the main thread and before the thread takes the view's
        # lock: forked from the thread, a worker could inherit a lock the training thread holds at that moment
        # and hang, and one that inherited the view's lock file would keep the view locked after its parent
        # was killed (an orphan worker outlives a kill -9), so that the resumed run waited for it forever.
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = iter(view_batches(self.dm, [view], rank, world, self.cfg.batch_size, background=True))

        def run() -> None:
            try:
                self._build_shard(view, background=True, batches=batches)
            except BaseException as e:  # raised in the main thread by the next wait_ahead
                self._error = e

        self._thread = threading.Thread(target=run, name=f"teacher-cache-view-{view}", daemon=True)
        self._thread.start()

    def __call__(self, view: int) -> None:
        self.wait_ahead()
        self._build_shard(view)
        self.trainer.strategy.barrier("teacher_cache_view")


class StopViewsBuiltAhead(Callback):
    """A view being built ahead that no epoch of the fit will read stops when the fit ends or fails (no thread
    outlives the fit: a daemon thread still running the teacher when the interpreter exits aborts it). The
    module's teacher carries the `CachedTeacher` as `.cache`. A Callback, not LightningModule hooks:
    Lightning calls `on_exception` on callbacks and the datamodule, never on the LightningModule."""

    def on_fit_end(self, trainer, pl_module) -> None:
        _stop_builds(pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:
            _stop_builds(pl_module)
        except Exception:  # noqa: BLE001 - the fit's own error is the one to report
            pass


def _stop_builds(pl_module) -> None:
    cached = attached_cache(getattr(pl_module, "teacher", None))
    if cached is not None:
        cached.stop()


def attached_cache(teacher):
    """The `CachedTeacher` attached to a frozen teacher (or ensemble) for this fit, or None (no teacher, no cache)."""
    return getattr(teacher, "cache", None)


class _Stopped(Exception):
    """Raised in the background build by `stop_ahead`."""


def view_builder(teacher, cfg: TeacherCacheConfig, trainer, device: torch.device | str = "cpu") -> ViewBuilder:
    return ViewBuilder(teacher, cfg, trainer, device, resolve_build_ahead(cfg.build_ahead, device))

