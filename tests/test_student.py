"""DistillModule (step 2): the frozen teacher, checkpoints without it, reloading and resuming, the optimizer,
logged metrics, EMA, class checks, TeacherInput, and a real run on digits after step 1."""
from __future__ import annotations

import hashlib
import math
import shutil
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

from distill import (
    DistillationLoss,
    DistillModule,
    ImageDataModule,
    StudentConfig,
    build_student,
    build_teacher,
    load_student,
    model_meta,
)
from distill.teacher.frozen import TeacherInput
from conftest import make_trainer

VAL_NAMES = ("val/acc", "val/acc_cls", "val/acc_dist", "val/acc_teacher", "val/agreement")
TRAIN_NAMES = ("train/loss", "train/loss_ce", "train/loss_distill")


def digits(batch_size: int = 16, **kwargs) -> ImageDataModule:
    return ImageDataModule("digits", img_size=8, batch_size=batch_size, **kwargs)


def bn_teacher(dm: ImageDataModule, num_classes: int | None = None, **meta) -> torch.nn.Module:
    """A fresh tiny CNN with BatchNorm for `dm` (its running statistics would move in train mode)."""
    kwargs = dict(in_chans=dm.in_chans, img_size=dm.img_size, mean=dm.mean, std=dm.std,
                  class_names=None if num_classes else dm.class_names)
    kwargs.update(meta)
    return build_teacher("cifar_resnet10", num_classes or dm.num_classes, base_width=8, **kwargs)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def teacher_file(tiny_teacher_ckpt, tmp_path):
    """A private copy of the tiny step-1 checkpoint (tests may change it)."""
    path = tmp_path / "teacher" / "teacher.ckpt"
    path.parent.mkdir()
    shutil.copy(tiny_teacher_ckpt, path)
    return path


def change_teacher_file(path) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("fc.weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1.0
    torch.save(ckpt, path)


# ----------------------------------------------------------------------------------- frozen teacher
def test_teacher_frozen_through_fit_and_validate(trainer_factory, tiny_student):
    torch.manual_seed(0)
    dm = digits()
    teacher = bn_teacher(dm)
    teacher.train()  # even handed over in train mode
    before = snapshot(teacher)
    assert any(k.endswith("running_mean") for k in before)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = DistillModule(StudentConfig(**tiny_student), teacher=teacher,
                               loss=DistillationLoss("soft", alpha=0.5, tau=2.0), warmup_epochs=0)
        assert module.teacher.network is teacher and not teacher.training
        trainer = trainer_factory(max_steps=3, limit_val_batches=2, val_check_interval=2)
        trainer.fit(module, dm)
    # Lightning's "module(s) in eval mode" warning is about the teacher, frozen on purpose: not shown
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    trainer.validate(module, dm, verbose=False)
    module.train()  # Lightning's mode switches go through here; the teacher stays in eval
    assert module.student.training
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert_same_state(before, snapshot(teacher))  # weights and BatchNorm running statistics
    # ... while the student did train
    assert trainer.global_step == 3
    fresh = build_student(**module.hparams["student"])
    assert not all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), module.student.state_dict().values())
    )


def test_optimizer_holds_only_student_params_with_deit_weight_decay(trainer_factory, tiny_student):
    dm = digits()
    module = DistillModule(StudentConfig(**tiny_student), teacher=bn_teacher(dm), weight_decay=0.07)
    trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    trainer.fit(module, dm)
    (optimizer,) = trainer.optimizers
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(decay_of)  # each once
    student = dict(module.student.named_parameters())
    assert set(decay_of) == {id(p) for p in student.values()}
    assert not set(decay_of) & {id(p) for p in module.teacher.parameters()}
    # DeiT / timm: no decay on the position embedding, the tokens, norms and biases
    no_decay = {"pos_embed", "cls_token", "dist_token", "norm.weight", "norm.bias", "head.bias", "head_dist.bias",
                "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"}
    decay = {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight",
             "head_dist.weight"}
    assert no_decay | decay <= set(student)
    for name, p in student.items():
        expected = 0.0 if (name in no_decay or p.ndim <= 1) else 0.07
        assert decay_of[id(p)] == expected, name
    for name in decay:
        assert decay_of[id(student[name])] == 0.07, name


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_without_teacher_weights_records_its_identity(trainer_factory, teacher_file, tiny_student):
    dm = digits()
    module = DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file), warmup_epochs=0)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(module, dm)
    path = trainer.checkpoint_callback.best_model_path
    assert path
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert not any(k.startswith("teacher.") for k in keys)
    assert {f"student.{k}" for k in module.student.state_dict()} <= keys
    for k, v in module.student.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"student.{k}"], v), k
    digest = hashlib.sha256(teacher_file.read_bytes()).hexdigest()  # computed here, independently
    hp = ckpt["hyper_parameters"]
    assert hp["teacher"] == str(teacher_file.resolve())
    assert hp["teacher_sha256"] == digest
    assert hp["distill_kind"] == "student"
    assert ckpt["distill_teacher"]["path"] == str(teacher_file.resolve())
    assert ckpt["distill_teacher"]["sha256"] == digest
    # and what is needed to rebuild and feed the student without the recipe
    assert hp["student"]["num_classes"] == 10 and hp["student"]["in_chans"] == 1 and hp["student"]["img_size"] == 8
    assert hp["data"]["class_names"] == dm.class_names
    assert hp["data"]["mean"] == pytest.approx(list(dm.mean))
    assert hp["loss"]["mode"] == module.loss.mode


