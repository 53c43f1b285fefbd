"""What a recipe run prints while training: one line per epoch when stdout is a file (CI, nohup, SLURM),
Lightning's progress bar on a terminal, and the user's `trainer.enable_progress_bar` above both."""
from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill.training.progress import EpochLines

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config", str(REPO / "recipes/digits/teacher.yaml"), "--model.init_args.model", "cifar_resnet10",
        "--model.init_args.model_kwargs", '{"base_width": 8}', "--trainer.enable_model_summary", "false"]


def test_a_log_file_gets_one_line_per_epoch_and_no_carriage_returns(tmp_path):
    log = tmp_path / "out.log"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        res = subprocess.run([sys.executable, "-m", "distill.cli", "fit", *TINY, "--trainer.max_epochs", "3",
                              "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
                              "--trainer.check_val_every_n_epoch", "2", "--trainer.log_every_n_steps", "1",
                              "--trainer.default_root_dir", str(tmp_path / "run")], stdout=out, stderr=subprocess.PIPE,
                             env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:].decode()
    text = log.read_bytes().decode()  # as written: text mode would read carriage returns as newlines
    assert "\r" not in text and b"\r" not in res.stderr  # no progress-bar refreshes
    lines = [x for x in text.splitlines() if re.match(r"\[teacher\] epoch \d", x)]
    assert len(lines) == 3, text
    number = r"\d+\.\d{4}"
    assert re.fullmatch(rf"\[teacher\] epoch 1/3  step 4  train/loss {number}  \d+\.\d s", lines[0]), lines[0]
    # validated on epoch 2 only (check_val_every_n_epoch 2)
    assert re.fullmatch(rf"\[teacher\] epoch 2/3  step 8  train/loss {number}  val/acc {number}  \d+\.\d s",
                        lines[1]), lines[1]
    assert "val/acc" not in lines[2] and lines[2].startswith("[teacher] epoch 3/3  step 12  train/loss ")
    assert len(text.splitlines()) < 20  # the epoch lines, the run summary, little else
    # the numbers: each line's loss is the mean of its epoch's 4 step losses, its val/acc the validation's,
    # as the CSV logger recorded them step by step
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    for epoch, line in enumerate(lines):
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss") and int(r["epoch"]) == epoch]
        assert len(losses) == 4
        printed = float(re.search(r"train/loss (\S+)", line).group(1))
        assert printed == pytest.approx(sum(losses) / 4, abs=6e-5), (line, losses)
    (val,) = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert f"val/acc {val:.4f}" in lines[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Log(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("stdout, flag, bar", [(Terminal, None, True), (Log, None, False),
                                               (Log, "true", True), (Terminal, "false", False)])
def test_the_bar_on_a_terminal_and_the_users_setting_wins(tmp_path, monkeypatch, stdout, flag, bar):
    from distill.commands.recipe_cli import DistillCLI

    monkeypatch.setattr(sys, "stdout", stdout())
    args = [*TINY, "--trainer.default_root_dir", str(tmp_path / "run")]
    if flag is not None:
        args += ["--trainer.enable_progress_bar", flag]
    trainer = DistillCLI(args=args, run=False).trainer
    assert (trainer.progress_bar_callback is not None) == bar
    assert any(isinstance(c, EpochLines) for c in trainer.callbacks) == (not bar)  # lines whenever there is no bar
