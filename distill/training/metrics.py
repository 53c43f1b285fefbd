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


class EvaluationSteps:
    """validation/test/predict steps shared by the teacher and student modules: `_eval_step(batch,
    metrics)` updates the stage's accuracies, which are logged as `val/<name>` or `test/<name>`."""

    prog_bar_metrics: tuple[str, ...] = ("acc",)

    def _log_metrics(self, prefix: str, metrics: nn.ModuleDict) -> None:
        for name, m in metrics.items():
            self.log(f"{prefix}/{name}", m, prog_bar=name in self.prog_bar_metrics)

    def on_validation_epoch_end(self) -> None:
        # Where these val/ metrics are measured: a checkpoint written later (a step checkpoint, the end
        # of a max_steps run) still carries them, and `lineage.run_record` says they are older.
        if not self.trainer.sanity_checking:
            self.validated_at = dict(epoch=int(self.trainer.current_epoch), global_step=int(self.trainer.global_step))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch, batch_idx: int):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)