def test_load_from_checkpoint_reloads_teacher_from_its_file(trainer_factory, teacher_file, tiny_student, tmp_path):
    dm = digits()
    module = DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file), warmup_epochs=0)
    trainer = trainer_factory(max_steps=2, limit_val_batches=0)
    trainer.fit(module, dm)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)

    loaded = DistillModule.load_from_checkpoint(path)
    expected_teacher = build_teacher("cifar_resnet10", checkpoint=teacher_file)
    assert_same_state(snapshot(expected_teacher), snapshot(loaded.teacher.network))
    assert not loaded.teacher.training and not any(p.requires_grad for p in loaded.teacher.parameters())
    assert_same_state(snapshot(module.student), snapshot(loaded.student))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.student.eval()(x), module.student.eval()(x))
    # the student alone, without the teacher
    student = load_student(path)
    meta = model_meta(student)
    assert meta["class_names"] == dm.class_names and meta["mean"] == pytest.approx(dm.mean)
    with torch.no_grad():
        torch.testing.assert_close(student(x), module.student(x))

    # a changed teacher file is refused ...
    change_teacher_file(teacher_file)
    with pytest.raises(ValueError, match="sha256"):
        DistillModule.load_from_checkpoint(path)
    # ... and so is a missing one
    teacher_file.unlink()
    with pytest.raises(FileNotFoundError, match="teacher"):
        DistillModule.load_from_checkpoint(path)


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended.*")
def test_resume_reloads_teacher_and_refuses_a_changed_one(trainer_factory, teacher_file, tiny_student, tmp_path):
    dm = digits()
    make = lambda: DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file), warmup_epochs=0)  # noqa: E731
    trainer = trainer_factory(max_steps=2, limit_val_batches=0)
    trainer.fit(make(), dm)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)

    resumed = trainer_factory(max_steps=3, limit_val_batches=0)
    module = make()
    resumed.fit(module, dm, ckpt_path=path)
    assert resumed.global_step == 3  # continued from step 2
    assert "teacher.network.stem.0.weight" in dict(module.named_parameters())

    change_teacher_file(teacher_file)
    again = trainer_factory(max_steps=4, limit_val_batches=0)
    module = make()
    with pytest.raises(ValueError, match="sha256"):
        again.fit(module, dm, ckpt_path=path)
    assert again.global_step == 0


def test_a_fresh_run_with_a_wrong_teacher_sha256_is_refused(teacher_file, tiny_student):
    """`model.teacher_sha256` pins the teacher file in a new run too, not only when a checkpoint is loaded:
    a digest that is not the file's is refused before anything trains; the file's own is accepted."""
    digest = hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"has sha256 {digest[:12]}... but this run was trained with 000000000000"):
        DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file), teacher_sha256="0" * 64)
    module = DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file), teacher_sha256=digest)
    assert module.teacher_identity["sha256"] == digest


def test_student_checkpoint_is_not_a_teacher(trainer_factory, teacher_file, tiny_student, tmp_path):
    dm = digits()
    trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    trainer.fit(DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file)), dm)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="student"):
        build_teacher("cifar_resnet10", checkpoint=path)
    with pytest.raises(ValueError, match="student"):
        DistillModule(StudentConfig(**tiny_student), teacher=str(path))


