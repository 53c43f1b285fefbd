"""AdamW and the warm-up + cosine (+ cool-down) schedule shared by both steps."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn
from timm.optim import create_optimizer_v2

log = logging.getLogger(__name__)


def adamw(model: nn.Module, lr: float, weight_decay: float, fused: bool | None = None,
          extra: nn.Module | None = None, layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters (and `extra`'s, e.g. feature-guidance projections), with no
    weight decay on norms, biases and whatever the model lists in `no_weight_decay()` (timm ViTs:
    position embedding, class and distillation tokens).

    `layer_decay` (fine-tuning, BEiT/DeiT-III style): timm's `param_groups_layer_decay` puts each layer
    of `model` in its own group with `lr_scale = layer_decay ** (last layer - layer)` (the head gets `lr`,
    the patch embedding the smallest share); the scale is folded into each group's `lr` here, because the
    schedule (a LambdaLR) multiplies each group's own initial lr and knows nothing of `lr_scale`."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    kwargs = {}
    modules = [model] + ([extra] if extra is not None else [])
    if fused is None:
        fused = torch.cuda.is_available() and all(p.is_cuda for m in modules for p in m.parameters())
    if fused:
        kwargs["fused"] = True
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"model.layer_decay={layer_decay} must lie in (0, 1] (DeiT-III/BEiT fine-tuning: 0.65-0.75) "
                         f"or be null")
    groups = []
    for i, m in enumerate(modules):
        skip = m.no_weight_decay() if hasattr(m, "no_weight_decay") else ()
        if i == 0 and layer_decay is not None:
            groups += param_groups_layer_decay(m, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
        else:
            groups += param_groups_weight_decay(m, weight_decay, no_weight_decay_list=skip)
    opt = create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=weight_decay, **kwargs)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return opt


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.01,
    warmup_start_ratio: float = 0.0, cooldown_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from `warmup_start_ratio * lr` to the base lr over `warmup_steps`, cosine decay to
    `min_lr_ratio * lr` over the following steps up to `total_steps - cooldown_steps`, then
    `min_lr_ratio * lr` for the last `cooldown_steps` (DeiT's cool-down epochs). Stepped every optimizer
    step; `total_steps` is the number of optimizer steps of the whole run."""
    total_steps = max(1, int(total_steps))
    cooldown_steps = min(max(0, int(cooldown_steps)), total_steps - 1)
    decay_end = total_steps - cooldown_steps
    warmup_steps = min(max(0, int(warmup_steps)), decay_end - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_ratio + (1.0 - warmup_start_ratio) * (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, decay_end - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(trainer) -> int:
    """Optimizer steps in one real epoch: the training batches the trainer will draw per epoch (after
    `limit_train_batches`, per device) divided by `accumulate_grad_batches`, rounded up as Lightning
    steps on the last batch of an epoch."""
    if not math.isfinite(trainer.num_training_batches):
        # estimated_stepping_batches does not load the data when only max_steps is set
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError("the training data has no length (an iterable dataset): give trainer.max_steps and "
                         "set model.init_args.warmup_epochs: 0, or use a map-style dataset")
    return max(1, math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches)))


def global_batch_size(trainer) -> int:
    """Samples per optimizer step over all devices: batch x devices x nodes x accumulation."""
    dm = getattr(trainer, "datamodule", None)
    batch = getattr(dm, "batch_size", None) or getattr(trainer.train_dataloader, "batch_size", None)
    if not batch:
        raise ValueError("model.init_args.lr_reference_batch needs the per-device batch size; train with a "
                         "datamodule that has batch_size or set lr_reference_batch: null")
    return int(batch) * trainer.world_size * max(1, trainer.accumulate_grad_batches)


def scaled_lr(trainer, lr: float, reference_batch: int | None) -> float:
    """`lr` for the run's global batch: `lr * global_batch / reference_batch` (DeiT: 5e-4 x batch / 512),
    or `lr` itself when `reference_batch` is None."""
    if not reference_batch:
        return lr
    if reference_batch < 1:
        raise ValueError(f"model.init_args.lr_reference_batch={reference_batch} must be a positive batch size or null")
    batch = global_batch_size(trainer)
    effective = lr * batch / reference_batch
    if trainer.is_global_zero:
        log.info("lr %.3g = %.3g x global batch %d / %d", effective, lr, batch, reference_batch)
    return effective


def optimizer_config(module, model: nn.Module, lr: float, weight_decay: float, warmup_epochs: float,
                     min_lr_ratio: float, warmup_start_ratio: float = 0.0, cooldown_epochs: float = 0.0,
                     lr_reference_batch: int | None = None, layer_decay: float | None = None,
                     extra: nn.Module | None = None, warmup_steps: int | None = None) -> dict:
    """`configure_optimizers` output for a LightningModule training `model` (a submodule).

    The schedule follows the real run: warm-up and cool-down are measured in real epochs (batches per
    epoch and gradient accumulation included) and the cosine ends where training ends, whether that
    is set by `trainer.max_epochs`, `trainer.max_steps` or both. `warmup_steps`, when given, is the
    warm-up in optimizer steps instead of `warmup_epochs`. `layer_decay`: see `adamw`."""
    trainer = module.trainer
    total = trainer.estimated_stepping_batches  # also loads the training data: num_training_batches is known
    per_epoch = steps_per_epoch(trainer) if (warmup_epochs or cooldown_epochs) else 1
    if not math.isfinite(total):
        raise ValueError("the run has no end: set trainer.max_epochs or trainer.max_steps")
    lr = scaled_lr(trainer, lr, lr_reference_batch)
    opt = adamw(model, lr, weight_decay, extra=extra, layer_decay=layer_decay)
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0):
        raise ValueError(f"model.init_args.warmup_steps={warmup_steps!r} must be a whole number >= 0 or null "
                         f"(then warmup_epochs applies)")
    warmup = round(warmup_epochs * per_epoch) if warmup_steps is None else warmup_steps
    sched = warmup_cosine(opt, int(total), warmup, min_lr_ratio, warmup_start_ratio, round(cooldown_epochs * per_epoch))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
