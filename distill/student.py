"""Step 2: train a ViT student with a distillation token against a frozen teacher."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Union

import lightning as L
import torch
from torch import nn

from .fault_tolerance import NonFiniteLossGuard, ResumeState
from .frozen_teacher import FrozenTeacher
from .lineage import run_record
from .losses import DistillationLoss
from .metrics import EvaluationSteps, accuracy_metrics
from .models import STUDENT_KIND, build_student, load_weights_file, model_meta, set_model_meta, student_heads
from .optim import optimizer_config
from .teacher_cache import CachedTeacher, TeacherCacheConfig, as_config as _cache_config


@dataclass
class StudentConfig:
    """The student ViT, as `distill.build_student` takes it. Fields left as None come from the data.

    Args:
        name: timm model name; a `*_distilled_*` DeiT when `distilled` is true.
        num_classes: number of classes; None = the data's.
        img_size: input size; None = the data's.
        patch_size: patch side; None = the named model's (16 for DeiT).
        in_chans: input channels; None = the data's.
        embed_dim: width; None = the named model's (DeiT-Ti 192, S 384, B 768).
        depth: number of blocks; None = the named model's (12).
        num_heads: attention heads; None = the named model's.
        drop_path_rate: stochastic depth rate (DeiT: 0.1).
        distilled: with DeiT's distillation token and head; false = a plain ViT (Hinton KD, no distillation).
    """

    name: str = "deit_tiny_distilled_patch16_224"
    num_classes: int | None = None
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.1
    distilled: bool = True


class DistillModule(EvaluationSteps, L.LightningModule):
    """DeiT's step 2: a student ViT learns from the ground truth and from a frozen teacher.

    The teacher is a `distill.frozen_teacher.FrozenTeacher`: frozen for good (no gradients, never in
    train mode), not in the optimizer and not in checkpoints. The checkpoint records its identity
    (path, sha256, architecture) instead, and loading or resuming reloads it from there. This module
    keeps the student, the loss and the steps. Training losses are logged every `trainer.log_every_n_steps` steps (and on the first and last).

    Args:
        student: a `StudentConfig` (recipes), or a model from `distill.build_student` (Python API).
        teacher: path of a step-1 checkpoint (or state_dict / safetensors file), or a model from
            `distill.build_teacher`; None only for `loss.mode: none` or inference.
        loss: `DistillationLoss`; `alpha` weighs the distillation term.
        lr: peak learning rate of AdamW (DeiT: 5e-4 x global batch / 512).
        weight_decay: AdamW weight decay, not applied to norms, biases, position embedding, tokens.
        warmup_epochs: epochs of linear warm-up (fractions allowed).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        warmup_start_ratio: learning rate at the start of warm-up as a fraction of `lr` (DeiT: 1e-6 / 1e-3).
        cooldown_epochs: epochs at the final learning rate after the cosine (DeiT: 10); counted inside
            `trainer.max_epochs`, so DeiT's 300 + 10 epochs is max_epochs 310.
        lr_reference_batch: when set, `lr` is the learning rate for this global batch and is scaled
            linearly to the run's: lr x (batch_size x devices x nodes x accumulate_grad_batches) /
            lr_reference_batch (DeiT: lr 5e-4, reference 512). None = `lr` as given.
        ema_decay: decay of an exponential moving average of the student's weights, evaluated as
            `val/acc_ema`; None = off.
        teacher_sha256: expected sha256 of the teacher file (filled in automatically; a mismatch when
            loading or resuming is an error).
        teacher_model: timm architecture of a teacher given as a plain state_dict or safetensors file
            (e.g. `regnety_160`); checkpoints of this toolkit record their own.
        teacher_dtype: dtype the frozen teacher's weights and inputs are kept in during training
            (`float32`, `bfloat16`, `float16`); None = `bfloat16` under `precision: bf16-mixed`
            (saves autocast's per-step weight casts), float32 otherwise.
        teacher_channels_last: run the teacher CNN in channels_last memory format (faster convolutions
            on GPU tensor cores).
        compile_student: `torch.compile` the student's training forward (in place: checkpoint keys
            unchanged). Shapes stay fixed with `data.drop_last`, so it compiles once.
        compile_teacher: `torch.compile` the teacher (separately from the student).
        teacher_cache: opt-in teacher-output cache (`distill.teacher_cache.TeacherCacheConfig`, or just
            its directory): the teacher runs once per sample view, training reads its stored outputs.
            Needs `data.keyed_views: true`; refused when its teacher, data or transforms differ.
    """

    prog_bar_metrics = ("acc", "acc_teacher")

    def __init__(
        self,
        student: Union[StudentConfig, nn.Module] = StudentConfig(),  # noqa: B008 - a frozen default
        teacher: Union[str, nn.Module, None] = None,
        loss: Union[DistillationLoss, None] = None,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.01,
        warmup_start_ratio: float = 0.0,
        cooldown_epochs: float = 0.0,
        lr_reference_batch: int | None = None,
        ema_decay: float | None = None,
        teacher_sha256: str | None = None,
        teacher_model: str | None = None,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        teacher_channels_last: bool = False,
        compile_student: bool = False,
        compile_teacher: bool = False,
        teacher_cache: Union[TeacherCacheConfig, str, None] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "loss", "teacher_cache"])
        for key in ("_instantiator", "_class_path"):  # keep checkpoints loadable without jsonargparse
            self._hparams.pop(key, None)
        self.hparams["distill_kind"] = STUDENT_KIND

        if isinstance(loss, dict):
            loss = DistillationLoss(**loss)
        self.loss = loss if loss is not None else DistillationLoss()
        self.hparams["loss"] = self.loss.config()
        self.teacher_cache_config = _cache_config(teacher_cache)
        self.hparams["teacher_cache"] = asdict(self.teacher_cache_config) if self.teacher_cache_config else None

        self.teacher = FrozenTeacher.load(teacher, teacher_sha256, teacher_model) if teacher is not None else None
        self.hparams["teacher"] = self.teacher.identity.get("path") if self.teacher is not None else None
        if self.teacher is not None and self.teacher.identity.get("sha256"):
            self.hparams["teacher_sha256"] = self.teacher.identity["sha256"]

        if isinstance(student, dict):
            student = StudentConfig(**student)
        self.student: nn.Module | None = student if isinstance(student, nn.Module) else None
        self.student_config = student if isinstance(student, StudentConfig) else None
        if self.student is not None:
            self.hparams["student"] = dict(student.distill_spec)
        else:
            self._fill_student_config()
        self.student_ema = None
        self._student_compiled = False
        if self.student is None and self._config_complete():
            self.configure_model()

    @property
    def teacher_identity(self) -> dict[str, Any]:
        """The teacher's lineage (path, sha256, architecture, classes, W&B run, accuracy)."""
        return dict(self.teacher.identity) if self.teacher is not None else {}

    def train(self, mode: bool = True) -> "DistillModule":
        # Lightning flips modules between train and eval around validation; the EMA copy must stay in
        # eval for good (the FrozenTeacher keeps itself in eval).
        super().train(mode)
        if self.student_ema is not None:
            self.student_ema.eval()
        return self

    def _teacher_dtype(self) -> torch.dtype | None:
        name = self.hparams.teacher_dtype
        if name is None and self._trainer is not None and str(self.trainer.precision) == "bf16-mixed":
            name = "bfloat16"
        return getattr(torch, name) if name else None

    # ---------------------------------------------------------------------------------- set-up
    def _fill_student_config(self, **values) -> None:
        cfg = self.student_config
        for key, value in values.items():
            if getattr(cfg, key) is None and value is not None:
                setattr(cfg, key, value)
        self.hparams["student"] = asdict(cfg)

    def _config_complete(self) -> bool:
        cfg = self.student_config
        return None not in (cfg.num_classes, cfg.img_size, cfg.in_chans)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        if self.student is None:  # fields left as None follow the data
            self._fill_student_config(num_classes=dm.num_classes, img_size=dm.img_size, in_chans=dm.in_chans)
        self._check_classes(dm)
        # What predict/export/attention need to feed the student without the recipe.
        self.hparams["data"] = dict(class_names=list(dm.class_names), mean=list(dm.mean), std=list(dm.std),
                                    img_size=dm.img_size, in_chans=dm.in_chans)
        if self.teacher is not None:
            self.teacher.adapt_to(dm.mean, dm.std, dm.in_chans)

    def _check_classes(self, dm) -> None:
        n, names = dm.num_classes, list(dm.class_names)
        if self.teacher is not None:
            self.teacher.check_task(n, names)
        if self.student is not None and model_meta(self.student)["num_classes"] != n:
            raise ValueError(f"model.student: the student has {model_meta(self.student)['num_classes']} classes but the data has {n}")
        if self.loss.needs_teacher and self.teacher is None:
            raise ValueError(f"model.teacher is required for loss.mode={self.loss.mode!r}; pass a teacher checkpoint")

    def configure_model(self) -> None:
        if self.student is None:
            self._fill_student_config(**(self.teacher.task if self.teacher is not None else {}))  # no datamodule
            if not self._config_complete():
                raise ValueError("DistillModule: the student's num_classes/img_size/in_chans are unknown; "
                                 "set them in model.student or train with a datamodule")
            self.student = build_student(**asdict(self.student_config))
        if getattr(self, "val_metrics", None) is None:
            num_classes = model_meta(self.student)["num_classes"]
            names = ["acc", "acc_cls", "acc_dist", "acc_top5"]
            if self.teacher is not None:
                names += ["acc_teacher", "agreement", "acc_teacher_top5"]
            if self.hparams.ema_decay:
                names.append("acc_ema")
            self.val_metrics = accuracy_metrics(num_classes, names)
            self.test_metrics = accuracy_metrics(num_classes, names)
        if self.hparams.ema_decay and self.student_ema is None:
            from timm.utils import ModelEmaV3

            self.student_ema = ModelEmaV3(self.student, decay=self.hparams.ema_decay)
            self.student_ema.requires_grad_(False)

    # ----------------------------------------------------------------------------------- steps
    def forward(self, x: torch.Tensor):
        return self.student(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]  # (x, y) or (x, y, keys) with data.keyed_views
        z_t = self.teacher.training_logits(batch) if self.loss.needs_teacher else None
        out = self.student(x)
        terms = self.loss(out, z_t, y)
        total = terms.total
        if not self.loss.needs_teacher and isinstance(out, tuple):
            # Without a teacher term (mode none, alpha 0) the distillation head gets no gradient; touch
            # it with a zero so DDP's unused-parameter check does not fail.
            total = total + 0.0 * out[1].sum()
        if self._log_this_step(batch_idx):
            self.log("train/loss", terms.total, prog_bar=True)
            self.log("train/loss_ce", terms.ce)
            self.log("train/loss_distill", terms.distill)
        return total

    def configure_callbacks(self):
        # Stop on a non-finite loss before a checkpoint is written; keep RNG state for exact resume.
        return [NonFiniteLossGuard(), ResumeState()]

    def _log_this_step(self, batch_idx: int) -> bool:
        """Training losses are logged on the steps the Trainer writes logs (`log_every_n_steps`), the
        first step and the last of an epoch or run: each `self.log` costs ~0.3 ms of host time, which
        on every step is a visible share of a fast GPU step (and of the gap to a plain loop)."""
        trainer = self._trainer
        if trainer is None:
            return True
        step = self.global_step + 1
        return (step % max(1, trainer.log_every_n_steps) == 0 or step == 1
                or batch_idx + 1 >= trainer.num_training_batches
                or 0 < trainer.max_steps <= step)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step (never after a micro-batch that only accumulated), and inside the
        # step: a step checkpoint, written by a callback at the batch's end before the module's own
        # on_train_batch_end, then holds the EMA of the weights it holds, so a resume continues it
        # exactly. Lightning counts the step (global_step) after this hook returns.
        if self.student_ema is not None:
            self.student_ema.update(self.student, step=self.global_step + 1)

    def _eval_step(self, batch, metrics: nn.ModuleDict) -> None:
        x, y = batch
        z_cls, z_dist = student_heads(self.student, x)
        fused = (z_cls + z_dist) / 2
        metrics["acc"].update(fused, y)
        metrics["acc_cls"].update(z_cls, y)
        metrics["acc_dist"].update(z_dist, y)
        if "acc_top5" in metrics:
            metrics["acc_top5"].update(fused, y)
        if self.teacher is not None:
            z_t = self.teacher(x)
            metrics["acc_teacher"].update(z_t, y)
            metrics["agreement"].update(fused, z_t.argmax(-1))
            if "acc_teacher_top5" in metrics:
                metrics["acc_teacher_top5"].update(z_t, y)
        if self.student_ema is not None:
            metrics["acc_ema"].update(self.student_ema.module(x), y)

    def configure_optimizers(self):
        hp = self.hparams
        return optimizer_config(self, self.student, hp.lr, hp.weight_decay, hp.warmup_epochs, hp.min_lr_ratio,
                                hp.warmup_start_ratio, hp.cooldown_epochs, hp.lr_reference_batch)

    # ------------------------------------------------------------------------------ checkpoints
    def on_fit_start(self) -> None:
        hp, cache_cfg = self.hparams, self.teacher_cache_config
        use_cache = cache_cfg is not None and self.loss.needs_teacher and self.teacher is not None
        if self.teacher is not None:
            if use_cache:
                self.teacher.fingerprint()  # before any dtype cast: the cache identifies the teacher by it
            self.teacher.prepare(self._teacher_dtype(), hp.teacher_channels_last, hp.compile_teacher)
            if use_cache and self.teacher.cache is None:
                from .teacher_cache import open_cache

                cache = open_cache(self.teacher, cache_cfg, self.trainer, self.device)
                self.teacher.attach_cache(CachedTeacher(cache, cache_cfg.verify_batches, str(self.trainer.precision)))
        if hp.compile_student and self.student is not None and not self._student_compiled:
            self._student_compiled = True
            self.student.compile()
        # The teacher's lineage travels with the student run (W&B config, CSV hparams).
        resolved = {"student": dict(self.hparams["student"]), "data": dict(self.hparams.get("data") or {})}
        if self.teacher_identity:
            resolved["teacher_lineage"] = dict(self.teacher_identity)
        for logger in self.loggers:
            logger.log_hyperparams(resolved)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["distill_teacher"] = dict(self.teacher_identity)
        checkpoint["distill_run"] = run_record(self._trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is not in the checkpoint: it was reloaded from its file in __init__. Hand its
        # current weights back so the strict state_dict load still checks every student key.
        # Resuming (`trainer.fit(ckpt_path=...)`) builds the module from the recipe, without the recorded
        # teacher_sha256: compare the file's digest with the checkpoint's here.
        saved, current = (checkpoint.get("distill_teacher") or {}).get("sha256"), self.teacher_identity.get("sha256")
        if saved and current and saved != current:
            raise ValueError(
                f"model.teacher: {self.teacher_identity.get('path')!r} has sha256 {current[:12]}... but the checkpoint "
                f"was trained with {saved[:12]}...; the teacher file changed since, restore it or start a new run"
            )
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        if self.student is None:  # a checkpoint of a module whose student is built lazily
            self.configure_model()


def load_student(checkpoint: str | os.PathLike) -> nn.Module:
    """The student network alone from a step-2 checkpoint (no teacher needed), in eval mode."""
    from .models import split_checkpoint

    obj = load_weights_file(checkpoint)
    state_dict, hp = split_checkpoint(obj, "student.")
    if hp.get("distill_kind") != STUDENT_KIND:
        raise ValueError(f"{str(checkpoint)!r} is not a student (step 2) checkpoint of this toolkit")
    model = build_student(**hp["student"])
    model.load_state_dict(state_dict)
    data = hp.get("data") or {}
    if data:
        set_model_meta(model, num_classes=hp["student"]["num_classes"], in_chans=data["in_chans"],
                       img_size=hp["student"]["img_size"], class_names=data.get("class_names"),
                       mean=data.get("mean"), std=data.get("std"))
    return model.eval()
