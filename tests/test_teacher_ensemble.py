"""Several teachers: combination rules, per-teacher metrics, lineage of every teacher in the checkpoint,
a changed member refused, the cache keyed on every teacher, and a list of teachers from a recipe."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from distill import DistillationLoss, DistillModule, ImageDataModule, StudentConfig
from distill.commands.recipe_cli import DistillCLI
from distill.teacher.cache import TeacherCache, TeacherCacheConfig
from distill.teacher.ensemble import TeacherEnsemble, combine_logits

from conftest import TINY_STUDENT
from helpers.probes import LossInputs


def test_combine_rules():
    a = torch.tensor([[2.0, 0.0, -1.0]])
    b = torch.tensor([[0.0, 1.0, 3.0]])
    assert torch.allclose(combine_logits([a, b], "mean_logits"), (a + b) / 2)
    mean_p = (a.softmax(-1) + b.softmax(-1)) / 2
    combined = combine_logits([a, b], "mean_probs")
    assert torch.allclose(combined.softmax(-1), mean_p, atol=1e-6)
    assert torch.allclose(combined.exp().sum(-1), torch.ones(1), atol=1e-6)  # log-probabilities
    # the rules can disagree on the argmax, which is what hard distillation follows
    sure, unsure = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[-10.0, 1.0, 0.0]])
    assert int(combine_logits([sure, unsure], "mean_logits").argmax()) == 1
    assert int(combine_logits([sure, unsure], "mean_probs").argmax()) == 0


def change_fc(path, delta: float = 1.0) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("fc.weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + delta * torch.randn_like(ckpt["state_dict"][key])
    torch.save(ckpt, path)


@pytest.fixture
def two_teachers(tiny_teacher_ckpt, tmp_path):
    """Two step-1 checkpoints of the same tiny architecture with different heads."""
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    shutil.copy(tiny_teacher_ckpt, a)
    shutil.copy(tiny_teacher_ckpt, b)
    torch.manual_seed(1)
    change_fc(b, 0.5)
    return a, b


def fit(module, trainer_factory, dm=None, **kwargs):
    dm = dm or ImageDataModule("digits", img_size=8, batch_size=32)
    trainer = trainer_factory(**{"max_steps": 3, "limit_val_batches": 2, "val_check_interval": 3, **kwargs})
    trainer.fit(module, dm)
    return trainer


@pytest.mark.parametrize("combine", ["mean_logits", "mean_probs"])
def test_ensemble_teaches_with_its_combination_and_logs_each_teacher(two_teachers, trainer_factory, combine):
    module = DistillModule(StudentConfig(**TINY_STUDENT), teacher=[str(p) for p in two_teachers],
                           teacher_combine=combine, loss=DistillationLoss("hard"), warmup_epochs=0)
    assert isinstance(module.teacher, TeacherEnsemble) and len(module.teacher.members) == 2
    seen = LossInputs()  # what the loss is handed at every step
    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    trainer = fit(module, trainer_factory, dm, callbacks=[seen])
    assert len(seen.calls) == len(seen.batches) == 3
    for step, (call, (x, _)) in enumerate(zip(seen.calls, seen.batches)):
        members = [m(x) for m in module.teacher.members]  # each member on its own
        assert not torch.allclose(members[0], members[1])
        torch.testing.assert_close(call["teacher"], combine_logits(members, combine), msg=f"step {step}")
    metrics = trainer.callback_metrics
    # each teacher's accuracy and the combination's, counted by hand on the same two validation batches
    batches = [b for _, b in zip(range(2), dm.val_dataloader())]
    hits, n = torch.zeros(3), 0
    with torch.no_grad():
        for x, y in batches:
            members = [m(x) for m in module.teacher.members]
            for i, z in enumerate([*members, combine_logits(members, combine)]):
                hits[i] += (z.argmax(-1) == y).sum()
            n += len(y)
    for i, name in enumerate(("val/acc_teacher_0", "val/acc_teacher_1", "val/acc_teacher")):
        assert float(metrics[name]) == pytest.approx(float(hits[i]) / n), name


def test_checkpoint_records_every_teacher_and_refuses_a_changed_one(two_teachers, trainer_factory, tmp_path):
    paths = [str(p) for p in two_teachers]
    module = DistillModule(StudentConfig(**TINY_STUDENT), teacher=paths, warmup_epochs=0)
    trainer = fit(module, trainer_factory)
    ckpt_path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    members = ckpt["distill_teacher"]["members"]
    assert [m["path"] for m in members] == [str(p.resolve()) for p in two_teachers]
    for member, path in zip(members, two_teachers):  # the files' own sha256 (as `sha256sum` prints it)
        assert member["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert members[0]["sha256"] != members[1]["sha256"]
    assert ckpt["hyper_parameters"]["teacher"] == [m["path"] for m in members]
    assert ckpt["hyper_parameters"]["teacher_sha256"] == [m["sha256"] for m in members]

    loaded = DistillModule.load_from_checkpoint(ckpt_path)
    assert isinstance(loaded.teacher, TeacherEnsemble)
    change_fc(two_teachers[1])
    with pytest.raises(ValueError, match=r"model.teacher\[1\].*sha256"):
        DistillModule.load_from_checkpoint(ckpt_path)


def test_cache_keys_on_every_teacher(two_teachers, trainer_factory, tmp_path):
    dm_kwargs = dict(img_size=8, batch_size=32, keyed_views=True, view_epochs=1)
    cache = TeacherCacheConfig(dir=str(tmp_path / "cache"))

    def run(*callbacks):
        module = DistillModule(StudentConfig(**TINY_STUDENT), teacher=[str(p) for p in two_teachers],
                               teacher_cache=cache, warmup_epochs=0)
        fit(module, trainer_factory, ImageDataModule("digits", **dm_kwargs), max_steps=2, limit_val_batches=0,
            callbacks=list(callbacks))

    run()
    seen = LossInputs()
    run(seen)  # the same ensemble reads its cache, which feeds the loss the stored combination
    stored = TeacherCache(tmp_path / "cache")
    assert len(seen.calls) == 2
    for call, (_, _, keys) in zip(seen.calls, seen.batches):
        assert torch.equal(call["teacher"], stored.logits(keys)), "the loss did not get the stored combination"
    change_fc(two_teachers[1])
    with pytest.raises(ValueError, match="stale: its teacher differs"):
        run()


def test_a_list_of_teachers_from_the_command_line(two_teachers, tmp_path):
    a, b = two_teachers
    cli = DistillCLI(args=["--config", "recipes/digits/student.yaml", "--model.init_args.teacher", f"[{a}, {b}]",
                           "--model.init_args.teacher_combine", "mean_probs",
                           "--model.init_args.student.depth", "1", "--model.init_args.student.embed_dim", "32",
                           "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    assert isinstance(cli.model.teacher, TeacherEnsemble) and cli.model.teacher.combine == "mean_probs"


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended.*")
def test_resume_with_another_number_of_teachers_is_refused(two_teachers, trainer_factory, tmp_path):
    a, b = (str(p) for p in two_teachers)
    make = lambda teachers: DistillModule(StudentConfig(**TINY_STUDENT), teacher=teachers, warmup_epochs=0)  # noqa: E731
    trainer = fit(make([a, b]), trainer_factory, max_steps=1, limit_val_batches=0)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    for teachers, n in (([a], 1), ([a, b, a], 3)):
        with pytest.raises(ValueError, match=rf"^model.teacher: the checkpoint was trained with 2 teachers but this "
                                             rf"run has {n}; .*"):
            trainer_factory(max_steps=2, limit_val_batches=0).fit(make(teachers), ImageDataModule(
                "digits", img_size=8, batch_size=32), ckpt_path=path)


def test_ensemble_refusals_are_one_line_errors(two_teachers):
    from distill import build_teacher

    paths = [str(p) for p in two_teachers]
    with pytest.raises(ValueError, match=r"^model.teacher_combine='max' is unknown; use mean_logits or mean_probs$"):
        DistillModule(StudentConfig(**TINY_STUDENT), teacher=paths, teacher_combine="max")
    torch.manual_seed(0)
    five = build_teacher("cifar_resnet10", 5, in_chans=1, img_size=8, base_width=8)
    with pytest.raises(ValueError, match=r"^model.teacher: the teachers predict different numbers of classes \[5, 10\]; "
                                         r"distil from teachers trained on the same classes$"):
        DistillModule(StudentConfig(**TINY_STUDENT), teacher=[paths[0], five])