# ------------------------------------------------------------------------------------------- metrics
def assert_val_and_train_metrics(metrics) -> None:
    """Every stable metric name is logged; accuracies lie in [0, 1]."""
    for name in VAL_NAMES + TRAIN_NAMES + ("val/acc_top5",):
        assert name in metrics, sorted(metrics)
    for name in VAL_NAMES + ("val/acc_top5",):
        assert 0.0 <= float(metrics[name]) <= 1.0, name


def test_logged_metric_names(trainer_factory, tiny_student):
    dm = digits()
    module = DistillModule(StudentConfig(**tiny_student), teacher=bn_teacher(dm), loss=DistillationLoss("hard"))
    trainer = trainer_factory(max_steps=2, limit_val_batches=2, val_check_interval=2)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert_val_and_train_metrics(metrics)
    assert float(metrics["val/acc_top5"]) >= float(metrics["val/acc"])
    for name in TRAIN_NAMES:
        assert math.isfinite(float(metrics[name])) and float(metrics[name]) >= 0, name
    # train/loss is the DeiT mix of its two terms (alpha = 0.5 by default)
    a = module.loss.alpha
    total = (1 - a) * float(metrics["train/loss_ce"]) + a * float(metrics["train/loss_distill"])
    assert float(metrics["train/loss"]) == pytest.approx(total, rel=1e-5)
    assert "val/acc_ema" not in metrics


def _least_squares_head(layer: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> None:
    """`layer` set to the least-squares map from `feats` to one-hot `labels`: a head far from chance."""
    a = torch.cat([feats, torch.ones(len(feats), 1)], 1)
    solution = torch.linalg.lstsq(a, torch.nn.functional.one_hot(labels, layer.out_features).float()).solution
    layer.weight.copy_(solution[:-1].T)
    layer.bias.copy_(solution[-1])


def test_validation_metrics_are_each_heads_accuracy_counted_by_hand(trainer_factory, tiny_student):
    """val/acc (fused heads), val/acc_cls, val/acc_dist, val/acc_teacher and val/agreement (fused argmax vs
    the teacher's) equal a count by hand on the validated batches. The heads are set by least squares to
    predict the labels (class head, teacher) and the next label (distillation head), so they disagree and a
    metric that read another head, or the student for the teacher, would show (checked first)."""
    from distill.models.heads import student_heads
    from helpers.by_hand import student_and_teacher_accuracies, validation_batches

    L.seed_everything(0)
    dm = digits(batch_size=64)
    student = build_student(num_classes=10, img_size=8, in_chans=1, **tiny_student).eval()
    teacher = bn_teacher(dm).eval()
    batches = validation_batches(dm, 3)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        tokens = student.forward_features(x)
        _least_squares_head(student.head, tokens[:, 0], y)
        _least_squares_head(student.head_dist, tokens[:, 1], (y + 1) % 10)
        _least_squares_head(teacher.head.fc, teacher.forward_head(teacher.forward_features(x), pre_logits=True), y)
    module = DistillModule(student, teacher=teacher, loss=DistillationLoss("hard"))
    metrics = trainer_factory(limit_val_batches=3).validate(module, dm, verbose=False)[0]
    by_hand = student_and_teacher_accuracies(module.student, module.teacher, batches)
    with torch.no_grad():  # what an agreement read from the distillation head alone would give
        dist_agreement = float((student_heads(module.student, x)[1].argmax(-1) == module.teacher(x).argmax(-1)).float().mean())
    assert len({by_hand["val/acc"], by_hand["val/acc_cls"], by_hand["val/acc_dist"], by_hand["val/acc_teacher"]}) == 4
    assert dist_agreement != by_hand["val/agreement"]
    for key, value in by_hand.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_ema_logs_acc_ema_and_copies_only_the_student(trainer_factory, tiny_student, tmp_path, accuracy_of):
    dm = digits()
    module = DistillModule(StudentConfig(**tiny_student), teacher=bn_teacher(dm), ema_decay=0.5, lr=1e-2,
                           warmup_epochs=0)
    after_step = []

    class Weights(L.Callback):  # the student's weights after each optimizer step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after_step.append(snapshot(pl_module.student))

    trainer = trainer_factory(max_steps=3, limit_val_batches=2, val_check_interval=3, callbacks=[Weights()])
    trainer.fit(module, dm)
    ema = module.student_ema.module
    # the average by hand, as timm's ModelEmaV3 counts steps from 1: the first update copies the
    # weights, each later one keeps half (decay 0.5) of the average
    assert len(after_step) == 3
    expected = after_step[0]
    for weights in after_step[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * v if v.is_floating_point() else v for k, v in weights.items()}
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    # val/acc_ema is that average's accuracy on the two validation batches, counted by hand
    batches = list(dm.val_dataloader())[:2]
    assert float(trainer.callback_metrics["val/acc_ema"]) == pytest.approx(accuracy_of(ema, batches), abs=1e-6)
    assert isinstance(ema, VisionTransformerDistilled) and ema is not module.student
    assert ema.state_dict().keys() == module.student.state_dict().keys()
    assert sum(p.numel() for p in ema.parameters()) == sum(p.numel() for p in module.student.parameters())
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    # an average, not the student itself, and not in the optimizer
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), module.student.parameters()))
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in ema.parameters()}


