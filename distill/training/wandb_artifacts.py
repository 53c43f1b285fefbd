"""Checkpoints and exports as W&B model artifacts.

- `--wandb.log_model true|all` (`WandbOptions.log_model`): Lightning's `WandbLogger(log_model=...)`
  logs the best and last checkpoints when training ends (`true`) or each checkpoint as it is written
  (`all`), as versions of the artifact `model-<run id>`. `ArtifactWandbLogger` is that logger with one
  change: the copies W&B takes of the files (its "staging" area, which `wandb sync` uploads from) go
  into the run's own `wandb/` folder instead of the user-wide W&B data folder, so an offline run keeps
  its artifacts with it (unless WANDB_DATA_DIR says otherwise).
- `log_export(folder, run, ...)`: `distill export --format hf` of a checkpoint a W&B run wrote logs the
  exported folder as the artifact `hf-model-<run id>` of that same run (`wandb.init(id=..., resume=
  "allow")`). An offline run (its folder `offline-run-*`) gets an offline continuation beside it, which
  `wandb sync` uploads into the same run; an online run is continued online when credentials are there.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("distill")


def _wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:  # a stored login (wandb login) counts as credentials
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except Exception:  # noqa: BLE001 - no or unreadable ~/.netrc
        pass
    log.warning("W&B: no credentials found (WANDB_API_KEY or `wandb login`): logging offline; `wandb sync` uploads later")
    return "offline"


@contextmanager
def staged_in(wandb_dir: str | os.PathLike) -> Iterator[None]:
    """W&B's staging copies go under `wandb_dir/artifacts/staging` meanwhile (unless WANDB_DATA_DIR is set)."""
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(wandb_dir)
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


class ArtifactWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose `log_model` checkpoint copies are staged in the run's `wandb/` folder."""

    def _wandb_dir(self) -> Path:
        return Path(self.save_dir or ".") / "wandb"

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        with staged_in(self._wandb_dir()):
            super().after_save_checkpoint(checkpoint_callback)

    def finalize(self, status: str) -> None:
        with staged_in(self._wandb_dir()):
            super().finalize(status)


def run_folder(run_dir: str | os.PathLike | None, run_id: str) -> Path | None:
    """The newest W&B folder of run `run_id` under `run_dir/wandb` (offline-run-* or run-*), if any."""
    if not run_dir:
        return None
    found = Path(run_dir, "wandb").glob(f"*run-*-{run_id}")
    found = sorted(found, key=lambda p: p.name[: -len(run_id) - 1].rsplit("-", 1)[-1])  # by the timestamp
    return found[-1] if found else None


def log_export(folder: str | os.PathLike, run: dict[str, Any], *, project: str | None = None, entity: str | None = None,
               metadata: dict[str, Any] | None = None, aliases: list[str] | None = None) -> str | None:
    """Logs `folder` as a model artifact of the W&B run `run["wandb_id"]` whose folder is under
    `run["run_dir"]`; returns a line saying what was done, or None when there is no such run folder or
    wandb is not installed (the card and config.json still record the run id)."""
    run_id = run.get("wandb_id")
    found = run_folder(run.get("run_dir"), run_id) if run_id else None
    if found is None:
        return None
    try:
        import wandb
    except ImportError:
        return None
    from .lineage import finish_wandb

    offline = found.name.startswith("offline-")
    if offline:
        mode = "offline"
    else:
        mode = _wandb_mode(None)
    finish_wandb()
    name = f"hf-model-{run_id}"
    with staged_in(Path(run["run_dir"]) / "wandb"):
        kwargs = dict(id=run_id, resume="allow", project=project or "distill", entity=entity, dir=str(run["run_dir"]))
        try:
            wb_run = wandb.init(mode=mode, **kwargs)
        except Exception:  # noqa: BLE001 - no network or server: keep it offline, `wandb sync` uploads later
            if mode == "offline":
                raise
            finish_wandb()
            mode, wb_run = "offline", wandb.init(mode="offline", **kwargs)
        artifact = wandb.Artifact(name, type="model", metadata=dict(metadata or {}),
                                  description=f"distill export --format hf of run {run_id}")
        artifact.add_dir(str(folder))
        wb_run.log_artifact(artifact, aliases=["latest", *(aliases or [])])
        where = Path(wb_run.dir).parent
        wb_run.finish()
    if mode == "offline":
        return f"W&B: logged {folder} as artifact {name} of run {run_id}, offline in {where} (`wandb sync {where}` uploads it)"
    return f"W&B: logged {folder} as artifact {name} of run {run_id}"
