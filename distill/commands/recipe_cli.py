"""The LightningCLI behind `distill fit|validate|test|predict --config RECIPE.yaml` and behind each
step of `distill pipeline`: the toolkit's defaults (run folder, CSV log, best and last checkpoints,
optional W&B, a summary after each step).

It lives apart from distill/cli.py so that `distill --help` and the toolkit's own subcommands do not
load Lightning (seconds): this module is imported only when a recipe runs.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import lightning as L
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from ..data.datamodule import ImageDataModule
from ..training.fault_tolerance import AtomicCheckpointIO, BestAndLastCheckpoint
from ..training.lineage import RunSummary, finish_wandb
from ..training.progress import progress_output

log = logging.getLogger("distill")
# `distill pipeline` runs LightningCLI in-process with args of its own, which is what this warns about.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


@dataclass
class WandbOptions:
    """Weights & Biases tracking, used when `logger: wandb`.

    Args:
        project: W&B project.
        name: run name; None = W&B's own.
        tags: run tags.
        entity: W&B entity (user or team); None = the default one.
        group: run group, e.g. one per pipeline.
        mode: online | offline | disabled; None = WANDB_MODE, else online with credentials and
            offline without (a run never fails or hangs for want of credentials or network).
        log_model: log checkpoints as W&B model artifacts (Lightning's `WandbLogger(log_model=...)`):
            true = the best and the last checkpoint when training ends, all = every checkpoint when it
            is written, false = none. An offline run keeps them in its run folder until `wandb sync`.
    """

    project: str = "distill"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    entity: str | None = None
    group: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    log_model: Union[bool, Literal["all"]] = False


class RecipeConfigCallback(SaveConfigCallback):
    """Writes the resolved recipe to the run folder (config.yaml) and logs it to every logger."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        recipe = yaml.safe_load(self.parser.dump(self.config, skip_unset=False)) or {}
        for logger in trainer.loggers:
            logger.log_hyperparams({"recipe": recipe})


class _Parsed(Exception):
    def __init__(self, config) -> None:
        self.config = config


class DistillCLI(LightningCLI):
    """LightningCLI with the toolkit's defaults: a CSV log and checkpoints (best and last) in the run
    folder (`trainer.default_root_dir`), optional W&B tracking, the progress bar on a terminal and one
    line per epoch in a log file (`distill.training.progress`), a summary after each step."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        super().__init__(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=ImageDataModule,
            save_config_callback=RecipeConfigCallback,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": "runs/default", "log_every_n_steps": 10},
            parser_kwargs={"default_env": False, "exit_on_error": False},
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            args=args,
            run=run,
            **kwargs,
        )

    @classmethod
    def parse_recipe(cls, args: list[str]):
        """The validated, resolved configuration of a recipe (with overrides), without building anything."""
        return cls._parse(args)[1]

    @classmethod
    def recorded_recipe(cls, args: list[str]) -> dict:
        """The resolved recipe as a run's config.yaml records it (`RecipeConfigCallback`), without building
        anything: what tells whether a run folder was written by this very recipe."""
        cli, config = cls._parse(args)
        return yaml.safe_load(cli.parser.dump(config, skip_unset=False))

    @classmethod
    def _parse(cls, args: list[str]):
        cli = cls.__new__(cls)
        cli._parse_only = True
        try:
            cli.__init__(args=args, run=False)
        except _Parsed as parsed:
            return cli, parsed.config
        raise AssertionError("unreachable")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the recipe's model section with the checkpoint's hyper-parameters
        # (which only works for checkpoints that record a `_class_path`). The recipe stays the source of
        # truth here; the modules check the checkpoint against it when its weights are loaded.
        return

    def before_instantiate_classes(self) -> None:
        if getattr(self, "_parse_only", False):
            raise _Parsed(self.config)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--logger", type=Literal["csv", "wandb"], default="csv",
                            help="csv: a CSV log in the run folder; wandb: W&B as well (see --wandb.*)")
        parser.add_class_arguments(WandbOptions, "wandb", instantiate=False)
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1, "checkpoint.filename": "best-epoch{epoch:03d}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config["trainer"]
        root = Path(trainer_cfg.get("default_root_dir") or "runs/default")
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers(config, root)
        if not trainer_cfg.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        callbacks = [RunSummary()]  # the modules add NonFiniteLossGuard and ResumeState themselves
        # The progress bar on a terminal; in a log file (CI, nohup, SLURM) one line per epoch instead of
        # thousands of carriage-return refreshes. An explicit trainer.enable_progress_bar wins.
        kwargs["enable_progress_bar"], epoch_lines = progress_output(trainer_cfg.get("enable_progress_bar"))
        callbacks += epoch_lines
        if kwargs.get("logger") or trainer_cfg.get("logger"):
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        trainer = super().instantiate_trainer(**kwargs)
        # In front: the guard must run before ModelCheckpoint, which Lightning keeps last.
        trainer.callbacks[0:0] = callbacks
        return trainer

    def _loggers(self, config, root: Path) -> list:
        # CSV first: trainer.log_dir (checkpoints, config.yaml, attention maps) is then the run folder itself.
        loggers: list = [CSVLogger(save_dir=str(root), name="", version="")]
        if config.get("logger") == "wandb":
            from ..training.wandb_artifacts import ArtifactWandbLogger, _wandb_mode  # Lightning's, artifacts staged in the run folder

            opts = config["wandb"]
            opts = opts if isinstance(opts, dict) else vars(opts)
            resume_id = self._resume_wandb_id(config, root)
            kwargs = dict(project=opts.get("project"), name=opts.get("name"), tags=list(opts.get("tags") or []),
                          entity=opts.get("entity"), group=opts.get("group"), save_dir=str(root), id=resume_id,
                          resume="allow" if resume_id else None, log_model=opts.get("log_model") or False)
            mode = _wandb_mode(opts.get("mode"))
            if mode == "online":
                import wandb

                kwargs["settings"] = wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)))
            logger = ArtifactWandbLogger(mode=mode, **kwargs)
            if mode == "online":
                # Connect now rather than in the middle of training, and fall back to offline when the
                # server cannot be reached: a run never fails for want of network.
                try:
                    logger.experiment  # noqa: B018 - starts the run
                except Exception as e:  # noqa: BLE001 - wandb raises several kinds of network errors
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    log.warning("W&B: cannot reach the server (%s): logging offline; `wandb sync` uploads later", reason)
                    finish_wandb()
                    logger = ArtifactWandbLogger(mode="offline", **kwargs)
            loggers.append(logger)
        return loggers

    def _resume_wandb_id(self, config, root: Path) -> str | None:
        """The W&B run id stored in the checkpoint being resumed, so the same run continues."""
        ckpt = config.get("ckpt_path")
        if not ckpt:
            return None
        path = root / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
        if not path.is_file():
            return None
        from ..models.weights import load_weights_file

        return (load_weights_file(path).get("distill_run") or {}).get("wandb_id")