def test_ema_updates_once_per_optimizer_step_under_gradient_accumulation(trainer_factory, tiny_student):
    dm = digits()
    module = DistillModule(StudentConfig(**tiny_student), teacher=bn_teacher(dm), ema_decay=0.9, warmup_epochs=0)
    steps = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            update = pl_module.student_ema.update
            pl_module.student_ema.update = lambda model, step=None: (steps.append(step), update(model, step=step))

    trainer = trainer_factory(max_epochs=1, limit_train_batches=6, limit_val_batches=0, accumulate_grad_batches=2,
                              callbacks=[Spy()])
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    assert steps == [1, 2, 3]  # after each optimizer step, never after a micro-batch that only accumulated


def test_teacher_with_other_classes_refused_before_first_step(trainer_factory, tiny_student):
    dm = digits()
    steps = []

    class Spy(DistillModule):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    module = Spy(StudentConfig(**tiny_student), teacher=bn_teacher(dm, num_classes=3))
    trainer = trainer_factory(max_steps=2)
    with pytest.raises(ValueError, match="classes") as err:
        trainer.fit(module, dm)
    assert "3" in str(err.value) and "10" in str(err.value)
    assert steps == [] and trainer.global_step == 0


def test_teacher_with_other_class_names_refused(trainer_factory, tiny_student):
    dm = digits()
    teacher = bn_teacher(dm, class_names=[str(9 - i) for i in range(10)])
    with pytest.raises(ValueError, match="classes"):
        trainer_factory(max_steps=1).fit(DistillModule(StudentConfig(**tiny_student), teacher=teacher), dm)


def test_distillation_needs_a_teacher(trainer_factory, tiny_student):
    with pytest.raises(ValueError, match="teacher"):
        trainer_factory(max_steps=1).fit(DistillModule(StudentConfig(**tiny_student)), digits())


def test_no_distillation_baseline_runs_without_teacher(trainer_factory, tiny_student):
    module = DistillModule(StudentConfig(**tiny_student), loss=DistillationLoss("none"))
    trainer = trainer_factory(max_steps=1, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, digits())
    assert "val/acc" in trainer.callback_metrics and "val/acc_teacher" not in trainer.callback_metrics
    assert float(trainer.callback_metrics["train/loss_distill"]) == 0.0


# ------------------------------------------------------------------------------------- TeacherInput
def test_teacher_input_identity_when_everything_agrees():
    ti = TeacherInput((0.3,), (0.4,), (0.3,), (0.4,), 1, 1, 8)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(ti(x), x)


def test_teacher_input_renormalises():
    # student data: mean 0.5, std 0.25; teacher: mean 0.2, std 0.5. A pixel of raw value v arrives as
    # (v - 0.5) / 0.25 and must leave as (v - 0.2) / 0.5.
    ti = TeacherInput((0.5,), (0.25,), (0.2,), (0.5,), 1, 1, None)
    x = torch.tensor([0.0, 1.0, -2.0, 2.0]).view(1, 1, 1, 4)  # raw 0.5, 0.75, 0.0, 1.0
    expected = torch.tensor([0.6, 1.1, -0.4, 1.6]).view(1, 1, 1, 4)
    torch.testing.assert_close(ti(x), expected)


def test_teacher_input_grayscale_to_rgb_and_back():
    gray_to_rgb = TeacherInput((0.5,), (0.5,), (0.1, 0.2, 0.3), (0.5, 0.25, 0.2), 1, 3, None)
    x = torch.tensor([1.0]).view(1, 1, 1, 1)  # raw 1.0
    torch.testing.assert_close(gray_to_rgb(x).flatten(), torch.tensor([1.8, 3.2, 3.5]))

    # colour to gray as PIL's convert("L") (what a grayscale teacher was trained on): 0.299 R + 0.587 G + 0.114 B
    rgb_to_gray = TeacherInput((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.5,), (0.25,), 3, 1, None)
    x = torch.tensor([0.2, 0.4, 0.9]).view(1, 3, 1, 1)  # luma 0.3972 (the channel mean would be 0.5)
    out = rgb_to_gray(x)
    assert out.shape == (1, 1, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([(0.3972 - 0.5) / 0.25]))


