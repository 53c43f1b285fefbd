"""Surviving faults: exact resume (RNG state in checkpoints), atomic checkpoint writes, and a stop on
non-finite losses that never overwrites the last good checkpoint."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


class ResumeState(L.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) random states in each checkpoint and restores
    them on resume, so `--ckpt_path last` draws the same shuffles and augmentations as a run that was
    never interrupted. Lightning restores model, optimizer, scheduler and loop counters itself.

    Stored as tensors and plain numbers only, so checkpoints still load with `weights_only=True`.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, py_state, py_gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss": py_gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


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
    and `--ckpt_path last` would silently restart from the best epoch."""

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)
