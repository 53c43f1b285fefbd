"""Fine-tuning from pretrained weights: train only the new classifier head(s) for the first epochs.

A head initialised at random on top of a pretrained backbone sends large, noisy gradients into it;
training the head alone for a few epochs first (then everything) keeps more of what was pretrained
(the linear-probe-then-fine-tune recipe). `FrozenBackbone` does that for the teacher (step 1) and the
student (step 2, both heads of a distilled DeiT).

The backbone is frozen by `requires_grad_(False)` at the start of every epoch before `epochs`, not by
leaving it out of the optimizer: the optimizer holds every parameter from the start (AdamW skips a
parameter without a gradient: no update, no weight decay, no moment state), so unfreezing needs no
new optimizer or parameter group, and a resumed run freezes or not from its epoch alone. BatchNorm
statistics of a frozen CNN backbone still follow the new data (Lightning's `BaseFinetuning` default).
Under DDP, use `strategy: ddp_find_unused_parameters_true` (frozen parameters get no gradient).
"""
from __future__ import annotations

import lightning as L
from torch import nn


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s): timm's pretrained_cfg `classifier` (`fc`, `head.fc`,
    `head` and `head_dist` for a distilled DeiT)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return tuple(n for n in names if n)


def set_backbone_frozen(model: nn.Module, frozen: bool) -> int:
    """Freezes (or unfreezes) every parameter outside the classifier head(s); returns how many it set."""
    heads = head_prefixes(model)
    if not heads:
        raise ValueError(f"model.frozen_backbone_epochs: {type(model).__name__} names no classifier in its "
                         f"pretrained_cfg; set frozen_backbone_epochs: 0")
    count = 0
    for name, p in model.named_parameters():
        if not any(name == h or name.startswith(h + ".") for h in heads):
            p.requires_grad_(not frozen)
            count += 1
    return count


class FrozenBackbone(L.Callback):
    """Trains only the classifier head(s) of `pl_module.<network>` for the first `epochs` epochs.

    Args:
        epochs: epochs with the backbone frozen (0 = never frozen).
        network: attribute of the LightningModule holding the timm network (`model`, `student`).
    """

    def __init__(self, epochs: int, network: str) -> None:
        if epochs < 0:
            raise ValueError(f"model.frozen_backbone_epochs={epochs} must be >= 0")
        self.epochs, self.network = int(epochs), network

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_backbone_frozen(getattr(pl_module, self.network), trainer.current_epoch < self.epochs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_backbone_frozen(getattr(pl_module, self.network), False)  # leave the network as it was found