def test_teacher_input_grayscale_is_pils_convert_L():
    """A colour photo through TeacherInput for a grayscale teacher equals PIL's convert("L") of it to
    within one uint8 level (PIL rounds to integers): up to 0.85 normalised units off with the channel mean."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    rgb = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    gray = torch.from_numpy(np.array(img.convert("L"))).float()[None, None] / 255
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    ti = TeacherInput(mean, std, (0.5,), (0.25,), 3, 1, None)
    out = ti((rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(out, (gray - 0.5) / 0.25, atol=(1 / 255) / 0.25, rtol=0)


def test_teacher_input_resizes():
    # upsampling: bilinear, half-pixel centres, 2 -> 4: [a, b] -> [a, .75a + .25b, .25a + .75b, b] along each
    # axis, then rounded to uint8 levels as PIL's output is
    ti = TeacherInput((0.0,), (1.0,), (0.0,), (1.0,), 1, 1, 4)
    x = torch.tensor([[0.0, 64.0], [128.0, 255.0]]).view(1, 1, 2, 2) / 255
    line = lambda a, b: [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]  # noqa: E731
    rows = [line(0.0, 64.0), line(128.0, 255.0)]
    cols = torch.tensor([line(rows[0][j], rows[1][j]) for j in range(4)]).T  # (4, 4)
    torch.testing.assert_close(ti(x), cols.round().view(1, 1, 4, 4) / 255)
    # a constant image stays constant when shrunk, after renormalisation
    shrink = TeacherInput((0.5,), (0.5,), (0.0,), (1.0,), 1, 1, 3)
    out = shrink(torch.full((2, 1, 12, 12), 0.4))
    assert out.shape == (2, 1, 3, 3)
    torch.testing.assert_close(out, torch.full((2, 1, 3, 3), 0.7))


def test_teacher_input_downsampling_gives_back_the_upsampled_original():
    """A 32 px teacher of a student fed 224 px images upsampled from 32 px (locality guidance's set-up)
    gets its own images back: plain bilinear at an integer factor inverts the upsampling exactly; an
    antialiased resize would blur them."""
    x = torch.rand(2, 3, 32, 32)
    up = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    ti = TeacherInput((0.5,) * 3, (0.25,) * 3, (0.5,) * 3, (0.25,) * 3, 3, 3, 32)
    torch.testing.assert_close(ti(up), x, atol=1e-5, rtol=0)
    renorm = TeacherInput((0.5,) * 3, (0.25,) * 3, (0.4,) * 3, (0.2,) * 3, 3, 3, 32)
    torch.testing.assert_close(renorm(up), (x * 0.25 + 0.5 - 0.4) / 0.2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_teacher_at_its_own_resolution_sees_its_step1_input(tmp_path, interpolation):
    """A teacher trained at 96 px from 32 px images (an ImageNet CNN on CIFAR): in step 2 it gets the
    student's 32 px batch upsampled exactly as step 1 prepared its images (PIL, the recorded
    interpolation, uint8 levels). Tolerance: PIL's fixed-point rounding, one uint8 level for at most 1% of
    the values and two at most (measured: bilinear identical, bicubic 60 of 442,368 values off, by at most two levels)."""
    from PIL import Image

    from distill import FrozenTeacher, ImageDataModule, TeacherModule

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(8):  # smooth-ish colour images: upsampled noise plus a gradient
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((32, 32), Image.BICUBIC)
                img.save(tmp_path / "data" / split / c / f"{i}.png")
    kw = dict(source="imagefolder", root=str(tmp_path / "data"), batch_size=16, interpolation=interpolation)
    teacher_dm = ImageDataModule(img_size=96, **kw)
    trainer = make_trainer(tmp_path / "t", max_steps=1, limit_val_batches=1)
    trainer.fit(TeacherModule("cifar_resnet10", model_kwargs={"base_width": 8}), teacher_dm)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    teacher = FrozenTeacher.load(tmp_path / "teacher.ckpt")
    student_dm = ImageDataModule(img_size=32, **kw)
    student_dm.setup("fit")
    teacher.adapt_to(student_dm.mean, student_dm.std, student_dm.in_chans)
    assert teacher.input.interpolation == interpolation  # read from the checkpoint
    x32, y = next(iter(student_dm.val_dataloader()))
    x96, y96 = next(iter(teacher_dm.val_dataloader()))
    assert torch.equal(y, y96)
    got = teacher.input(x32)
    level = (1 / 255) / min(teacher_dm.std)
    diff = (got - x96).abs()
    print(f"{interpolation}: {(diff > 1e-4).sum().item()} of {diff.numel()} values differ, max {diff.max() / level:.2f} levels")
    assert diff.max() <= 2 * level + 1e-5
    assert (diff > 1e-4).float().mean() < 0.01


def test_teacher_with_other_mean_std_size_and_channels_gets_converted_input(trainer_factory, tiny_student):
    """Synthetic RGB 8x8 data, three classes (so no top-5), and a grayscale teacher trained at 16x16 with
    other statistics: the teacher must receive 1-channel 16x16 input in its own normalisation, which is
    what PIL makes of the image: gray by ITU-R 601-2 luma, resized with bilinear (the teacher's
    interpolation). PIL resizes here in float (mode F), the teacher's input is stored as uint8 levels
    after each of its two passes, so they differ by at most one level anywhere, whatever the images.

    Seeded: the first batch is a shuffle drawn from torch's global RNG (random at process start)."""
    from PIL import Image

    L.seed_everything(0)
    dm = ImageDataModule("synthetic", img_size=8, batch_size=8, num_samples=32, num_classes_synthetic=3,
                         in_chans_synthetic=3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    teacher = build_teacher("cifar_resnet10", 3, in_chans=1, img_size=16, mean=[0.45], std=[0.3],
                            class_names=dm.class_names, base_width=8)
    module = DistillModule(StudentConfig(**tiny_student), teacher=teacher, loss=DistillationLoss("soft", tau=2.0))
    seen = {}

    def capture_teacher_input(_module, args):  # returns None: the input is left as it is
        if "teacher" not in seen:
            seen["teacher"] = args[0].detach().clone()

    teacher.register_forward_pre_hook(capture_teacher_input)

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("x", batch[0].detach().clone())

    trainer = trainer_factory(max_steps=1, limit_val_batches=1, val_check_interval=1, callbacks=[Capture()])
    trainer.fit(module, dm)
    x, t_in = seen["x"], seen["teacher"]
    assert t_in.shape == (8, 1, 16, 16)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    gray = (x * std + mean).mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)  # (8, 8, 8) in [0, 1]
    by_pil = torch.stack([torch.from_numpy(np.array(
        Image.fromarray((255 * g).numpy(), mode="F").resize((16, 16), Image.BILINEAR))) for g in gray])
    levels = (t_in[:, 0] * 0.3 + 0.45) * 255  # the teacher's input back in 0-255 levels
    diff = (levels - by_pil).abs()
    print(f"teacher input vs PIL: max {diff.max():.3f} levels, mean {diff.mean():.3f}")
    assert diff.max() <= 1.0 + 1e-3, f"max {diff.max():.3f} levels"
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # uint8 levels, as step 1 stored its images
    assert "val/acc_teacher" in trainer.callback_metrics and "val/acc_top5" not in trainer.callback_metrics


