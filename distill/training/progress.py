"""What a run prints while it trains: Lightning's progress bar on a terminal, one line per epoch in a log.

Written to a file (CI, `nohup`, SLURM), the bar's carriage-return refreshes pile up as thousands of
lines; there a run prints one line per epoch instead (`EpochLines`). `progress_output` makes the choice
for the CLI; an explicit `trainer.enable_progress_bar` wins.
"""
from __future__ import annotations

import sys
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only


def stdout_is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_output(enable_progress_bar: bool | None) -> tuple[bool, list[L.Callback]]:
    """(enable_progress_bar, extra callbacks) for a run: the user's setting when given, else the bar
    on a terminal only; one line per epoch whenever there is no bar."""
    bar = stdout_is_terminal() if enable_progress_bar is None else bool(enable_progress_bar)
    return bar, ([] if bar else [EpochLines()])


class EpochLines(L.Callback):
    """Prints one line at the end of every training epoch (after its validation): the epoch, the
    optimizer step, the epoch's mean training loss, the validation metrics shown in the progress bar
    when the epoch validated, and the epoch's wall time. For example
    `[teacher] epoch 3/10  step 69  train/loss 0.8123  val/acc 0.9472  4.1 s`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._loss_sum: torch.Tensor | None = None
        self._batches = 0
        self._validated = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._loss_sum, self._batches, self._validated = None, 0, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning hands over the loss divided by accumulate_grad_batches; summed on the device
            # (no host sync per step), read once at the epoch's end.
            loss = loss.detach().float() * trainer.accumulate_grad_batches
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._batches += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, pl_module)

    @rank_zero_only
    def _print(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        kind = pl_module.hparams.get("distill_kind", type(pl_module).__name__)
        epoch = f"epoch {trainer.current_epoch + 1}" + (f"/{trainer.max_epochs}" if trainer.max_epochs and
                                                        trainer.max_epochs > 0 else "")
        parts = [f"[{kind}] {epoch}", f"step {trainer.global_step}"]
        if self._loss_sum is not None and self._batches:
            parts.append(f"train/loss {float(self._loss_sum) / self._batches:.4f}")
        if self._validated:
            parts += [f"{k} {float(v):.4f}" for k, v in trainer.progress_bar_metrics.items() if k.startswith("val/")]
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        print("  ".join(parts), flush=True)
