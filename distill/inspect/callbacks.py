"""Lightning callbacks of the toolkit.

In a recipe:

    trainer:
      callbacks:
        - class_path: distill.inspect.callbacks.AttentionLogger
          init_args: {every_n_epochs: 5, num_images: 4}
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class AttentionLogger(Callback):
    """Draws the student's attention maps for a fixed set of validation images during training.

    Every `every_n_epochs` validation epochs (not the sanity check) the first `num_images` validation
    images are drawn with `distill attention`'s figure (class and distillation token attention per head
    and averaged, rollout, affinity matrix) and written to
    `<trainer.log_dir or default_root_dir>/attention/epoch=NNN/<i>.png`; with a `WandbLogger` among the
    trainer's loggers they are also logged as images under `val/attention`. Runs on rank zero only.
    The student is read from `pl_module.student` (`distill.DistillModule`).

    Args:
        every_n_epochs: draw at every n-th validation epoch (1 = each time validation runs).
        num_images: number of validation images drawn (the first ones of the validation set).
        layer: block whose per-head attention and affinity matrix are drawn (-1 = the last).
        head: head of the affinity matrix; None = the mean over heads.
        dpi: resolution of the PNGs.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 4,
        layer: int = -1,
        head: int | None = None,
        dpi: int = 80,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(f"AttentionLogger: every_n_epochs={every_n_epochs} and num_images={num_images} "
                             f"must be at least 1")
        self.every_n_epochs, self.num_images, self.layer, self.head, self.dpi = every_n_epochs, num_images, layer, head, dpi
        self.validations = 0  # validation epochs seen (sanity check excluded); kept across resumes
        self._images: torch.Tensor | None = None
        self._targets: list[int] | None = None
        self._first_batch: tuple[torch.Tensor, list[int] | None] | None = None

    # --------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    # ---------------------------------------------------------------------------- the images
    def _from_datamodule(self, trainer: L.Trainer) -> tuple[torch.Tensor, list[int] | None] | None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            return None
        ds = getattr(dm, "val_set", None)
        try:
            if ds is not None and len(ds) > 0:  # index the dataset: no workers started for a few images
                items = [ds[i] for i in range(min(self.num_images, len(ds)))]
            else:
                items, loader = [], dm.val_dataloader()
                for batch in loader:
                    x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
                    for i in range(len(x)):
                        items.append((x[i], None if y is None else y[i]))
                    if len(items) >= self.num_images:
                        break
                items = items[: self.num_images]
        except Exception as e:  # noqa: BLE001 - fall back to the first validation batch seen
            log.warning("AttentionLogger: could not read validation images from the datamodule (%s); "
                        "using the first validation batch", e)
            return None
        if not items or not all(isinstance(it, (list, tuple)) and torch.is_tensor(it[0]) for it in items):
            return None
        x = torch.stack([it[0] for it in items]).detach().cpu()
        targets = [int(it[1]) for it in items] if all(_is_label(it[1]) for it in items) else None
        return x, targets

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._first_batch is None and self._images is None and not trainer.sanity_checking:
            x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
            if torch.is_tensor(x) and x.ndim == 4:
                n = min(self.num_images, len(x))
                targets = [int(t) for t in y[:n]] if torch.is_tensor(y) and y.ndim == 1 else None
                self._first_batch = (x[:n].detach().cpu().clone(), targets)

    def _fixed_images(self, trainer: L.Trainer) -> tuple[torch.Tensor, list[int] | None] | None:
        if self._images is None:
            found = self._from_datamodule(trainer) or self._first_batch
            if found is None:
                return None
            self._images, self._targets = found
        return self._images, self._targets

    # ------------------------------------------------------------------------------- drawing
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_epochs:
            return
        root = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank must ask
        if not trainer.is_global_zero:
            return
        student = getattr(pl_module, "student", None)
        if student is None:
            log.warning("AttentionLogger: %s has no `student`; nothing drawn", type(pl_module).__name__)
            return
        fixed = self._fixed_images(trainer)
        if fixed is None:
            log.warning("AttentionLogger: no validation images found; nothing drawn")
            return
        try:
            paths = self._draw(trainer, pl_module, student, fixed, Path(root))
        except Exception as e:  # noqa: BLE001 - a figure must never stop a training run
            log.warning("AttentionLogger: attention maps not drawn at epoch %d: %s", trainer.current_epoch, e)
            return
        self._log_wandb(trainer, paths)

    def _draw(self, trainer, pl_module, student, fixed, root: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        from .plots import write_attention_pngs

        x, targets = fixed
        meta = _data_meta(trainer, pl_module, student)
        out = root / "attention" / f"epoch={trainer.current_epoch:03d}"
        paths = [out / f"{i}.png" for i in range(len(x))]
        param = next(student.parameters())
        with torch.no_grad():
            return write_attention_pngs(
                student, x.to(param.device, param.dtype), paths, mean=meta["mean"], std=meta["std"], class_names=meta["class_names"],
                labels=[f"val image {i}, epoch {trainer.current_epoch}" for i in range(len(x))], targets=targets,
                layer=self.layer, head=self.head, dpi=self.dpi,
            )

    def _log_wandb(self, trainer: L.Trainer, paths: list[Path]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/attention", images=[str(p) for p in paths],
                                 caption=[p.stem for p in paths], step=trainer.global_step)


def _is_label(y: Any) -> bool:
    return isinstance(y, int) or (torch.is_tensor(y) and y.ndim == 0 and not y.is_floating_point())


def _data_meta(trainer: L.Trainer, pl_module: L.LightningModule, student: torch.nn.Module) -> dict[str, Any]:
    """mean/std/class names the validation images were prepared with: the module's recorded data
    (DistillModule.setup), else the datamodule's, else the student's metadata."""
    from ..models.meta import model_meta

    meta = dict(model_meta(student))
    data = dict((getattr(pl_module, "hparams", None) or {}).get("data") or {})
    dm = getattr(trainer, "datamodule", None)
    for key in ("mean", "std", "class_names"):
        if data.get(key) is not None:
            meta[key] = data[key]
        elif dm is not None and getattr(dm, key, None) is not None:
            meta[key] = getattr(dm, key)
    in_chans = next(iter(student.patch_embed.parameters())).shape[1] if hasattr(student, "patch_embed") else None
    for key in ("mean", "std"):
        if in_chans and len(meta[key]) != in_chans:
            meta[key] = [sum(meta[key]) / len(meta[key])] * in_chans
    return meta