# -------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_distill_on_digits_after_step_one(trained_teacher, trainer_factory, accuracy_of):
    """Step 2 through the Python API with the teacher of step 1 (trained once per session)."""
    L.seed_everything(0)
    dm = ImageDataModule("digits", img_size=8, batch_size=64, seed=0)
    module = DistillModule(
        StudentConfig(patch_size=2, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0),
        teacher=str(trained_teacher.ckpt),
        loss=DistillationLoss("hard", alpha=0.5),
        lr=2e-3,
        warmup_epochs=0.5,
    )
    trainer = trainer_factory(max_epochs=6, enable_checkpointing=True)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert_val_and_train_metrics(metrics)
    # the teacher, reloaded from its checkpoint, scores exactly what step 1 measured
    teacher = build_teacher("cifar_resnet18", checkpoint=trained_teacher.ckpt)
    assert float(metrics["val/acc_teacher"]) == pytest.approx(accuracy_of(teacher, dm.val_dataloader()), abs=1e-6)
    assert float(metrics["val/acc_teacher"]) >= 0.95
    # the student learned something in 6 short epochs (chance is 0.1)
    assert float(metrics["val/acc"]) > 0.3
    # its fused accuracy, counted by hand from the saved student
    student = load_student(trainer.checkpoint_callback.best_model_path)
    assert accuracy_of(student, dm.val_dataloader()) == pytest.approx(float(metrics["val/acc"]), abs=1e-6)


