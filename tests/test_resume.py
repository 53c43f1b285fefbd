"""Exact resume: the random state of every process, keyed-view training resumed in the middle of an
epoch (student with its teacher reloaded from file, EMA, mixup, RandAugment), and `last.ckpt` that
stays the last state when the monitored metric peaks early."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from distill.data.keyed_views import KeyedLoader, KeyedViews, ViewKeySampler, keyed_train_loader
from distill.training.fault_tolerance import ResumeState, rng_state, set_rng_state

REPO = Path(__file__).resolve().parent.parent
STUDENT = str(REPO / "recipes/digits/student.yaml")
TEACHER = str(REPO / "recipes/digits/teacher.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def distill_fit(*args: str, root: Path) -> subprocess.CompletedProcess:
    # the helpers first, then whatever the environment already puts on the path (a GPU machine's carried wheels)
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "helpers"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distill.cli", "fit", *args, "--trainer.default_root_dir", str(root)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------- keyed sampler
def test_view_key_sampler_skips_the_trained_part_of_one_epoch_once():
    ds = TensorDataset(torch.arange(20))
    sampler = ViewKeySampler(ds, num_replicas=2, rank=1, seed=3, view_epochs=None)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip_once(2, 4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # spent
    sampler.skip_once(2, 4)
    sampler.set_epoch(3)
    assert next(iter(sampler)) // 20 == 3 and len(list(sampler)) == len(full)  # another epoch: no skip


def test_keyed_loader_state_round_trip_replays_the_rest_of_the_epoch():
    ds = KeyedViews(TensorDataset(torch.arange(40).float(), torch.arange(40)), seed=0)
    position = [1, 0]
    make = lambda: KeyedLoader(ds, batch_size=4, sampler=ViewKeySampler(ds, seed=5), drop_last=True,
                               position=lambda: tuple(position))
    first = make()
    first.sampler.set_epoch(1)
    batches = [b[2][:, 0].tolist() for b in first]
    position[1] = 3  # three batches of epoch 1 trained when the checkpoint was written
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    again = make()  # a fresh process: sampler at epoch 0, as Lightning builds it
    again.load_state_dict(state)
    assert [b[2][:, 0].tolist() for b in again] == batches[3:]


def test_keyed_views_do_not_depend_on_the_process_random_state():
    from distill import ImageDataModule

    dm = ImageDataModule("digits", img_size=8, crop="pad", auto_augment="rand-m9-n2-inc1", seed=1)
    dm.setup("fit")
    views = KeyedViews(dm.train_set, seed=1)
    out = []
    for rank_seed in (0, 1):  # what two processes seeded seed + rank would hold
        torch.manual_seed(rank_seed), np.random.seed(rank_seed), random.seed(rank_seed)
        out.append(torch.stack([views[k][0] for k in (3, 1000, 5000)]))
    assert torch.equal(out[0], out[1])


def test_keyed_loader_starts_at_the_trainers_epoch():
    """Lightning creates the training iterator (and starts its workers, which draw the first indices)
    before it calls set_epoch; on a resume the sampler must already be at the resumed epoch."""
    from distill import ImageDataModule

    dm = ImageDataModule("digits", img_size=8, keyed_views=True)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, current_epoch=3)
    loader = keyed_train_loader(dm)
    assert loader.sampler.epoch == 3
    assert next(iter(loader))[2][0, 1] == 3  # view 3


# ------------------------------------------------------------------------------- random states
def _fake_trainer(rank: int = 0, world: int = 1, step: int = 0):
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=step)


def test_resume_state_restores_this_process_stream(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    cb = ResumeState()
    cb.setup(_fake_trainer(), None, "fit")
    state = cb.state_dict()
    assert state["world_size"] == 1 and len(state["ranks"]) == 1
    expected = (torch.rand(3), np.random.rand(3), random.random())
    again = ResumeState()
    again.setup(_fake_trainer(), None, "fit")
    again.load_state_dict(state)
    again.on_fit_start(_fake_trainer(), None)  # resumed: no fresh seed
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_resume_state_reads_a_single_process_checkpoint_of_the_older_format():
    old = rng_state()
    expected = torch.rand(2)
    cb = ResumeState()
    cb.load_state_dict(old)  # {"torch", "numpy", "python"}: no "ranks"
    assert torch.equal(torch.rand(2), expected)


def test_each_process_after_rank_zero_gets_its_own_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    draws = []
    for rank in (0, 1, 2):
        torch.manual_seed(11), np.random.seed(11), random.seed(11)  # seed_everything: the same on every rank
        ResumeState().on_fit_start(_fake_trainer(rank, 3), None)
        draws.append((torch.rand(1).item(), np.random.rand(), random.random()))
    assert draws[0] != draws[1] != draws[2] != draws[0]
    torch.manual_seed(12), np.random.seed(12), random.seed(12)
    assert draws[1] == (torch.rand(1).item(), np.random.rand(), random.random())  # rank 1: seed + 1, as in DeiT


def test_resume_with_another_number_of_processes_warns_and_reseeds(monkeypatch):
    """The streams of 2 processes cannot continue in 1 or 3: each process reseeds from (seed, rank, step),
    so what it draws next depends on those three only, not on the random state it had nor on the
    checkpoint's states, and differs between ranks and between steps."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    saved = {"world_size": 2, "ranks": [rng_state(), rng_state()], "global_step": 5}

    def draws_after_resume(rank: int, world: int, step: int, state_seed: int, seed: str = "0"):
        monkeypatch.setenv("PL_GLOBAL_SEED", seed)
        torch.manual_seed(state_seed), np.random.seed(state_seed), random.seed(state_seed)  # whatever it held
        cb = ResumeState()
        cb.setup(_fake_trainer(rank, world), None, "fit")
        with pytest.warns(UserWarning, match=f"random states of 2 process\\(es\\) but this run has {world}"):
            cb.load_state_dict({**saved, "global_step": step})
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    first = draws_after_resume(0, 1, 5, state_seed=1)
    assert draws_after_resume(0, 1, 5, state_seed=2) == first  # reseeded: the state before does not matter
    set_rng_state(saved["ranks"][0])  # nor is it the saved processes' stream
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()) != first
    assert draws_after_resume(0, 3, 5, state_seed=3) == first  # (seed, rank, step): not the world size
    others = [draws_after_resume(1, 3, 5, 1), draws_after_resume(2, 3, 5, 1), draws_after_resume(0, 1, 6, 1),
              draws_after_resume(0, 1, 5, 1, seed="1")]
    for other in others:  # another rank, another step, another run seed: other streams (torch, NumPy, Python)
        assert all(a != b for a, b in zip(other, first))


