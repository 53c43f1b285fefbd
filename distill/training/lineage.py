"""What a run leaves behind about itself: its W&B id, folder and metrics in each checkpoint, and a
short summary printed when a step ends."""
from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only


def wandb_run_id(trainer: L.Trainer | None) -> str | None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def run_record(trainer: L.Trainer | None) -> dict[str, Any]:
    """Stored in every checkpoint as `checkpoint["distill_run"]` (plain types only: it must load with
    `weights_only=True`).

    `metrics` are those of the run's last validation, which need not be of this checkpoint's weights:
    a step checkpoint, a `max_steps` stop or `trainer.save_checkpoint` after epochs left unvalidated
    come later. `metrics_at` says where they were measured ({epoch, global_step}, as
    `EvaluationSteps.validated_at` stamped it); the same global_step as the checkpoint's means the same
    weights. Recording is all a save does: validating there would run a loop inside the training loop
    at every step checkpoint and change nothing the user asked for."""
    if trainer is None:
        return {}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
    at = getattr(trainer.lightning_module, "validated_at", None) if metrics else None
    return dict(wandb_id=wandb_run_id(trainer), run_dir=str(trainer.log_dir or trainer.default_root_dir),
                epoch=int(trainer.current_epoch), global_step=int(trainer.global_step), metrics=metrics,
                metrics_at=dict(at) if at else None)


def checkpoint_at(record: dict[str, Any]) -> dict[str, int] | None:
    """{epoch, global_step} of the checkpoint a `run_record` (or an export's record) describes."""
    if record.get("global_step") is None:
        return None
    return dict(epoch=record.get("epoch"), global_step=record.get("global_step"))


def teacher_accuracy(record: dict[str, Any]) -> dict[str, Any]:
    """A teacher's val/acc as a student's lineage keeps it: the value, where it was measured
    (`val_acc_at`, None when not recorded) and where the teacher's weights are (`weights_at`)."""
    return dict(val_acc=(record.get("metrics") or {}).get("val/acc"), val_acc_at=record.get("metrics_at"),
                weights_at=checkpoint_at(record))


def finish_wandb() -> None:
    """Closes the active W&B run, if any, so its files are complete and the next run is a new one."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def best_checkpoint(trainer: L.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint):
        return cb.best_model_path or cb.last_model_path or None
    return None


class RunSummary(L.Callback):
    """Prints the step's best metrics, its checkpoint and its wall time when fitting ends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start
        self._print(trainer, pl_module)

    @rank_zero_only
    def _print(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = trainer.checkpoint_callback
        kind = pl_module.hparams.get("distill_kind", type(pl_module).__name__)
        best = ""
        if isinstance(cb, ModelCheckpoint) and cb.best_model_score is not None:
            best = f"best {cb.monitor}={float(cb.best_model_score):.4f}  "
        last = "  ".join(f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                         if k.startswith("val/") and v.numel() == 1)
        print(f"\n[{kind}] {best}after {trainer.current_epoch} epochs, {self.seconds:.1f} s")
        if last:
            print(f"[{kind}] last validation: {last}")
        print(f"[{kind}] checkpoint: {best_checkpoint(trainer)}\n", flush=True)
