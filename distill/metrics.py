"""torchmetrics accuracies under the toolkit's stable names."""
from __future__ import annotations

from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def accuracy_metrics(num_classes: int, names: list[str]) -> nn.ModuleDict:
    """One micro-averaged accuracy per name; names ending in `_top5` count top-5 hits and are dropped
    when there are fewer than 5 classes."""
    metrics = {}
    for name in names:
        top_k = 5 if name.endswith("_top5") else 1
        if top_k <= num_classes:
            metrics[name] = MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")
    return nn.ModuleDict(metrics)