@pytest.mark.parametrize("saved_world", [2, 3])
def test_a_resumed_process_keeps_its_restored_stream_at_fit_start(monkeypatch, saved_world):
    """Rank 1 of 2 resumes (Lightning restores the callbacks' states before `on_fit_start`): from a
    checkpoint of 2 processes it continues its own saved stream, from one of 3 it reseeds from (seed,
    rank, step). Either way fit start must not reseed it again with the fresh run's seed + rank."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    states = []
    for seed in range(saved_world):
        torch.manual_seed(100 + seed), np.random.seed(100 + seed), random.seed(100 + seed)
        states.append(rng_state())
    saved = {"world_size": saved_world, "ranks": states, "global_step": 4}

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    def resume(fit_start: bool):
        cb = ResumeState()
        cb.setup(_fake_trainer(1, 2, 4), None, "fit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the world-size warning: another test's subject
            cb.load_state_dict(saved)
        if fit_start:
            cb.on_fit_start(_fake_trainer(1, 2, 4), None)
        return draws()

    restored = resume(fit_start=False)  # what the checkpoint's state (or the (seed, rank, step) reseed) gives
    assert resume(fit_start=True) == restored
    torch.manual_seed(5 + 1), np.random.seed(5 + 1), random.seed(5 + 1)
    assert draws() != restored  # the fresh per-rank seed would draw something else


def test_each_process_takes_its_own_state_from_the_checkpoint():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state())
    saved = {"world_size": 2, "ranks": states, "global_step": 3}
    for rank in (0, 1):
        cb = ResumeState()
        cb.setup(_fake_trainer(rank, 2), None, "fit")
        cb.load_state_dict(saved)
        got = torch.rand(2)
        torch.manual_seed(rank + 1)
        assert torch.equal(got, torch.rand(2))


# ------------------------------------------------------------------------------------- SIGKILL
@pytest.mark.slow
@pytest.mark.parametrize("images", ["labelled", pytest.param("unlabelled", marks=pytest.mark.slow)])
def test_student_with_keyed_views_resumes_mid_epoch_bit_identically(tmp_path, tiny_teacher_ckpt, images):
    """Teacher reloaded from its file, EMA, keyed views with RandAugment (Python/NumPy RNG per sample),
    mixup/cutmix (NumPy's global RNG), drop path (torch's): killed two steps into epoch 1, after a step
    checkpoint, and resumed from it. Also with unlabelled images (a folder of them, label -1) in batches of
    a fixed labelled share (data.labeled_fraction)."""
    extra = []
    if images == "unlabelled":
        import numpy as np
        from PIL import Image

        (tmp_path / "unlabeled").mkdir()
        for i in range(96):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(
                tmp_path / "unlabeled" / f"{i}.png")
        extra = ["--data.unlabeled_root", str(tmp_path / "unlabeled"), "--data.labeled_fraction", "0.5"]
    common = [*extra,
        "--config", STUDENT, *QUIET, "--model.init_args.teacher", str(tiny_teacher_ckpt),
        "--model.init_args.student.depth", "2", "--model.init_args.student.embed_dim", "32",
        "--model.init_args.student.num_heads", "2", "--model.init_args.student.drop_path_rate", "0.2",
        "--model.init_args.ema_decay", "0.9", "--model.init_args.warmup_epochs", "1",
        "--data.keyed_views", "true", "--data.auto_augment", "rand-m9-n2-inc1", "--data.mixup", "0.8",
        "--data.cutmix", "1.0", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6",
        "--trainer.limit_val_batches", "2", "--trainer.deterministic", "true", "--checkpoint.every_n_train_steps", "4",
    ]
    clean = distill_fit(*common, root=tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]

    killed = distill_fit(*common, "--trainer.callbacks", '[{"class_path": "killer.KillAtStep", "init_args": {"step": 10}}]',
                         root=tmp_path / "killed")
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    at_kill = load(last)
    assert at_kill["global_step"] == 8 and at_kill["epoch"] == 1  # 2 of epoch 1's 6 batches trained
    assert at_kill["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]

    resumed = distill_fit(*common, "--ckpt_path", "last", root=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load(tmp_path / "clean" / "checkpoints" / "last.ckpt"), load(last)
    assert a["global_step"] == b["global_step"] == 12
    assert any(k.startswith("student_ema.") for k in a["state_dict"])
    assert_same_weights(a, b)
    assert a["distill_run"]["metrics"] == b["distill_run"]["metrics"]


@pytest.mark.slow
def test_student_with_a_teacher_cache_resumes_a_run_counted_in_steps_from_an_epoch_end(tmp_path, tiny_teacher_ckpt):
    """The cifar10_semi study's case: a run bounded by max_steps, validated every 8 steps (epochs of 4), its
    teacher's outputs read from a cache that grows a view per epoch. Killed in epoch 1, it resumes from
    `last` as epoch 0 ended (not validated): it must go on with epoch 1 (whose view the cache builds),
    not fail on a view one ahead, and end where the uninterrupted run ends."""
    common = [
        "--config", STUDENT, *QUIET, "--model.init_args.teacher", str(tiny_teacher_ckpt),
        "--model.init_args.student.depth", "1", "--model.init_args.student.embed_dim", "32",
        "--model.init_args.student.num_heads", "2", "--model.init_args.warmup_epochs", "0",
        "--model.init_args.loss.mode", "soft", "--data.keyed_views", "true",
        "--trainer.max_epochs", "-1", "--trainer.max_steps", "12", "--trainer.limit_train_batches", "4",
        "--trainer.val_check_interval", "8", "--trainer.check_val_every_n_epoch", "null",
        "--trainer.limit_val_batches", "1", "--trainer.deterministic", "true",
    ]
    runs = {}
    for name in ("clean", "killed"):
        cache = ["--model.init_args.teacher_cache.dir", str(tmp_path / name / "cache")]
        kill = ["--trainer.callbacks", '[{"class_path": "killer.KillAtStep", "init_args": {"step": 6}}]']
        run = distill_fit(*common, *cache, *(kill if name == "killed" else []), root=tmp_path / name)
        assert run.returncode == (-9 if name == "killed" else 0), run.stderr[-3000:]
        runs[name] = cache
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 4  # epoch 0's end, without validation
    resumed = distill_fit(*common, *runs["killed"], "--ckpt_path", "last", root=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load(tmp_path / "clean" / "checkpoints" / "last.ckpt"), load(last)
    assert a["global_step"] == b["global_step"] == 12 and a["epoch"] == b["epoch"]
    assert_same_weights(a, b)
    assert a["distill_run"]["metrics"] == b["distill_run"]["metrics"]


def test_last_checkpoint_is_the_last_state_when_the_metric_peaked_early(tmp_path, monkeypatch):
    from distill.commands.main import main

    monkeypatch.syspath_prepend(str(REPO / "tests" / "helpers"))
    root = tmp_path / "run"
    code = main(["fit", "--config", TEACHER, *QUIET, "--model.init_args.model", "cifar_resnet10",
                 "--model.init_args.model_kwargs", '{"base_width": 8}', "--trainer.max_epochs", "3",
                 "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--checkpoint.monitor", "val/probe_peak", "--trainer.default_root_dir", str(root),
                 "--trainer.callbacks", '[{"class_path": "probes.PeakAtFirstEpoch"}]'])
    assert code == 0
    folder = root / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    best, last = load(folder / "best-epoch000.ckpt"), load(folder / "last.ckpt")
    assert (best["epoch"], best["global_step"]) == (0, 2)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # the end of the run, not the best epoch


def _fit_teacher_validated_every_2(root: Path, callbacks=(), ckpt: Path | None = None) -> Path:
    """5 epochs of a tiny TeacherModule validated every 2 epochs (epochs 1 and 3), checkpoints as the
    command writes them; the folder of its checkpoints."""
    import lightning as L
    from conftest import TINY_TEACHER, make_trainer

    from distill import ImageDataModule, TeacherModule
    from distill.training.fault_tolerance import BestAndLastCheckpoint

    L.seed_everything(0, verbose=False)
    folder = root / "checkpoints"
    checkpoint = BestAndLastCheckpoint(dirpath=folder, monitor="val/acc", mode="max", save_last=True, save_top_k=1,
                                       filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)
    trainer = make_trainer(root, max_epochs=5, limit_train_batches=2, limit_val_batches=1, check_val_every_n_epoch=2,
                           enable_checkpointing=True, callbacks=[checkpoint, *callbacks])
    trainer.fit(TeacherModule(**TINY_TEACHER), ImageDataModule("digits", img_size=8, batch_size=32), ckpt_path=ckpt)
    return folder


def test_last_checkpoint_holds_the_epochs_trained_after_the_last_validation(tmp_path, monkeypatch):
    """Validated every 2 of 5 epochs: epochs 2 and 4 are trained but not validated. `last.ckpt` holds
    epoch 2 once it is trained and epoch 4 at the end of the run (`reproduce.py --score last` and
    `--ckpt_path last` read it as the end of training), and a run resumed from epoch 2's ends exactly
    as the uninterrupted one."""
    import shutil

    import lightning as L

    monkeypatch.syspath_prepend(str(REPO / "tests"))
    after_epoch2 = tmp_path / "after_epoch2.ckpt"

    class CopyLast(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                shutil.copy(tmp_path / "clean" / "checkpoints" / "last.ckpt", after_epoch2)

    clean = _fit_teacher_validated_every_2(tmp_path / "clean", [CopyLast()])
    assert (load(after_epoch2)["epoch"], load(after_epoch2)["global_step"]) == (2, 6)  # not epoch 1's validation
    last = load(clean / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (4, 10)  # the end of the run, not epoch 3's validation
    resumed = _fit_teacher_validated_every_2(tmp_path / "resumed", ckpt=after_epoch2)
    assert load(resumed / "last.ckpt")["global_step"] == 10
    assert_same_weights(last, load(resumed / "last.ckpt"))


def test_last_checkpoint_follows_each_validation_inside_an_epoch(tmp_path, tiny_teacher_kwargs):
    """Validation every 2 steps inside one epoch (val_check_interval 2), the monitored value tied from the
    first on: after each validation `last.ckpt` holds that step, read at the next step's start (before the
    end of training could write it), although Lightning writes no top-k checkpoint there."""
    import lightning as L
    from conftest import make_trainer
    from helpers.probes import PeakAtFirstEpoch

    from distill import ImageDataModule, TeacherModule
    from distill.training.fault_tolerance import BestAndLastCheckpoint

    folder = tmp_path / "checkpoints"
    seen = {}

    class LastAtBatchStart(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            last = folder / "last.ckpt"
            seen[trainer.global_step] = load(last)["global_step"] if last.is_file() else None

    checkpoint = BestAndLastCheckpoint(dirpath=folder, filename="best-{step}", monitor="val/probe_peak", mode="max",
                                       save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=1, val_check_interval=2,
                           enable_checkpointing=True, callbacks=[PeakAtFirstEpoch(), LastAtBatchStart(), checkpoint])
    trainer.fit(TeacherModule(**tiny_teacher_kwargs), ImageDataModule("digits", img_size=8, batch_size=32))
    assert seen == {0: None, 1: None, 2: 2, 3: 2, 4: 4, 5: 4}
    assert [p.name for p in folder.glob("best-*")] == ["best-step=2.ckpt"]  # the top-k file: the first validation


# ------------------------------------------------------------------ in-process resume with workers
def _fit_keyed_student(root: Path, max_epochs: int, tiny_student: dict, ckpt: Path | None = None,
                       save_after_epoch0: Path | None = None, max_steps: int = -1, val_batches: int = 0):
    import lightning as L
    from conftest import make_trainer
    from probes import RecordDraws

    from distill import DistillModule, ImageDataModule, StudentConfig
    from distill.losses import DistillationLoss

    L.seed_everything(0, verbose=False)
    dm = ImageDataModule("digits", img_size=8, batch_size=32, crop="pad", keyed_views=True, num_workers=1,
                         persistent_workers=False)
    module = DistillModule(StudentConfig(**tiny_student), loss=DistillationLoss(mode="none"), warmup_epochs=0)
    record = RecordDraws()

    class SaveAfterEpoch0(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if save_after_epoch0 is not None and trainer.current_epoch == 0:
                trainer.save_checkpoint(save_after_epoch0)

    trainer = make_trainer(root, max_epochs=max_epochs, max_steps=max_steps, limit_train_batches=3,
                           limit_val_batches=val_batches, callbacks=[record, SaveAfterEpoch0()])
    trainer.fit(module, dm, ckpt_path=ckpt)
    return trainer, module, record


def test_keyed_resume_at_an_epoch_boundary_with_workers_trains_the_resumed_epoch(tmp_path, tiny_student, monkeypatch):
    """With num_workers > 0 the workers draw an epoch's indices as soon as the iterator exists, and on a
    resume Lightning builds it before it restores the epoch: the resumed epoch must not replay epoch 0."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "helpers"))
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    saved = tmp_path / "epoch0.ckpt"
    _, clean, clean_draws = _fit_keyed_student(tmp_path / "clean", 2, tiny_student, save_after_epoch0=saved)
    _, resumed, resumed_draws = _fit_keyed_student(tmp_path / "resumed", 2, tiny_student, ckpt=saved)
    assert resumed_draws.keys == clean_draws.keys[3:]
    assert resumed_draws.states == clean_draws.states[3:]
    for key, value in clean.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("val_batches", [0, 1], ids=["not-validated", "validated-each-epoch"])
