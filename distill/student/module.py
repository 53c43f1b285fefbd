"""Step 2: train a ViT student with a distillation token against a frozen teacher."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from torch import nn

from ..losses import DistillationLoss
from ..models.build import build_student
from ..models.heads import is_distilled, student_heads
from ..models.meta import model_meta, set_model_meta
from ..models.sources import is_source
from ..models.weights import STUDENT_KIND, load_weights_file
from ..teacher.cache import CachedTeacher, TeacherCacheConfig, as_config as _cache_config
from ..teacher.cache_views import StopViewsBuiltAhead, attached_cache
from ..teacher.ensemble import TeacherEnsemble, load_teachers, teacher_files
from ..training.fault_tolerance import NonFiniteLossGuard, ResumeState
from ..training.lineage import run_record
from ..training.metrics import EvaluationSteps, accuracy_metrics
from ..training.optim import optimizer_config
from .feature_guidance import FeatureGuidance, FeatureGuidanceConfig, as_guidance_config


@dataclass
class StudentConfig:
    """The student ViT, as `distill.build_student` takes it. Fields left as None come from the data.

    Args:
        name: timm model name; a `*_distilled_*` DeiT when `distilled` is true. Or `hf-hub:ORG/NAME` /
            `local-dir:PATH` (`distill.models.sources`): the architecture, sizes, weights (as
            `pretrained`) and mean/std/size of that folder (e.g. a `distill export --format hf` output).
        num_classes: number of classes; None = the data's.
        img_size: input size; None = the data's.
        patch_size: patch side; None = the named model's (16 for DeiT).
        in_chans: input channels; None = the data's.
        embed_dim: width; None = the named model's (DeiT-Ti 192, S 384, B 768).
        depth: number of blocks; None = the named model's (12).
        num_heads: attention heads; None = the named model's.
        drop_path_rate: stochastic depth rate (DeiT: 0.1).
        distilled: with DeiT's distillation token and head; false = a plain ViT (Hinton KD, no distillation).
        pretrained: start from pretrained weights (`distill.models.pretrained`): true = timm's weights of `name`,
            or a file (safetensors, .pth/.bin, DeiT's release format, a `distill export` output, a step-2
            checkpoint). Position embeddings are resampled, both heads new for other classes, plain ViT
            weights get a new distillation token. The data's mean/std/size follow the weights' unless
            `data.mean`/`std`/`img_size` are set. `pkg:MODULE`: the weights file an installed package
            ships. None = random init.
        pretrained_remap: ordered `[regex, replacement]` rules rewriting a foreign file's tensor names
            into timm's.
        pretrained_match: `name` or `order` (pair the file's tensors with the model's in file order).
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
    pretrained: Union[bool, str, None] = None
    pretrained_remap: Optional[list[tuple[str, str]]] = None
    pretrained_match: Literal["name", "order"] = "name"


