"""tools/plot_run.py: curves of a run from its CSV logs."""
from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from conftest import load_tool
from PIL import Image


@pytest.fixture(scope="module")
def plot_run():
    return load_tool("plot_run")


def write_log(folder: Path, student: bool, epochs: int = 4, steps_per_epoch: int = 3) -> Path:
    """A metrics.csv as Lightning's CSVLogger writes it: training terms per step, validation per epoch."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(folder, name="lightning_logs")
    step = 0
    for e in range(epochs):
        for s in range(steps_per_epoch):
            loss = 2.0 * math.exp(-0.4 * (e + s / steps_per_epoch))
            m = {"train/loss": loss, "epoch": e}
            if student:
                m.update({"train/loss_ce": 0.6 * loss, "train/loss_distill": 0.4 * loss})
            logger.log_metrics(m, step=step)
            step += 1
        acc = 1 - 0.8 * math.exp(-0.7 * e)
        v = {"val/acc": acc, "val/acc_top5": 1.0, "epoch": e}
        if student:
            v.update({"val/acc_cls": acc - 0.02, "val/acc_dist": acc + 0.01, "val/acc_teacher": 0.97,
                      "val/agreement": acc - 0.05})
        logger.log_metrics(v, step=step - 1)
    logger.save()
    return Path(logger.log_dir) / "metrics.csv"


def assert_png(path: Path, size_px: tuple[int, int]) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size_px
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, "blank figure"


def test_pipeline_run_folder(plot_run, tmp_path, capsys):
    run = tmp_path / "run"
    write_log(run / "teacher", student=False)
    write_log(run / "student", student=True)
    assert plot_run.main([str(run), "--dpi", "50"]) == 0
    out = run / "curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    # two runs (teacher, student) -> two rows of ROW_W x ROW_H inches
    assert_png(out, (round(plot_run.ROW_W * 50), round(2 * plot_run.ROW_H * 50)))


def test_curves_are_per_epoch_means(plot_run, tmp_path):
    log = write_log(tmp_path, student=True, epochs=3, steps_per_epoch=3)
    curves = plot_run.read_curves(log)
    assert set(curves) == {"train/loss", "train/loss_ce", "train/loss_distill", "val/acc", "val/acc_cls",
                           "val/acc_dist", "val/acc_teacher", "val/agreement"}
    epochs, losses = curves["train/loss"]
    assert epochs == [0, 1, 2]
    expected = [np.mean([2.0 * math.exp(-0.4 * (e + s / 3)) for s in range(3)]) for e in range(3)]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    np.testing.assert_allclose(curves["val/acc"][1], [1 - 0.8 * math.exp(-0.7 * e) for e in range(3)], rtol=1e-6)


def test_epoch_column_preferred_and_out_option(plot_run, tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss_step,train/loss_epoch,val/acc\n"
                   "0,0,9.0,,\n0,1,9.0,,\n0,1,,1.5,0.5\n1,3,9.0,,\n1,3,,1.0,0.75\n")
    assert plot_run.read_curves(log)["train/loss"] == ([0, 1], [1.5, 1.0])
    out = tmp_path / "figs" / "single.png"
    assert plot_run.main([str(log), "--out", str(out), "--dpi", "40"]) == 0
    assert_png(out, (round(plot_run.ROW_W * 40), round(plot_run.ROW_H * 40)))


def test_the_pipelines_revalidation_of_the_chosen_checkpoint_is_not_an_epoch(plot_run, tmp_path):
    """After training, the pipeline validates the best checkpoint again; Lightning logs it with the next
    epoch number (as in a real pipeline's metrics.csv: epoch 100 after 0-99)."""
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss,val/acc\n0,4,2.0,\n0,4,,0.5\n1,9,1.0,\n1,9,,0.75\n2,10,,0.6\n")
    curves = plot_run.read_curves(log)
    assert curves["val/acc"] == ([0, 1], [0.5, 0.75]) and curves["train/loss"] == ([0, 1], [2.0, 1.0])
    only_validation = tmp_path / "validate.csv"
    only_validation.write_text("epoch,step,val/acc\n0,0,0.5\n")
    assert plot_run.read_curves(only_validation)["val/acc"] == ([0], [0.5])


@pytest.mark.parametrize("case", ["missing", "no_csv", "unknown_columns"])
def test_errors(plot_run, tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "unknown_columns":
        (run / "metrics.csv").write_text("epoch,step,other\n0,0,1.0\n")
    assert plot_run.main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("plot_run.py: error:"), err
    assert not (run / "curves.png").exists()


def test_table_of_runs_stopped_at_other_epochs(plot_run, tmp_path, capsys):
    """--table: val/acc of each run at each validated epoch, "-" where a run stopped before it; the
    command on top runs as written, even for a folder whose name has a space."""
    runs = tmp_path / "study runs"
    for name, accs in (("none-seed0", [0.5, 0.55, 0.58]), ("token_soft-seed0", [0.52, 0.6])):
        (runs / name).mkdir(parents=True)
        rows = [f"{e},{10 * e + 9},0.9,\n{e},{10 * e + 9},,{a}\n" for e, a in zip((19, 39, 59), accs)]
        (runs / name / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n" + "".join(rows))
    table = tmp_path / "curves.md"
    argv = [str(runs), "--out", str(tmp_path / "c.png"), "--dpi", "40", "--table", str(table)]
    assert plot_run.main(argv) == 0
    lines = table.read_text().splitlines()
    command = re.fullmatch(r"Command: `(.*)`", lines[0]).group(1)
    assert shlex.split(command) == ["python", "tools/plot_run.py", *argv], command
    assert lines[4:] == ["| run | epoch 20 | epoch 40 | epoch 60 |", "| --- | --- | --- | --- |",
                         "| none-seed0 | 50.00 | 55.00 | 58.00 |", "| token_soft-seed0 | 52.00 | 60.00 | - |"]
