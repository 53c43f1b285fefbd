"""AdamW and the warm-up + cosine schedule shared by both steps."""
from __future__ import annotations

import math

import torch
from torch import nn
from timm.optim import create_optimizer_v2


def adamw(model: nn.Module, lr: float, weight_decay: float, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters only, with no weight decay on norms, biases and whatever the model
    lists in `no_weight_decay()` (timm ViTs: position embedding, class and distillation tokens)."""
    kwargs = {}
    if fused is None:
        fused = torch.cuda.is_available() and all(p.is_cuda for p in model.parameters())
    if fused:
        kwargs["fused"] = True
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, filter_bias_and_bn=True, **kwargs)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the base lr over `warmup_steps`, then cosine decay to
    `min_lr_ratio * lr` at `total_steps`. Stepped every optimizer step."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_config(module, model: nn.Module, lr: float, weight_decay: float, warmup_epochs: float,
                     min_lr_ratio: float) -> dict:
    """`configure_optimizers` output for a LightningModule training `model` (a submodule)."""
    opt = adamw(model, lr, weight_decay)
    trainer = module.trainer
    total = trainer.estimated_stepping_batches
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    steps_per_epoch = max(1, total // max_epochs) if math.isfinite(total) else 1
    sched = warmup_cosine(opt, total if math.isfinite(total) else 10**9, warmup_epochs * steps_per_epoch, min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