def test_keyed_resume_at_an_epoch_end_of_a_run_counted_in_steps_goes_on_with_the_next_epoch(tmp_path, tiny_student,
                                                                                           monkeypatch, val_batches):
    """A run bounded by `max_steps` (`max_epochs` -1), resumed from a checkpoint written when an epoch ended
    without validation (what `last` holds between validations every n steps): Lightning 2.6 re-enters that
    epoch, trains one batch too many and from then on sets the samplers' epoch one ahead of
    `current_epoch`, so keyed views (and a teacher cache's views, built for `current_epoch`) drift by one.
    The resumed run must train what the uninterrupted one trained: the same keys, views and weights. Also
    when each epoch ends with a validation (the checkpoint is then written after it)."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "helpers"))
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    saved = tmp_path / "epoch0.ckpt"
    clean_trainer, clean, clean_draws = _fit_keyed_student(tmp_path / "clean", -1, tiny_student,
                                                           save_after_epoch0=saved, max_steps=9, val_batches=val_batches)
    trainer, resumed, resumed_draws = _fit_keyed_student(tmp_path / "resumed", -1, tiny_student, ckpt=saved,
                                                         max_steps=9, val_batches=val_batches)
    assert clean_trainer.global_step == trainer.global_step == 9
    assert trainer.current_epoch == clean_trainer.current_epoch
    assert resumed_draws.keys == clean_draws.keys[3:]
    assert resumed_draws.views == clean_draws.views[3:] == [[1] * 32] * 3 + [[2] * 32] * 3
    assert resumed_draws.states == clean_draws.states[3:]
    for key, value in clean.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_last_checkpoint_holds_the_validation_after_a_step_checkpoint_at_the_same_step(tmp_path, monkeypatch):
    """A step checkpoint on an epoch's last step is written before that epoch's validation; `last`
    must be written again after it (Lightning skips a second save at the same step)."""
    from distill.commands.main import main

    monkeypatch.syspath_prepend(str(REPO / "tests" / "helpers"))
    root = tmp_path / "run"
    code = main(["fit", "--config", TEACHER, *QUIET, "--model.init_args.model", "cifar_resnet10",
                 "--model.init_args.model_kwargs", '{"base_width": 8}', "--trainer.max_epochs", "2",
                 "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(root),
                 "--trainer.callbacks", '[{"class_path": "probes.PeakAtFirstEpoch"}]'])
    assert code == 0
    last = load(root / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    assert last["distill_run"]["metrics"]["val/probe_peak"] == 0.5  # epoch 1's validation, not epoch 0's
