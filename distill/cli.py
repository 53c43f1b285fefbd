"""The former home of the `distill` command (now `distill.commands.main`): `python -m distill.cli`, the
README's torchrun/SLURM lines, and console scripts installed before the move still run it."""
from __future__ import annotations

from .commands import main as _command
from .commands.main import main

__all__ = ["main"]


def __getattr__(name: str):
    # `from distill.cli import DistillCLI` keeps working (through distill.commands.main; Lightning loads then)
    return getattr(_command, name)


if __name__ == "__main__":
    raise SystemExit(main())