def test_student_on_another_split_of_the_teachers_data_is_refused(trainer_factory, teacher_file, tiny_student):
    """The teacher records which digits it held out; a student whose data.seed draws another split would
    validate on images the teacher trained on."""
    hp = torch.load(teacher_file, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["data_split"]["seed"] == 0 and hp["data_split"]["val"] == digits().split_fingerprint["val"]
    module = DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file), warmup_epochs=0)
    with pytest.raises(ValueError, match="another train/validation split.*data.seed was 0, this run's is 1"):
        trainer_factory(max_steps=1, limit_val_batches=0).fit(module, digits(seed=1))
    # the same split trains
    trainer_factory(max_steps=1, limit_val_batches=0).fit(module, digits(seed=0))


# ------------------------------------------------------------------------------------ train mode
def test_a_student_handed_over_in_eval_mode_trains_in_train_mode(trainer_factory, teacher_file, tiny_student, tmp_path):
    """Lightning 2.6 no longer puts the module in train mode when fitting starts: the student of
    `load_student` (in eval mode) would train on its fused logits without drop path."""
    dm = digits()
    first = DistillModule(StudentConfig(**tiny_student), teacher=str(teacher_file), warmup_epochs=0)
    trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    trainer.fit(first, dm)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    student = load_student(tmp_path / "student.ckpt")
    assert not student.training
    module = DistillModule(student, teacher=str(teacher_file), warmup_epochs=0, ema_decay=0.9,
                           feature_guidance=dict(student_blocks=[0], teacher_layers=["stages.0"]))
    module.eval()  # everything, the guidance projections too
    seen = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(dict(student=all(m.training for m in pl_module.student.modules()),
                             proj=all(m.training for m in pl_module.guidance.modules()),
                             teacher=any(m.training for m in pl_module.teacher.network.modules()),
                             ema=any(m.training for m in pl_module.student_ema.module.modules())))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_factory(max_steps=2, limit_val_batches=1, val_check_interval=1, callbacks=[Modes()]).fit(module, dm)
    # in train mode at every step, also after a validation; the frozen teacher and the EMA copy in eval
    assert seen == [dict(student=True, proj=True, teacher=False, ema=False)] * 2
    assert not [w for w in caught if "in eval mode" in str(w.message)]  # the teacher's and EMA's: by design