class DistillModule(EvaluationSteps, L.LightningModule):
    """DeiT's step 2: a student ViT learns from the ground truth and from a frozen teacher.

    The teacher is a `distill.teacher.frozen.FrozenTeacher`: frozen for good (no gradients, never in
    train mode), not in the optimizer and not in checkpoints. The checkpoint records its identity
    (path, sha256, architecture) instead, and loading or resuming reloads it from there. This module
    keeps the student, the loss and the steps. Training losses are logged every `trainer.log_every_n_steps` steps (and on the first and last).

    Args:
        student: a `StudentConfig` (recipes), or a model from `distill.build_student` (Python API).
        teacher: path of a step-1 checkpoint (or state_dict / safetensors file), or a model from
            `distill.build_teacher`, or a list of them: an ensemble whose combined logits teach
            (`teacher_combine`); None only for `loss.mode: none` or inference.
        loss: `DistillationLoss`; `alpha` weighs the distillation term.
        lr: peak learning rate of AdamW (DeiT: 5e-4 x global batch / 512).
        weight_decay: AdamW weight decay, not applied to norms, biases, position embedding, tokens.
        warmup_epochs: epochs of linear warm-up (fractions allowed).
        warmup_steps: warm-up length in optimizer steps instead of epochs (None = `warmup_epochs`): for
            runs compared at equal samples seen whose epochs differ in length (e.g. 5,000 labelled
            images alone against 50,000 with the unlabelled ones).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        warmup_start_ratio: learning rate at the start of warm-up as a fraction of `lr` (DeiT: 1e-6 / 1e-3).
        cooldown_epochs: epochs at the final learning rate after the cosine (DeiT: 10); counted inside
            `trainer.max_epochs`, so DeiT's 300 + 10 epochs is max_epochs 310.
        lr_reference_batch: when set, `lr` is the learning rate for this global batch and is scaled
            linearly to the run's: lr x (batch_size x devices x nodes x accumulate_grad_batches) /
            lr_reference_batch (DeiT: lr 5e-4, reference 512). None = `lr` as given.
        ema_decay: decay of an exponential moving average of the student's weights, evaluated as
            `val/acc_ema`; None = off.
        teacher_sha256: expected sha256 of the teacher file (one per teacher for an ensemble; filled in
            automatically; a mismatch when loading or resuming is an error).
        teacher_model: timm architecture of a teacher given as a plain state_dict or safetensors file
            (e.g. `regnety_160`; one per teacher for an ensemble); checkpoints of this toolkit record
            their own.
        teacher_combine: how an ensemble's logits are combined: `mean_logits` or `mean_probs` (the
            log of the mean probability); hard distillation takes the combination's argmax. Each
            teacher's accuracy is logged as `val/acc_teacher_<i>`, the combination's as `val/acc_teacher`.
        teacher_dtype: dtype the frozen teacher's weights and inputs are kept in during training
            (`float32`, `bfloat16`, `float16`); None = `bfloat16` under `precision: bf16-mixed`
            (saves autocast's per-step weight casts), float32 otherwise.
        teacher_channels_last: run the teacher CNN in channels_last memory format (faster convolutions
            on GPU tensor cores).
        compile_student: `torch.compile` the student's training forward (in place: checkpoint keys
            unchanged). Shapes stay fixed with `data.drop_last`, so it compiles once.
        compile_teacher: `torch.compile` the teacher (separately from the student).
        teacher_cache: opt-in teacher-output cache (`distill.teacher.cache.TeacherCacheConfig`, or just
            its directory): the teacher runs once per sample view, training reads its stored outputs.
            Needs `data.keyed_views: true`; refused when its teacher, data or transforms differ.
        feature_guidance: match the student's intermediate patch tokens to the teacher's feature maps
            (`distill.student.feature_guidance.FeatureGuidanceConfig`: student_blocks, teacher_layers, weight);
            logged as `train/loss_feature`. None = off.
        layer_decay: layer-wise learning-rate decay for fine-tuning a pretrained student (timm's param
            groups: each block's lr is lr x layer_decay^(blocks above it); DeiT-III: 0.65); None = off.
        frozen_backbone_epochs: train only the student's heads for this many first epochs (`distill.training.finetune`).
    """

    prog_bar_metrics = ("acc", "acc_teacher")

    def __init__(
        self,
        student: Union[StudentConfig, nn.Module] = StudentConfig(),  # noqa: B008 - a frozen default
        teacher: Union[str, list[str], nn.Module, None] = None,
        loss: Union[DistillationLoss, None] = None,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.01,
        warmup_start_ratio: float = 0.0,
        cooldown_epochs: float = 0.0,
        lr_reference_batch: int | None = None,
        ema_decay: float | None = None,
        teacher_sha256: Union[str, list[Optional[str]], None] = None,
        teacher_model: Union[str, list[Optional[str]], None] = None,
        teacher_combine: Literal["mean_logits", "mean_probs"] = "mean_logits",
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        teacher_channels_last: bool = False,
        compile_student: bool = False,
        compile_teacher: bool = False,
        teacher_cache: Union[TeacherCacheConfig, str, None] = None,
        feature_guidance: Optional[FeatureGuidanceConfig] = None,
        layer_decay: float | None = None,
        frozen_backbone_epochs: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "loss", "teacher_cache", "feature_guidance"])
        for key in ("_instantiator", "_class_path"):  # keep checkpoints loadable without jsonargparse
            self._hparams.pop(key, None)
        self.hparams["distill_kind"] = STUDENT_KIND

        if isinstance(loss, dict):
            loss = DistillationLoss(**loss)
        self.loss = loss if loss is not None else DistillationLoss()
        self.hparams["loss"] = self.loss.config()
        _check_class_head_trained(self.loss, student)
        self.teacher_cache_config = _cache_config(teacher_cache)
        self.hparams["teacher_cache"] = asdict(self.teacher_cache_config) if self.teacher_cache_config else None

        self.guidance_config = as_guidance_config(feature_guidance)
        self.hparams["feature_guidance"] = asdict(self.guidance_config) if self.guidance_config else None
        self.guidance: FeatureGuidance | None = None

        self.teacher = load_teachers(teacher, teacher_sha256, teacher_model, teacher_combine)
        self.register_load_state_dict_pre_hook(_teacher_weights_from_file)
        path, sha = teacher_files(self.teacher)
        self.hparams["teacher"] = path
        if sha is not None and (not isinstance(sha, list) or any(sha)):
            self.hparams["teacher_sha256"] = sha
        if self.guidance_config is not None and self.teacher is None:
            raise ValueError("model.feature_guidance needs a teacher; pass model.teacher or drop feature_guidance")
        if self.guidance_config is not None and self.teacher_cache_config is not None:
            raise ValueError("model.feature_guidance reads the live teacher's feature maps every step, which the "
                             "teacher cache does not store; drop model.teacher_cache or feature_guidance")

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
    def reads_unlabeled(self) -> bool:
        """Whether unlabelled training images (`data.unlabeled_root`, `data.labels_per_class`) reach this
        student: only when the loss has a teacher term (or feature guidance) to learn from them; a
        student without one trains on the labelled images alone (`ImageDataModule` asks)."""
        return (self.loss.needs_teacher or self.guidance_config is not None) and self.teacher is not None

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
        self._keep_teacher_out_of_fsdp()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        if self.student is None:  # fields left as None follow the data
            self._fill_student_config(num_classes=dm.num_classes, img_size=dm.img_size, in_chans=dm.in_chans)
        self._check_classes(dm)
        # What predict/export/attention need to feed the student without the recipe: the eval transform's
        # spec (img_size, crop_pct, interpolation, mean, std, in_chans; distill.data.transforms).
        self.hparams["data"] = dict(class_names=list(dm.class_names), **dm.eval_spec)
        if self.teacher is not None:
            self.teacher.adapt_to(dm.mean, dm.std, dm.in_chans)

    def _keep_teacher_out_of_fsdp(self) -> None:
        """Under `strategy: fsdp` the frozen teacher stays a whole, unsharded module on every device:
        it goes to FSDP's `ignored_modules` (Lightning wraps the module after `setup`), so it is never
        flattened with the student (FSDP refuses a flat parameter mixing frozen and trained weights)
        nor gathered every step; FSDP leaves ignored modules where they are, so it moves here.
        `use_orig_params` (unless the strategy says otherwise) keeps the student's own parameters, which
        `configure_optimizers` hands to AdamW in weight-decay groups."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDPStrategy):
            return
        strategy.kwargs.setdefault("use_orig_params", True)
        if self.teacher is None:
            return
        ignored = list(strategy.kwargs.get("ignored_modules") or ())
        if not any(m is self.teacher for m in ignored):
            strategy.kwargs["ignored_modules"] = [*ignored, self.teacher]
        self.teacher.to(strategy.root_device)

    def _check_classes(self, dm) -> None:
        n, names = dm.num_classes, list(dm.class_names)
        if self.teacher is not None:
            self.teacher.check_task(n, names)
        if self.student is not None and model_meta(self.student)["num_classes"] != n:
            raise ValueError(f"model.student: the student has {model_meta(self.student)['num_classes']} classes but the data has {n}")
        if self.loss.needs_teacher and self.teacher is None:
            raise ValueError(f"model.teacher is required for loss.mode={self.loss.mode!r}; pass a teacher checkpoint")
        self._check_split(dm)

    def _check_split(self, dm) -> None:
        """Refuses a student that validates on images its teacher trained on: same data, other held-out
        set (e.g. another data.seed for digits' random split)."""
        if self.teacher is None:
            return
        ours = dm.split_fingerprint
        members = getattr(self.teacher, "members", [self.teacher])
        for i, member in enumerate(members):
            theirs = member.identity.get("split") or {}
            if theirs.get("dataset") != ours["dataset"]:
                continue
            field = "model.teacher" if len(members) == 1 else f"model.teacher[{i}]"
            if theirs.get("val") != ours["val"]:
                raise ValueError(
                    f"{field} was trained on another train/validation split of this data (its data.seed was "
                    f"{theirs.get('seed')}, this run's is {dm.hparams.seed}): the student would validate on images "
                    f"the teacher trained on; use data.seed {theirs.get('seed')} or retrain the teacher")
            # a teacher from before labels were recorded trained on every training label
            their_labeled = theirs.get("labeled") or theirs.get("train") or ours["train"]
            if their_labeled != ours["labeled"]:
                raise ValueError(
                    f"{field} was trained on other labelled images of this data than this student's (its "
                    f"data.labels_per_class was {theirs.get('labels_per_class')} with data.seed {theirs.get('seed')}, "
                    f"this run's {dm.hparams.get('labels_per_class')} with {dm.hparams.seed}): a teacher that saw "
                    f"labels the student holds back would fake the result; train the teacher on the same labelled "
                    f"images (same data.labels_per_class and data.seed)")

    def configure_model(self) -> None:
        if self.student is None:
            self._fill_student_config(**(self.teacher.task if self.teacher is not None else {}))  # no datamodule
            if not self._config_complete():
                raise ValueError("DistillModule: the student's num_classes/img_size/in_chans are unknown; "
                                 "set them in model.student or train with a datamodule")
            class_names = (self.hparams.get("data") or {}).get("class_names")
            self.student = build_student(**asdict(self.student_config), class_names=class_names,
                                         pretrained_field="model.student.pretrained")
            spec = self.student.distill_spec  # sizes a pretrained file recorded rebuild it later
            self._fill_student_config(**{k: spec[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")})
        if getattr(self, "val_metrics", None) is None:
            num_classes = model_meta(self.student)["num_classes"]
            names = ["acc", "acc_cls", "acc_dist", "acc_top5"]
            if self.teacher is not None:
                names += ["acc_teacher", "agreement", "acc_teacher_top5"]
            if isinstance(self.teacher, TeacherEnsemble):
                names += [f"acc_teacher_{i}" for i in range(len(self.teacher.members))]
            if self.hparams.ema_decay:
                names.append("acc_ema")
            self.val_metrics = accuracy_metrics(num_classes, names)
            self.test_metrics = accuracy_metrics(num_classes, names)
        if self.guidance_config is not None and self.guidance is None:
            meta = model_meta(self.student)
            self.guidance = FeatureGuidance(self.guidance_config, self.student, self.teacher, meta["in_chans"],
                                            meta["img_size"])
        if self.hparams.ema_decay and self.student_ema is None:
            from timm.utils import ModelEmaV3

            self.student_ema = ModelEmaV3(self.student, decay=self.hparams.ema_decay)
            self.student_ema.requires_grad_(False)

    def pretrained_input(self, in_chans: int) -> dict[str, Any] | None:
        """mean/std/img_size of the student's pretrained weights, for the datamodule's fields left unset."""
        cfg = self.student_config
        if cfg is not None and is_source(cfg.name):
            from ..models.sources import source_input_config

            return source_input_config(cfg.name, cfg.pretrained, in_chans, "model.student.name")
        if cfg is None or not cfg.pretrained:
            return None
        from ..models.pretrained import input_config

        arch = cfg.name if cfg.distilled else cfg.name.replace("_distilled", "")
        foreign = bool(cfg.pretrained_remap) or cfg.pretrained_match == "order"
        return input_config(cfg.pretrained, arch, in_chans, "model.student.pretrained", foreign=foreign)

    # ----------------------------------------------------------------------------------- steps
    def forward(self, x: torch.Tensor):
        return self.student(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]  # (x, y) or (x, y, keys) with data.keyed_views
        z_t = self.teacher.training_logits(batch) if self.loss.needs_teacher or self.guidance else None
        if self.guidance is not None:
            out, feats = self.guidance.student_forward(self.student, x)
            feature_loss = self.guidance.loss(feats)
        else:
            out, feature_loss = self.student(x), None
        terms = self.loss(out, z_t if self.loss.needs_teacher else None, y)
        total = terms.total
        if feature_loss is not None:
            total = total + self.guidance.weight * feature_loss
        if not self.loss.needs_teacher and isinstance(out, tuple):
            # Without a teacher term (mode none, alpha 0) the distillation head gets no gradient; touch
            # it with a zero so DDP's unused-parameter check does not fail.
            total = total + 0.0 * out[1].sum()
        if self._log_this_step(batch_idx):
            self.log("train/loss", total, prog_bar=True)
            self.log("train/loss_ce", terms.ce)
            self.log("train/loss_distill", terms.distill)
            self.log("train/labeled_fraction", terms.labeled_fraction)
            if feature_loss is not None:
                self.log("train/loss_feature", feature_loss)
        return total

    def configure_callbacks(self):
        # Stop on a non-finite loss before a checkpoint is written; keep RNG state for exact resume; stop a
        # teacher-cache view being built ahead when the fit ends or fails.
        callbacks = [NonFiniteLossGuard(), ResumeState(), StopViewsBuiltAhead()]
        if self.hparams.get("frozen_backbone_epochs"):
            from ..training.finetune import FrozenBackbone

            callbacks.append(FrozenBackbone(self.hparams.frozen_backbone_epochs, "student"))
        return callbacks

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

    def on_train_epoch_start(self) -> None:
        self.loss.set_epoch(self.current_epoch)  # DKD's warm-up reads it
        cached = attached_cache(self.teacher)
        if cached is not None:
            # The teacher cache builds this epoch's view when missing, and the next epoch's ahead when asked.
            cached.prepare_epoch(self.current_epoch, self._another_epoch_follows())

    def _another_epoch_follows(self) -> bool:
        """Whether the trainer will start another epoch after this one, as its limits tell now (`max_epochs`,
        `max_steps`; early stopping cannot be foreseen)."""
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and self.current_epoch + 1 >= trainer.max_epochs:
            return False
        if trainer.max_steps is not None and trainer.max_steps > 0:
            steps = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
            if not math.isfinite(steps) or self.global_step + math.ceil(steps) >= trainer.max_steps:
                return False
        return True

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
            if isinstance(self.teacher, TeacherEnsemble):
                members = self.teacher.member_logits(x)
                for i, z in enumerate(members):
                    metrics[f"acc_teacher_{i}"].update(z, y)
                z_t = self.teacher.combined(members)
            else:
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
                                hp.warmup_start_ratio, hp.cooldown_epochs, hp.lr_reference_batch,
                                hp.get("layer_decay"), extra=self.guidance, warmup_steps=hp.get("warmup_steps"))

    # ------------------------------------------------------------------------------ checkpoints
    def on_fit_start(self) -> None:
        # Lightning (2.6) no longer puts the module in train mode when fitting starts: a student handed
        # over in eval mode (`load_student` returns one) would train on its fused logits without drop
        # path. The frozen teacher and the EMA copy stay in eval (see `train`).
        self.train()
        self._hide_eval_mode_warning()
        hp, cache_cfg = self.hparams, self.teacher_cache_config
        use_cache = cache_cfg is not None and self.loss.needs_teacher and self.teacher is not None
        if self.teacher is not None:
            if use_cache:
                self.teacher.fingerprint()  # before any dtype cast: the cache identifies the teacher by it
            self.teacher.prepare(self._teacher_dtype(), hp.teacher_channels_last, hp.compile_teacher)
            # Opened and checked at every fit, not once: another fit of the same module may bring other
            # data or transforms, which the cache built for the first one must not answer for.
            self.teacher.attach_cache(None)
            if use_cache:
                from ..teacher.cache import compute_precision, open_cache, resolve_topk
                from ..teacher.cache_views import view_builder

                cache_cfg = resolve_topk(cache_cfg, self.loss.mode == "hard", self.teacher.identity["num_classes"])
                cache = open_cache(self.teacher, cache_cfg, self.trainer, self.device)
                dm = getattr(self.trainer, "datamodule", None)
                build = view_builder(self.teacher, cache_cfg, self.trainer, self.device) if dm is not None else None
                self.teacher.attach_cache(CachedTeacher(cache, cache_cfg.verify_batches,
                                                        compute_precision(self.teacher, self.trainer), build,
                                                        dm.hparams.get("view_epochs") if dm is not None else None))
        if hp.compile_student and self.student is not None and not self._student_compiled:
            self._student_compiled = True
            self.student.compile()
        # The teacher's lineage travels with the student run (W&B config, CSV hparams).
        resolved = {"student": dict(self.hparams["student"]), "data": dict(self.hparams.get("data") or {})}
        if self.teacher_identity:
            resolved["teacher_lineage"] = dict(self.teacher_identity)
        for logger in self.loggers:
            logger.log_hyperparams(resolved)

    def _hide_eval_mode_warning(self) -> None:
        """Lightning warns when fitting starts with modules in eval mode; the frozen teacher's and the
        EMA copy's are, by design. Hide that one message for this fit's start only (until
        `on_train_start`), and only when no other module is in eval mode."""
        from lightning.fabric.utilities.warnings import PossibleUserWarning

        in_eval = [name for name, m in self.named_modules() if not m.training]
        by_design = all(name == "teacher" or name.startswith(("teacher.", "student_ema")) for name in in_eval)
        if in_eval and by_design:
            message = rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training"
            warnings.filterwarnings("ignore", message=message, category=PossibleUserWarning)
            self._eval_mode_filter = warnings.filters[0]

    def on_train_start(self) -> None:
        entry = self.__dict__.pop("_eval_mode_filter", None)
        if entry is not None and entry in warnings.filters:
            warnings.filters.remove(entry)  # an "ignore" entry: nothing cached to invalidate

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["distill_teacher"] = dict(self.teacher_identity)
        checkpoint["distill_run"] = run_record(self._trainer)
        hp = checkpoint.get("hyper_parameters") or {}
        if isinstance(hp.get("student"), dict) and hp["student"].get("pretrained"):
            # the weights are in the checkpoint: reloading it needs no pretrained file
            hp["pretrained_from"] = hp["student"]["pretrained"]
            hp["student"] = {**hp["student"], "pretrained": None}
        if isinstance(hp.get("student"), dict) and is_source(hp["student"].get("name")) and self.student is not None:
            # the architecture the hf-hub:/local-dir: name resolved to: the checkpoint needs no folder
            hp["pretrained_from"] = hp["student"]["name"]
            hp["student"] = {**hp["student"], "name": self.student.distill_spec["name"]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is not in the checkpoint: it was reloaded from its file in __init__. Hand its
        # current weights back so the strict state_dict load still checks every student key.
        # Resuming (`trainer.fit(ckpt_path=...)`) builds the module from the recipe, without the recorded
        # teacher_sha256: compare the file's digest with the checkpoint's here.
        saved = checkpoint.get("distill_teacher") or {}
        saved_members = saved.get("members") or [saved]
        current_members = self.teacher_identity.get("members") or [self.teacher_identity]
        if saved and self.teacher is not None and len(saved_members) != len(current_members):
            raise ValueError(
                f"model.teacher: the checkpoint was trained with {len(saved_members)} teacher"
                f"{'s' if len(saved_members) > 1 else ''} but this run has {len(current_members)}; pass the same "
                f"teachers in the same order or start a new run")
        for i, (was, now) in enumerate(zip(saved_members, current_members)):
            if was.get("sha256") and now.get("sha256") and was["sha256"] != now["sha256"]:
                field = "model.teacher" if len(current_members) == 1 else f"model.teacher[{i}]"
                raise ValueError(
                    f"{field}: {now.get('path')!r} has sha256 {now['sha256'][:12]}... but the checkpoint was "
                    f"trained with {was['sha256'][:12]}...; the teacher file changed since, restore it or start a new run"
                )
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("guidance.guide.")]:
            del state[key]  # a teacher copy older guided checkpoints saved; the teacher comes from its file
        if self.teacher is not None:
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        if self.student is None:  # a checkpoint of a module whose student is built lazily
            self.configure_model()


def _check_class_head_trained(loss: DistillationLoss, student: Union[StudentConfig, dict, nn.Module]) -> None:
    """Refuses alpha 1 with a distillation token: the CE term weighs nothing, so the class head never
    gets a gradient, yet `val/acc`, the best-checkpoint choice and the default export read the fused
    heads `(z_cls + z_dist) / 2`, half of which stays at its initialisation. A student without token
    trains the same network minus the unused head (function matching), so nothing is lost by asking
    for it, while scoring the distillation head alone would make `val/acc` mean something else in
    some runs than in others."""
    if isinstance(student, nn.Module):
        token = is_distilled(student)
    else:
        token = (student.get("distilled", StudentConfig.distilled) if isinstance(student, dict) else student.distilled)
    if token and loss.needs_teacher and loss.alpha >= 1.0:
        raise ValueError(
            f"model.init_args.loss.alpha={loss.alpha:g} with a distillation token leaves the class head untrained "
            f"(no CE term), yet val/acc, the best checkpoint and the default export fuse it with the distillation "
            f"head; use a student without token (model.init_args.student.distilled: false) or alpha below 1")


def _teacher_weights_from_file(module: DistillModule, state_dict: dict, prefix: str, *args) -> None:
    """A student state_dict (checkpoints hold no teacher weights) loads strictly into a DistillModule:
    the teacher's keys are filled in with the weights it was reloaded with. `on_load_checkpoint` does
    this for a plain resume; FSDP loads the checkpoint's state_dict before any hook of the module runs."""
    if module.teacher is not None:
        for key, value in module.teacher.state_dict().items():
            state_dict.setdefault(f"{prefix}teacher.{key}", value)


def load_student(checkpoint: str | os.PathLike) -> nn.Module:
    """The student network alone from a step-2 checkpoint (no teacher needed), in eval mode."""
    from ..models.weights import split_checkpoint

    obj = load_weights_file(checkpoint)
    state_dict, hp = split_checkpoint(obj, "student.")
    if hp.get("distill_kind") != STUDENT_KIND:
        raise ValueError(f"{str(checkpoint)!r} is not a student (step 2) checkpoint of this toolkit")
    spec = {k: v for k, v in hp["student"].items() if k != "pretrained"}  # the checkpoint holds the weights
    model = build_student(**spec)
    model.load_state_dict(state_dict)
    data = hp.get("data") or {}
    if data:
        set_model_meta(model, num_classes=hp["student"]["num_classes"], in_chans=data["in_chans"],
                       img_size=hp["student"]["img_size"], class_names=data.get("class_names"),
                       mean=data.get("mean"), std=data.get("std"))
    # the eval transform validation used (distill.models.meta.eval_spec_of); absent in older checkpoints
    model.distill_eval = {k: data.get(k) for k in ("crop_pct", "interpolation")}
    return model.eval()
