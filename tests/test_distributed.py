"""Two CPU processes (DDP over gloo) against one: validation counts every sample exactly once (also
inside training), training takes the same steps and learning rates as the single-process run and ends
close to it, each process draws its own randomness (mixup) and a killed DDP run resumes bit-identically,
and a head left unused (loss.mode none) does not trip DDP."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TEACHER = str(REPO / "recipes/digits/teacher.yaml")
STUDENT = str(REPO / "recipes/digits/student.yaml")
# 361 validation images: an odd count, which a padding DistributedSampler would fill with a duplicate.
COMMON = ["--data.val_fraction", "0.2007", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]

pytestmark = pytest.mark.slow


def distill(*args: str, returncode: int = 0, **extra_env: str) -> subprocess.CompletedProcess:
    # tests/helpers on the path: test callbacks (probes, killer) by class_path
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests" / "helpers"),
           **extra_env}
    res = subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, env=env,
                         timeout=600, cwd=REPO)
    # every process's error line first (the one that failed first is often not the last to write)
    errors = [line for line in res.stderr.splitlines() if re.match(r"(\[rank\d+\]: )?\w+(Error|Exception): ", line)]
    assert res.returncode == returncode, "\n".join([*errors, res.stderr[-3000:]])
    return res


def callbacks(*specs: dict) -> list[str]:
    return ["--trainer.callbacks", json.dumps(list(specs))]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def last_metrics(root: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(root / "metrics.csv")))
    out: dict[str, float] = {}
    for row in rows:
        out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def lr_per_epoch(root: Path) -> list[tuple[int, float]]:
    """(step, lr) of each epoch's start, as the CLI's LearningRateMonitor logged it (every param group alike)."""
    out = []
    for row in csv.DictReader(open(root / "metrics.csv")):
        values = {float(v) for k, v in row.items() if k.startswith("lr-") and v not in ("", None)}
        if values:
            assert len(values) == 1, row
            out.append((int(row["step"]), values.pop()))
    return out


@pytest.fixture(scope="module")
def single_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    distill("fit", "--config", TEACHER, *COMMON, "--trainer.max_epochs", "2", "--model.init_args.model", "cifar_resnet10",
            "--trainer.default_root_dir", str(root), "--trainer.devices", "1")
    return root


def expected_validation() -> list[int]:
    """[count, checksum] of the 361 validation images, as probes.CountValidation sums them."""
    if str(REPO / "tests" / "helpers") not in sys.path:
        sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from probes import image_checksum

    from distill import ImageDataModule

    dm = ImageDataModule("digits", img_size=8, val_fraction=0.2007)
    dm.setup("fit")
    expected = image_checksum(dm.val_set)
    assert expected[0] == 361
    return expected


def test_validation_counts_each_sample_once(single_teacher, tmp_path):
    two = tmp_path / "two"
    distill("validate", "--config", TEACHER, *COMMON, "--model.init_args.model", "cifar_resnet10", "--ckpt_path",
            str(single_teacher / "checkpoints" / "last.ckpt"), "--trainer.default_root_dir", str(two), *DDP,
            *callbacks({"class_path": "probes.CountValidation"}))
    assert json.loads((two / "val-counts.json").read_text()) == [expected_validation()]
    # the single-process run validated these same weights last; accuracies are counts over 361 images
    a, b = last_metrics(single_teacher), last_metrics(two)
    assert a["val/acc"] == b["val/acc"]
    assert a["val/acc_top5"] == b["val/acc_top5"]
    assert round(a["val/acc"] * 361, 3) == round(a["val/acc"] * 361)


def test_distill_test_counts_each_sample_once_under_ddp(single_teacher, tmp_path):
    """`distill test` on two processes: the test set (digits' held-out images, 361: an odd count) is sharded
    without padding, so each image is tested exactly once and the accuracy is the one-process figure."""
    two = tmp_path / "two"
    distill("test", "--config", TEACHER, *COMMON, "--model.init_args.model", "cifar_resnet10", "--ckpt_path",
            str(single_teacher / "checkpoints" / "last.ckpt"), "--trainer.default_root_dir", str(two), *DDP,
            *callbacks({"class_path": "probes.CountTest"}))
    assert json.loads((two / "test-counts.json").read_text()) == [expected_validation()]
    a, b = last_metrics(single_teacher), last_metrics(two)  # the same images and weights the single run validated last
    assert b["test/acc"] == a["val/acc"] and b["test/acc_top5"] == a["val/acc_top5"]


def test_two_processes_train_like_one(single_teacher, tmp_path):
    root = tmp_path / "ddp"
    # per-device batch 32 x 2 processes = the single run's global batch of 64; the 1,436 training images
    # make 22 batches of 64 in one process and 22 of 32 (of 718 per process) in each of two
    distill("fit", "--config", TEACHER, *COMMON, *DDP, "--trainer.max_epochs", "2", "--model.init_args.model",
            "cifar_resnet10", "--data.batch_size", "32", "--trainer.default_root_dir", str(root),
            *callbacks({"class_path": "probes.CountValidation"}))
    one, two = load(single_teacher / "checkpoints" / "last.ckpt"), load(root / "checkpoints" / "last.ckpt")
    assert one["global_step"] == two["global_step"] == 44
    lr = [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in (one, two)]
    assert lr[0] == lr[1] < 2e-3  # the same final lr ...
    # ... and the same lr at the start of every epoch (LearningRateMonitor's rows: step 0 in warm-up, step 22
    # at the peak after warm-up), so warm-up and cosine follow the same steps, not only the same end
    epochs = [lr_per_epoch(r) for r in (single_teacher, root)]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1], epochs
    assert epochs[0][0][1] < epochs[0][1][1]
    # every validation pass of the DDP training run saw each of the 361 images exactly once
    expected = expected_validation()
    assert json.loads((root / "val-counts.json").read_text()) == [expected, expected]
    a, b = last_metrics(single_teacher), last_metrics(root)
    assert abs(a["val/acc"] - b["val/acc"]) < 0.05
    assert b["val/acc"] > 0.8


def test_processes_draw_their_own_randomness_and_a_killed_run_resumes_bit_identically(single_teacher, tmp_path):
    """Student with keyed views, RandAugment, mixup/cutmix, drop path and EMA on two processes: each
    process draws its own mixup lambdas (NumPy's global RNG, seeded seed + rank); killed two steps
    into epoch 1 (after a step checkpoint) and resumed, each process continues its own streams and the
    run ends on the uninterrupted run's weights, bit for bit."""
    args = ["fit", "--config", STUDENT, *COMMON, *DDP, "--model.init_args.teacher",
            str(single_teacher / "checkpoints" / "last.ckpt"), "--model.init_args.student.depth", "2",
            "--model.init_args.student.embed_dim", "32", "--model.init_args.student.num_heads", "2",
            "--model.init_args.student.drop_path_rate", "0.2", "--model.init_args.ema_decay", "0.9",
            "--model.init_args.warmup_epochs", "1", "--data.batch_size", "32", "--data.keyed_views", "true",
            "--data.auto_augment", "rand-m9-n2-inc1", "--data.mixup", "0.8", "--data.cutmix", "1.0",
            "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
            "--trainer.deterministic", "true", "--checkpoint.every_n_train_steps", "3"]
    record = {"class_path": "probes.RecordDraws"}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    distill(*args, "--trainer.default_root_dir", str(clean), *callbacks(record))
    draws = [json.loads((clean / f"draws-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(draws[0]["lams"]) == len(draws[1]["lams"]) == 8
    assert all(a != b for a, b in zip(draws[0]["lams"], draws[1]["lams"]))
    assert all(a != b for a, b in zip(draws[0]["states"], draws[1]["states"]))

    distill(*args, "--trainer.default_root_dir", str(killed),
            *callbacks({"class_path": "killer.KillAtStep", "init_args": {"step": 7}}), returncode=-9)
    last = killed / "checkpoints" / "last.ckpt"
    at_kill = load(last)
    assert (at_kill["epoch"], at_kill["global_step"]) == (1, 6)  # 2 of epoch 1's 4 batches trained
    assert at_kill["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert at_kill["callbacks"]["ResumeState"]["world_size"] == 2

    distill(*args, "--trainer.default_root_dir", str(killed), "--ckpt_path", "last", *callbacks(record))
    for r in (0, 1):  # each process resumed its own stream
        again = json.loads((killed / f"draws-rank{r}.json").read_text())
        assert again["lams"] == draws[r]["lams"][6:] and again["keys"] == draws[r]["keys"][6:]
    a, b = load(clean / "checkpoints" / "last.ckpt"), load(last)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)


# (alpha 1 with a distillation token, whose class head would go unused, is refused before training:
# tests/test_bad_input.py)
@pytest.mark.parametrize("loss", [["--model.init_args.loss.mode", "none"], ["--model.init_args.loss.alpha", "0.0"]],
                         ids=["none", "alpha0"])
def test_student_with_an_unused_head_trains_under_ddp(single_teacher, tmp_path, loss):
    root = tmp_path / "student"
    distill("fit", "--config", STUDENT, *COMMON, *DDP, *loss, "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
            "--model.init_args.student.depth", "1", "--model.init_args.student.embed_dim", "32",
            "--model.init_args.teacher", str(single_teacher / "checkpoints" / "last.ckpt"),
            "--trainer.default_root_dir", str(root))
    ckpt = load(root / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3  # every step trained
    # each logged step's loss is the DeiT mix of its logged terms for this run's alpha (mode none: CE alone)
    alpha = 0.0 if "none" in loss else float(loss[1])
    rows = [r for r in csv.DictReader(open(root / "metrics.csv")) if r.get("train/loss")]
    assert len(rows) == 3
    for row in rows:
        total, ce, term = (float(row[k]) for k in ("train/loss", "train/loss_ce", "train/loss_distill"))
        assert total == pytest.approx((1 - alpha) * ce + alpha * term, rel=1e-5), row
        assert (term == 0.0) == ("none" in loss or alpha == 0.0)  # no teacher term without a teacher


def test_one_wandb_run_per_job_and_teacher_cache_sharded_by_process(single_teacher, tmp_path):
    cache = tmp_path / "cache"
    root = tmp_path / "student"
    args = ["fit", "--config", STUDENT, *COMMON, *DDP, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2", "--model.init_args.student.depth", "1",
            "--model.init_args.student.embed_dim", "32", "--model.init_args.teacher",
            str(single_teacher / "checkpoints" / "last.ckpt"), "--data.keyed_views", "true",
            "--model.init_args.teacher_cache.dir", str(cache), "--logger", "wandb",
            "--trainer.default_root_dir", str(root)]
    # Each rank builds its own shard under its own lock, so no rank ever waits for another: were one rank
    # to wait for a lock another rank of this job holds (in the barrier after its build), that wait gives
    # up after 30 s with a message naming the lock, instead of hanging until the 600 s time-out.
    distill(*args, DISTILL_CACHE_LOCK_TIMEOUT="30")
    assert len(list((root / "wandb").glob("offline-run-*"))) == 1  # rank zero logs, the other rank does not
    shards = sorted(p.name for p in cache.glob("view-00000/shard-*.done.json"))  # the one epoch's view, per rank
    assert shards == ["shard-0000-of-0002.done.json", "shard-0001-of-0002.done.json"]
    # a second job reads the cache both processes wrote (and checks it against the live teacher)
    distill(*args[:-1], str(tmp_path / "again"))
    assert (tmp_path / "again" / "checkpoints" / "last.ckpt").is_file()