def test_the_eval_mode_warning_is_hidden_for_the_teacher_alone(trainer_factory, tiny_student):
    """Building a teacher does not hide Lightning's warning about other modules left in eval mode."""
    dm = digits()

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(64, 10)
            self.dropout = torch.nn.Dropout(0.5).eval()  # left in eval mode by mistake

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(self.dropout(x.flatten(1))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DistillModule(StudentConfig(**tiny_student), teacher=bn_teacher(dm))
        trainer_factory(max_steps=1, limit_val_batches=0).fit(Plain(), dm)
    assert [w for w in caught if "Found 1 module(s) in eval mode" in str(w.message)]


def test_the_eval_mode_warning_still_names_other_modules_of_the_student_module(trainer_factory, tiny_student):
    class StaysInEval(torch.nn.Dropout):  # e.g. a user's frozen extra, not the teacher or the EMA copy
        def train(self, mode: bool = True):
            return super().train(False)

    dm = digits()
    module = DistillModule(StudentConfig(**tiny_student), teacher=bn_teacher(dm), warmup_epochs=0)
    module.extra = StaysInEval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_factory(max_steps=1, limit_val_batches=0).fit(module, dm)
    assert [w for w in caught if "module(s) in eval mode" in str(w.message)]


# ------------------------------------------------------------------------------------ FSDP glue
def _student_and_teacher(seed: int) -> DistillModule:
    torch.manual_seed(seed)
    teacher = build_teacher("cifar_resnet10", 10, in_chans=1, img_size=8, base_width=8)
    torch.manual_seed(seed + 100)
    student = build_student(num_classes=10, img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    return DistillModule(student, teacher)


def test_a_student_state_dict_loads_strictly_with_the_teachers_weights_kept():
    """What FSDP hands a resumed module: the checkpoint's state_dict, which holds no teacher weights."""
    trained, fresh = _student_and_teacher(0), _student_and_teacher(1)
    fresh.teacher.load_state_dict(trained.teacher.state_dict())  # the same teacher file, reloaded
    teacher_before = snapshot(fresh.teacher)
    student_only = {k: v for k, v in trained.state_dict().items() if not k.startswith("teacher.")}
    fresh.load_state_dict(student_only, strict=True)
    assert_same_state(snapshot(fresh.student), snapshot(trained.student))
    assert_same_state(snapshot(fresh.teacher), teacher_before)
    with pytest.raises(RuntimeError, match="Missing key"):  # a missing student weight still fails
        fresh.load_state_dict({k: v for k, v in student_only.items() if "head_dist" not in k}, strict=True)


def test_fsdp_strategy_ignores_the_teacher_and_keeps_the_students_parameters():
    """Lightning wraps the module in FSDP after `setup`; FSDP itself needs a GPU (tests/test_gpu.py fits)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = _student_and_teacher(0)
    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")])
    module._trainer = SimpleNamespace(strategy=strategy)
    module.setup("fit")
    module.setup("validate")  # setup runs once per stage: the teacher is listed once
    assert strategy.kwargs["ignored_modules"] == [module.teacher] and strategy.kwargs["use_orig_params"] is True
    module._trainer = None


def test_alpha_1_with_a_distillation_token_is_refused_and_without_one_it_is_not(tiny_student):
    """alpha 1 leaves the class head untrained inside the fused logits that val/acc and the export use:
    refused for a student with a token (as a config or as a network); function matching's student
    without token, alpha below 1, and mode none (no teacher term, alpha unused) are built."""
    teacher = bn_teacher(digits())
    soft_alone = DistillationLoss("soft", tau=1.0, alpha=1.0)
    for student in (StudentConfig(**tiny_student), dict(tiny_student),
                    build_student(num_classes=10, img_size=8, in_chans=1, **tiny_student)):
        with pytest.raises(ValueError, match=r"^model.init_args.loss.alpha=1 with a distillation token") as e:
            DistillModule(student, teacher=teacher, loss=soft_alone)
        assert "\n" not in str(e.value)
    DistillModule(StudentConfig(**tiny_student, distilled=False), teacher=teacher, loss=soft_alone)
    DistillModule(build_student(num_classes=10, img_size=8, in_chans=1, distilled=False, **tiny_student),
                  teacher=teacher, loss=soft_alone)
    DistillModule(StudentConfig(**tiny_student), teacher=teacher, loss=DistillationLoss("soft", tau=1.0, alpha=0.9))
    DistillModule(StudentConfig(**tiny_student), teacher=teacher, loss=DistillationLoss("none", alpha=1.0))


# ------------------------------------------------------------------------------ function matching
@pytest.mark.parametrize("on_device", [False, True])
def test_function_matching_teacher_and_student_see_the_same_mixed_image(trainer_factory, tiny_student, on_device):
    """Beyer et al.'s consistency: with mixup/cutmix, the live teacher gets exactly the mixed (and
    cropped, flipped) image the student trains on, and the student's KL target is the teacher's output
    on it; no ground-truth term at alpha 1 (the class labels are soft mixup targets, unused)."""
    dm = digits(batch_size=16, crop="pad", hflip=0.5, mixup=0.8, cutmix=1.0, on_device=on_device)
    module = DistillModule(StudentConfig(**tiny_student, distilled=False), teacher=bn_teacher(digits()),
                           loss=DistillationLoss("soft", tau=1.0, alpha=1.0), warmup_epochs=0)
    seen = {"teacher": [], "student": [], "targets": []}
    module.teacher.network.register_forward_pre_hook(lambda _m, args: seen["teacher"].append(args[0].detach().clone()))
    original = module.loss.forward

    def loss(out, z_t, y):
        seen["targets"].append((z_t.detach().clone(), y.detach().clone()))
        terms = original(out, z_t, y)
        assert float(terms.total) == pytest.approx(float(terms.distill))  # alpha 1: the KL alone
        return terms

    module.loss.forward = loss

    class Inputs(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["student"].append(batch[0].detach().clone())

    trainer_factory(max_steps=3, limit_val_batches=0, callbacks=[Inputs()]).fit(module, dm)
    assert len(seen["student"]) == len(seen["teacher"]) == 3
    for x_student, x_teacher, (z_t, y) in zip(seen["student"], seen["teacher"], seen["targets"]):
        assert torch.equal(x_student, x_teacher)  # the same tensor: crops, flips and mixing shared
        assert y.ndim == 2 and not torch.equal(y.max(-1).values, torch.ones(len(y)))  # mixed soft targets
        with torch.no_grad():
            torch.testing.assert_close(z_t, module.teacher.network(x_teacher).float())
