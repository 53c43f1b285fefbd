"""TeacherModule (step 1): metadata from the data into the checkpoint, logged metrics, the optimizer, and
a real training run on digits through the Python API."""
from __future__ import annotations

import pytest
import torch

from distill import ImageDataModule, TeacherModule, build_teacher, model_meta


def test_metadata_taken_from_data_and_saved(tmp_path, trainer_factory, tiny_teacher_kwargs):
    dm = ImageDataModule("digits", img_size=8, batch_size=32, mean=[0.25], std=[0.5])
    module = TeacherModule(**tiny_teacher_kwargs)
    assert module.model is None  # built once the data is known
    trainer = trainer_factory(max_steps=1, limit_val_batches=1)
    trainer.fit(module, dm)
    meta = module.meta
    assert meta["num_classes"] == 10 and meta["in_chans"] == 1 and meta["img_size"] == 8
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["mean"] == (0.25,) and meta["std"] == (0.5,)
    assert module.model.stem[0].in_channels == 1 and module.model.get_classifier().out_features == 10

    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert ckpt["hyper_parameters"]["distill_kind"] == "teacher"
    # the checkpoint alone rebuilds the same model, metadata included
    rebuilt = build_teacher("resnet50", checkpoint=path)
    assert model_meta(rebuilt) == dict(meta, name="cifar_resnet10")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), module.model.eval()(x))


def test_logged_metrics(trainer_factory, tiny_teacher_kwargs):
    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    trainer = trainer_factory(max_steps=2, limit_val_batches=2, val_check_interval=2)
    trainer.fit(TeacherModule(**tiny_teacher_kwargs), dm)
    metrics = trainer.callback_metrics
    for name in ("train/loss", "val/acc", "val/acc_top5"):
        assert name in metrics, sorted(metrics)
    assert 0.0 <= float(metrics["val/acc"]) <= float(metrics["val/acc_top5"]) <= 1.0
    assert float(metrics["train/loss"]) > 0


def test_no_top5_with_fewer_than_five_classes(trainer_factory, tiny_teacher_kwargs):
    dm = ImageDataModule("synthetic", img_size=8, batch_size=8, num_samples=32, num_classes_synthetic=3,
                         in_chans_synthetic=3)
    trainer = trainer_factory(max_steps=1, limit_val_batches=1)
    module = TeacherModule(**tiny_teacher_kwargs)
    trainer.fit(module, dm)
    trainer.validate(module, dm, verbose=False)
    assert "val/acc" in trainer.callback_metrics
    assert "val/acc_top5" not in trainer.callback_metrics
    assert module.meta["in_chans"] == 3 and module.meta["num_classes"] == 3


def test_num_classes_mismatch_refused(trainer_factory, tiny_teacher_kwargs):
    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    trainer = trainer_factory(max_steps=1)
    with pytest.raises(ValueError, match="num_classes"):
        trainer.fit(TeacherModule(num_classes=5, **tiny_teacher_kwargs), dm)
    assert trainer.global_step == 0


def test_num_classes_needed_without_data(tiny_teacher_kwargs):
    module = TeacherModule(**tiny_teacher_kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        module.configure_model()
    built = TeacherModule(num_classes=4, in_chans=1, **tiny_teacher_kwargs)  # enough to build at once
    assert built.model is not None and built.meta["num_classes"] == 4
    with torch.no_grad():
        assert built.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_optimizer_no_weight_decay_on_norms_and_biases(trainer_factory, tiny_teacher_kwargs):
    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    module = TeacherModule(weight_decay=0.05, **tiny_teacher_kwargs)
    trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    trainer.fit(module, dm)
    (optimizer,) = trainer.optimizers
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(module.model.named_parameters())
    assert set(decay_of) == {id(p) for p in named.values()}  # every parameter, each once
    for name, p in named.items():
        expected = 0.0 if p.ndim <= 1 else 0.05  # BatchNorm weights/biases and the fc bias: no decay
        assert decay_of[id(p)] == expected, name


@pytest.mark.slow
def test_teacher_trained_on_digits(trained_teacher, accuracy_of):
    """Step 1 through the Python API: cifar_resnet18_w32 on 8x8 digits, 8 epochs."""
    assert trained_teacher.val_acc >= 0.95, trained_teacher.metrics
    # the best checkpoint rebuilds a teacher with the same accuracy, counted here by hand
    model = build_teacher("cifar_resnet18", checkpoint=trained_teacher.ckpt)
    meta = model_meta(model)
    assert meta["name"] == "cifar_resnet18_w32"
    dm = ImageDataModule("digits", img_size=8, batch_size=64, seed=0)
    dm.setup("validate")
    assert meta["mean"] == pytest.approx(dm.mean) and meta["std"] == pytest.approx(dm.std)
    acc = accuracy_of(model, dm.val_dataloader())
    assert acc >= 0.95
    assert acc == pytest.approx(trained_teacher.val_acc, abs=1e-6)


def test_a_teacher_handed_over_in_eval_mode_trains_in_train_mode(trainer_factory, tiny_teacher_kwargs):
    """Lightning 2.6 keeps the module's mode when fitting starts: a TeacherModule left in eval mode (after
    a `trainer.validate`, or `.eval()` by hand) would train with frozen BatchNorm statistics and no dropout."""
    import lightning as L

    dm = ImageDataModule("digits", img_size=8, batch_size=32)
    module = TeacherModule(num_classes=10, in_chans=1, **tiny_teacher_kwargs).eval()
    bn = module.model.stem[1]
    before = bn.running_mean.clone()
    seen = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(all(m.training for m in pl_module.modules()))

    trainer_factory(max_steps=2, limit_val_batches=1, val_check_interval=1, callbacks=[Modes()]).fit(module, dm)
    assert seen == [True, True]  # at every step, also after a validation
    assert not torch.equal(bn.running_mean, before)  # BatchNorm statistics move
