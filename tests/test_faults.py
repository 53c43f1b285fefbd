"""Faults: SIGKILL then `--ckpt_path last` ends where an uninterrupted run ends; a kill during a
checkpoint write leaves the previous one loadable; a non-finite loss stops the run and keeps the last
good checkpoint; pickles that would run code are refused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill import build_teacher
from distill.commands.main import main
from distill.training.fault_tolerance import AtomicCheckpointIO

REPO = Path(__file__).resolve().parent.parent
TEACHER = str(REPO / "recipes/digits/teacher.yaml")
QUICK = ["--model.init_args.model", "cifar_resnet10", "--trainer.limit_train_batches", "4",
         "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--data.crop", "pad"]


def distill_fit(*args: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "helpers"), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "distill.cli", "fit", "--config", TEACHER, *QUICK, *args,
           "--trainer.default_root_dir", str(root)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_sigkill_then_resume_from_epoch_end_matches_uninterrupted_run_with_mixup_and_randaugment(tmp_path):
    """A plain (not keyed) loader resumes exactly from an epoch boundary: the checkpoint's Python and
    NumPy states carry RandAugment (Python's RNG, in the main process with num_workers 0) and
    mixup/cutmix (NumPy's) on; the epoch order is drawn from torch's."""
    common = ["--trainer.max_epochs", "3", "--trainer.deterministic", "true", "--data.mixup", "0.8",
              "--data.cutmix", "1.0", "--data.auto_augment", "rand-m9-n2-inc1"]
    clean = distill_fit(*common, root=tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]

    killed = distill_fit(*common, "--trainer.callbacks", '[{"class_path": "killer.KillAtStep", "init_args": {"step": 9}}]',
                         root=tmp_path / "killed")
    assert killed.returncode == -9  # SIGKILL: no cleanup, no final checkpoint
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 8  # end of epoch 1

    resumed = distill_fit(*common, "--ckpt_path", "last", root=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = torch.load(tmp_path / "clean" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    assert a["distill_run"]["metrics"] == b["distill_run"]["metrics"]


def test_killed_checkpoint_write_leaves_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    # A child process starts writing the next checkpoint and is SIGKILLed halfway through torch.save.
    script = f"""
import os, signal, torch
from distill.training.fault_tolerance import AtomicCheckpointIO
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({{"state_dict": {{"w": torch.zeros(3)}}, "global_step": 2}}, {str(path)!r})
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == -9
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"a": torch.arange(3)}, path)
    AtomicCheckpointIO().save_checkpoint({"a": torch.arange(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(4))
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]


def test_non_finite_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "helpers"))
    root = tmp_path / "run"
    code = main(["fit", "--config", TEACHER, *QUICK, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(root),
                 "--trainer.callbacks", '[{"class_path": "killer.PoisonAtStep", "init_args": {"step": 6}}]'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("distill: error: train/loss is not finite") and "last.ckpt" in err[-1]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # the end of epoch 0, before the weights went bad
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(str(marker))}, evil)
    with pytest.raises(ValueError, match="refused"):
        build_teacher("cifar_resnet10", num_classes=10, checkpoint=evil)
    assert not marker.exists()
    # and through the command line: one line, non-zero exit, nothing executed
    code = main(["fit", "--config", str(REPO / "recipes/digits/student.yaml"), "--model.init_args.teacher", str(evil),
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    assert code == 2 and "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_safetensors_teacher_loads(tmp_path):
    from safetensors.torch import save_file

    net = build_teacher("cifar_resnet10", num_classes=10, in_chans=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "t.safetensors"))
    again = build_teacher("cifar_resnet10", in_chans=1, checkpoint=tmp_path / "t.safetensors")
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
