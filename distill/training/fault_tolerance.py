"""Surviving faults: exact resume (RNG state in checkpoints), atomic checkpoint writes, and a stop on
non-finite losses that never overwrites the last good checkpoint."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and, when initialised, CUDA) random states, as tensors
    and plain numbers only, so checkpoints still load with `weights_only=True`."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rngs(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices) with one seed. Not `L.seed_everything`, which would
    also rewrite PL_GLOBAL_SEED, the run's seed that other code reads."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_seed() -> int | None:
    """The seed the run was started with (`seed_everything`, which LightningCLI calls), or None."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else None


class ResumeState(L.Callback):
    """Random streams that differ between processes and survive a resume, so `--ckpt_path last` draws
    the same shuffles and augmentations (mixup, cutmix, RandAugment, drop path, ...) as a run that was
    never interrupted. Lightning restores model, optimizer, scheduler and loop counters itself.

    Per-process streams: `seed_everything` gives every DDP process the same seed, so each would draw
    the same mixup lambda, cutmix box and drop-path mask. Like DeiT (`seed + rank`), process `r > 0`
    reseeds Python, NumPy and torch with `seed + r` at fit start, after the model was built and DDP
    has broadcast rank 0's weights (initial weights stay identical). Rank 0 keeps the stream it has,
    so a one-process run draws exactly what it drew before. Per-sample keyed views
    (`distill.data.keyed_views`) and the samplers' orders depend on the data seed only, never on the rank.

    Checkpoints: only rank 0 writes the file, but `state_dict()` runs on every process at each save,
    so the states of all processes are gathered (`all_gather_object`) and stored as
    `{"world_size": W, "ranks": [state_0, ..., state_W-1], "global_step": step}`; on resume process `r`
    takes `ranks[r]`. With another number of processes the streams cannot continue: each process
    reseeds from (seed, rank, step) with a warning and the run goes on, no longer bit-identical.

    Where the training iterator comes from on a resume: Lightning builds it early (when the learning
    rate schedule asks for `estimated_stepping_batches`), before the loops are restored, so before the
    sampler knows the resumed epoch (with `num_workers > 0` the workers draw the first indices at
    once) and before the loader's saved position is known, which Lightning then never loads. So this
    callback rebuilds it, as the uninterrupted run built it:
      - resumed at an epoch boundary: at the next `on_train_epoch_start` (the sampler's epoch is set),
        from the restored random state, as the uninterrupted run did after its last save;
      - resumed in the middle of an epoch: at `on_train_start`, after loading the saved loader state
        (`distill.data.keyed_views.KeyedLoader`: the epoch's order, minus the batches already trained),
        then the random state is restored again (the uninterrupted run built no iterator there).

    What resumes bit-identically (same number of processes):
      - from an epoch boundary (the default checkpoints, written at validation or epoch end): plain
        and keyed training loaders; tested with plain loaders (mixup/cutmix, RandAugment, num_workers
        0) and keyed views (num_workers 1) in one process, in runs bounded by epochs or by `max_steps`
        (where Lightning would re-enter the ended epoch: see `_finish_the_ended_epoch`);
      - from the middle of an epoch (step checkpoints, `checkpoint.every_n_train_steps`, or
        `trainer.val_check_interval` < 1): only `data.keyed_views: true` (any num_workers), whose
        loader saves its position; tested in one process and in two. Plain loaders (and
        `data.on_device`) restart that epoch's rest with a fresh order (Lightning warns that the
        loader is not resumable): training goes on, but not bit-identically and not every sample of
        that epoch exactly once. They could be made exact with num_workers 0 only (a resumable
        sampler; augmentations then draw from the main process's RNG, which is checkpointed); with
        workers, each worker's augmentation RNG lives in its process and the loader has prefetched
        batches beyond the step, so neither can be saved with the step.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._restored = False  # this fit resumed from a checkpoint (no fresh per-rank seed)
        self._resumed: dict[str, Any] | None = None  # this process's state, re-applied with the iterator

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        trainer, local = self._trainer, rng_state()
        states = [local]
        world = trainer.world_size if trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, local)
        step = int(trainer.global_step) if trainer is not None else 0
        return {"world_size": len(states), "ranks": states, "global_step": step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Called before the training iterator is first built: apply the state now, as a run resumed at
        # an epoch boundary needs it there, and keep it for the rebuild of the iterator.
        if "ranks" not in state:  # checkpoints written before per-process states: one process's state
            state = {"world_size": 1, "ranks": [state], "global_step": 0}
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._restored = True
        if state["world_size"] == world:
            self._resumed = state["ranks"][rank]
            set_rng_state(self._resumed)
            return
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"ResumeState: the checkpoint holds the random states of {state['world_size']} process(es) but this "
            f"run has {world}; every process reseeds from (seed, rank, step): the run continues, not bit-identical "
            f"to an uninterrupted one"
        )
        key = f"{run_seed() or 0}/{rank}/{int(state['global_step'])}".encode()
        seed_rngs(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)

    # ----------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored:
            return
        seed = run_seed()
        if seed is None and trainer.world_size > 1:
            seed = torch.initial_seed()  # unseeded: still one stream per process
        if seed is not None and trainer.global_rank > 0:
            seed_rngs(seed + trainer.global_rank)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _finish_the_ended_epoch(trainer)
        if self._resumed is None or not _resumes_mid_epoch(trainer):
            return  # fresh, or resumed at an epoch boundary: see on_train_epoch_start
        resumed, self._resumed = self._resumed, None
        if _load_pending_loader_states(trainer):
            _rebuild_train_iterator(trainer)
        set_rng_state(resumed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed is None:
            return
        resumed, self._resumed = self._resumed, None
        set_rng_state(resumed)
        _rebuild_train_iterator(trainer)


def _finish_the_ended_epoch(trainer: L.Trainer) -> None:
    """A run bounded by `max_steps` resumed from a checkpoint written as an epoch ended (in
    `on_train_epoch_end`, as `last` is between validations every n steps): Lightning 2.6 keeps restarting
    that epoch (it treats every resume of such a run as a restart), trains one batch past its end and
    from then on hands the samplers an epoch one ahead of `current_epoch`. Record the epoch as completed
    and start the next one fresh, as Lightning does for a run bounded by epochs. Called at train start,
    after the loops were restored and before the first epoch starts."""
    from lightning.pytorch.loops.loop import _Loop

    fit_loop = trainer.fit_loop
    # Lightning before 2.5 has no restart stages (and restarts otherwise): leave it be there.
    if not (fit_loop.restarting and trainer.max_steps != -1 and getattr(fit_loop, "restarted_on_epoch_end", False)):
        return
    fit_loop.epoch_progress.increment_completed()
    _Loop.restarting.fset(fit_loop, False)  # and its epoch and validation loops: they start afresh
    for loop in (fit_loop, fit_loop.epoch_loop, fit_loop.epoch_loop.val_loop):
        getattr(loop, "reset_restart_stage", lambda: None)()


def _resumes_mid_epoch(trainer: L.Trainer) -> bool:
    """True when training restarts inside an epoch with batches left to train. Read at train start,
    where the epoch loop's progress is still the checkpoint's (the epoch loop resets it later)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return bool(trainer.fit_loop.restarting) and 0 < done < trainer.num_training_batches


