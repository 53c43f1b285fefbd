"""Test callbacks that record what each process drew or saw, written as JSON into the run folder.

Loaded by `--trainer.callbacks` in subprocess runs (tests put tests/helpers on PYTHONPATH)."""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch


def _write(trainer: L.Trainer, name: str, obj) -> None:
    path = Path(trainer.default_root_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


class RecordDraws(L.Callback):
    """Per process: the mixup/cutmix parameters drawn for each training batch (timm's Mixup draws them
    from NumPy's global RNG), the next torch/NumPy/Python random numbers at each batch start (peeked:
    the states are put back) and the sample indices of keyed batches; saved as draws-rank{r}.json
    when fitting ends."""

    def __init__(self) -> None:
        self.lams: list[list] = []
        self.states: list[list[float]] = []
        self.keys: list[list[int]] = []
        self.views: list[list[int]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        mixup = getattr(trainer.datamodule, "mixup_fn", None)
        if mixup is not None and not getattr(mixup, "_recorded", False):
            draw = mixup._params_per_batch

            def recorded():
                lam, use_cutmix = draw()
                self.lams.append([float(lam), bool(use_cutmix)])
                return lam, use_cutmix

            mixup._params_per_batch, mixup._recorded = recorded, True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        t, n, p = torch.get_rng_state(), np.random.get_state(), random.getstate()
        self.states.append([torch.rand(1).item(), float(np.random.rand()), random.random()])
        torch.set_rng_state(t), np.random.set_state(n), random.setstate(p)
        if len(batch) == 3:  # keyed views: the sample indices of the batch
            self.keys.append([int(i) for i in batch[2][:, 0]])
            self.views.append([int(v) for v in batch[2][:, 1]])

    def on_fit_end(self, trainer, pl_module) -> None:
        _write(trainer, f"draws-rank{trainer.global_rank}.json", {"lams": self.lams, "states": self.states,
                                                                    "keys": self.keys, "views": self.views})


class CountValidation(L.Callback):
    """Each validation pass of the run: the number of samples all processes evaluated together and a
    checksum (the sum of per-sample CRC32s of the images), summed over processes; saved by rank 0 as
    val-counts.json at the end of fit or validate. Equal to the validation set's own count and
    checksum only if every sample was evaluated exactly once."""

    def __init__(self) -> None:
        self.passes: list[list[int]] = []
        self._local = [0, 0]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._local = [0, 0]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x = batch[0].detach().cpu().contiguous()
        self._local[0] += int(x.shape[0])
        self._local[1] += sum(zlib.crc32(x[i].numpy().tobytes()) for i in range(x.shape[0]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        total = torch.tensor(self._local, dtype=torch.int64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        self.passes.append(total.tolist())

    def teardown(self, trainer, pl_module, stage: str) -> None:  # after fit and validate alike
        if trainer.global_rank == 0:
            _write(trainer, "val-counts.json", self.passes)


class CountTest(CountValidation):
    """CountValidation for `trainer.test`: each test pass's [count, checksum], saved by rank 0 as test-counts.json."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        pass

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        CountValidation.on_validation_epoch_start(self, trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        CountValidation.on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        CountValidation.on_validation_epoch_end(self, trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank == 0:
            _write(trainer, "test-counts.json", self.passes)


def image_checksum(dataset) -> list[int]:
    """[count, checksum] of a dataset of (image tensor, label), as CountValidation sums them."""
    crcs = [zlib.crc32(dataset[i][0].contiguous().numpy().tobytes()) for i in range(len(dataset))]
    return [len(crcs), sum(crcs)]


class PeakAtFirstEpoch(L.Callback):
    """Logs `val/probe_peak`, a monitored value that is best at epoch 0 and worse at every later epoch,
    as a validation accuracy that peaks early would be."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("val/probe_peak", 1.0 / (1 + trainer.current_epoch))


class LossInputs(L.Callback):
    """In-process probe of a `DistillModule`'s loss: at every training step, what `pl_module.loss` was
    called with (student output, teacher logits, target) and returned (`LossTerms`), and the batch the
    step got (x, y and, with keyed views, the keys), all detached copies, one entry per step."""

    def __init__(self) -> None:
        self.batches: list[tuple] = []
        self.calls: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def detached(v):
            if isinstance(v, (tuple, list)):
                items = [detached(t) for t in v]
                return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)  # LossTerms: a NamedTuple
            return v.detach().clone() if torch.is_tensor(v) else v

        def before(_module, args):
            self.calls.append({"student": detached(args[0]), "teacher": detached(args[1]), "target": detached(args[2])})

        def after(_module, _args, out):
            self.calls[-1]["terms"] = detached(out)

        pl_module.loss.register_forward_pre_hook(before)
        pl_module.loss.register_forward_hook(after)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        x, y = batch[0].detach().clone(), batch[1].detach().clone()
        self.batches.append((x, y, np.array(batch[2])) if len(batch) == 3 else (x, y))