def _load_pending_loader_states(trainer: L.Trainer) -> bool:
    """Hands the checkpoint's training-loader states to the loaders (`load_state_dict`). Lightning
    2.6 loads them only when it builds the loaders after the loops were restored, which it does not
    when `estimated_stepping_batches` built them first. True when there were states to load."""
    fit_loop = trainer.fit_loop
    if not getattr(fit_loop, "_combined_loader_states_to_load", None) or fit_loop._combined_loader is None:
        return False
    fit_loop._load_combined_loader_states()
    return True


def _rebuild_train_iterator(trainer: L.Trainer) -> None:
    fit_loop = trainer.fit_loop
    if fit_loop._combined_loader is None or fit_loop._data_fetcher is None:
        return
    fit_loop._combined_loader.reset()  # also shuts down the old iterator's workers
    iter(fit_loop._data_fetcher)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it and renames it over the
    target: a run killed mid-write leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class NonFiniteLossGuard(L.Callback):
    """Stops training with a clear message when the training loss turns NaN or infinite, before any
    checkpoint is written with the damaged weights: the last good checkpoint stays as it was.

    On GPU the check is accumulated on the device and read every `check_every_n_steps` steps and before
    every checkpoint, so it does not stall the step with a host sync.

    Args:
        check_every_n_steps: how often to read the flag on GPU (every step on CPU).
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self._bad: torch.Tensor | None = None
        self._first_bad_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad = bad if self._bad is None else (self._bad | bad)
        if loss.device.type == "cpu" or trainer.global_step % self.check_every_n_steps == 0 or self._checkpoint_due(trainer):
            self._check(trainer, loss)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training:
            self._check(trainer)

    @staticmethod
    def _checkpoint_due(trainer) -> bool:
        return any(
            isinstance(cb, ModelCheckpoint) and cb._every_n_train_steps and trainer.global_step % cb._every_n_train_steps == 0
            for cb in trainer.callbacks
        )

    def _check(self, trainer, loss: torch.Tensor | None = None) -> None:
        if self._bad is None or not bool(self._bad):
            return
        value = f" ({loss.item()})" if loss is not None and loss.numel() == 1 else ""
        last = next((cb.last_model_path or cb.best_model_path for cb in trainer.callbacks
                     if isinstance(cb, ModelCheckpoint) and (cb.last_model_path or cb.best_model_path)), None)
        kept = f"; the last good checkpoint is kept: {last}" if last else "; no checkpoint was written"
        raise FloatingPointError(
            f"train/loss is not finite{value} by step {trainer.global_step} (epoch {trainer.current_epoch}){kept}; "
            f"lower model.init_args.lr, set trainer.gradient_clip_val, or check the data"
        )


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` really is the last state. Lightning 2.6 refreshes `last` only
    at steps where a top-k checkpoint is also written, so after the best epoch `last` would go stale
    and `--ckpt_path last` would silently restart from the best epoch. Lightning also writes nothing at
    a step that already has a checkpoint, so a step checkpoint (`every_n_train_steps`) that falls on an
    epoch's last step would leave `last` without that epoch's validation (its metrics in
    `distill_run`, the best score, the loop progress). And with validation every n > 1 epochs
    (`check_val_every_n_epoch`) Lightning writes checkpoints at validations only, so epochs trained
    after the last validation (the end of a run of 3 epochs validated every 2) were not in `last`. Here
    every validation (or, without one, every epoch end) that did not write `last` itself writes it, and
    so does every epoch end (or the end of fit at `max_steps`) that trained past the step `last` holds."""

    _last_saves = 0  # times `last` was written: tells whether Lightning's own hook wrote it
    _last_step: int | None = None  # global step `last` holds (None: not written by this fit)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saves += 1
            self._last_step = trainer.global_step

    def _save_last_unless_saved(self, trainer: L.Trainer, saves_before: int) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if (self.save_last and self._last_saves == saves_before and not trainer.fast_dev_run
                and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        before = self._last_saves
        super().on_train_epoch_end(trainer, pl_module)
        # An epoch without validation (validated every n epochs) trained past `last`: write it here, the
        # same state an epoch-end checkpoint holds. A validated epoch wrote it at its validation, which
        # runs before this hook, at this step.
        if self._should_save_on_train_epoch_end(trainer) or self._last_step != trainer.global_step:
            self._save_last_unless_saved(trainer, before)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        before = self._last_saves
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_unless_saved(trainer, before)
