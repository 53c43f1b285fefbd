"""Few labels, many images: unlabelled training images (`data.unlabeled_root`, `data.labels_per_class`,
label -1), the loss with missing labels, and what keeps the result honest (the teacher never sees a
held-back label; held-out images cannot come back as unlabelled ones)."""
from __future__ import annotations

import collections
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill import DistillationLoss, DistillModule, ImageDataModule, TeacherModule
from distill.data.unlabeled import UnlabeledMixup
from distill.losses import dkd_distillation
from helpers.probes import LossInputs

TINY_TEACHER = dict(model="cifar_resnet10", model_kwargs={"base_width": 8})
TINY_STUDENT = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0)


def _digits_folder(root, classes=3, per_class=6, val_per_class=3):
    """A small image folder of real digits (8x8 grayscale PNGs): train/<c>/, val/<c>/, and the digits left
    over as a pool for unlabelled folders. Returns the pool (uint8 arrays)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)
    pool = []
    for c in range(classes):
        members = np.flatnonzero(d.target == c)
        for split, picks in (("train", members[:per_class]), ("val", members[per_class:per_class + val_per_class])):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in picks:
                Image.fromarray(images[i]).save(root / split / str(c) / f"{i}.png")
        pool += [images[i] for i in members[per_class + val_per_class:per_class + val_per_class + 5]]
    return pool


# ------------------------------------------------------------------------------------------ the data
def test_labels_per_class_keeps_n_labels_per_class_drawn_with_the_seed():
    dm = ImageDataModule("digits", labels_per_class=5, seed=0)
    dm.setup()
    targets = np.asarray(dm.train_set.targets)
    counts = collections.Counter(targets[targets >= 0].tolist())
    assert counts == {c: 5 for c in range(10)} and (targets == -1).sum() == len(targets) - 50
    assert dm.num_unlabeled == len(targets) - 50 and dm.train_set.num_labeled == 50
    x, y = dm.train_set[int(np.flatnonzero(targets == -1)[0])]
    assert y == -1 and torch.is_tensor(x)
    again = ImageDataModule("digits", labels_per_class=5, seed=0)
    again.setup()
    assert again.train_set.targets == dm.train_set.targets  # the same images keep their labels
    fp = dm.split_fingerprint
    assert fp["labeled"] != fp["train"] and ImageDataModule("digits").split_fingerprint["labeled"] == fp["train"]
    assert ImageDataModule("digits", labels_per_class=6, seed=0).split_fingerprint["labeled"] != fp["labeled"]
    other_seed = ImageDataModule("digits", labels_per_class=5, seed=0, val_fraction=0.2)
    other_seed._labels_kept  # noqa: B018 - drawn from data.seed alone
    assert other_seed.split_fingerprint["labeled"] == fp["labeled"]
    with pytest.raises(ValueError, match=r"data.labels_per_class=200: class '\d' has only \d+ training images; "
                                         r"lower data.labels_per_class to at most \d+") as e:
        ImageDataModule("digits", labels_per_class=200).setup()
    assert "\n" not in str(e.value)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="data.labels_per_class"):
            ImageDataModule("digits", labels_per_class=bad)


def test_an_unlabelled_folder_in_any_layout_with_an_image_folders_checks(tmp_path):
    pool = _digits_folder(tmp_path / "data")
    unl = tmp_path / "unlabeled"
    (unl / "a" / "b").mkdir(parents=True)
    Image.fromarray(pool[0]).save(unl / "flat.png")
    Image.fromarray(pool[1]).save(unl / "a" / "nested.png")
    Image.fromarray(np.stack([pool[2]] * 3, -1)).save(unl / "a" / "b" / "colour.jpg")  # read as the data's L
    (unl / "notes.txt").write_text("not an image")
    dm = ImageDataModule("imagefolder", root=str(tmp_path / "data"), img_size=8, batch_size=4, unlabeled_root=str(unl))
    dm.setup()
    assert len(dm.train_set) == 18 + 3 and dm.num_unlabeled == 3 and dm.train_set.targets[-3:] == [-1, -1, -1]
    x, y = dm.train_set[20]
    assert y == -1 and tuple(x.shape) == (1, 8, 8)
    # an unreadable file is skipped and counted, up to data.max_bad_fraction
    (unl / "broken.png").write_bytes(b"not a png")
    dm = ImageDataModule("imagefolder", root=str(tmp_path / "data"), img_size=8, batch_size=4, unlabeled_root=str(unl),
                         max_bad_fraction=0.5)
    dm.setup()
    assert dm.num_unlabeled == 3
    with pytest.raises(ValueError, match=r"data.unlabeled_root: 1 of 4 images under .* are unreadable"):
        ImageDataModule("imagefolder", root=str(tmp_path / "data"), img_size=8, batch_size=4,
                        unlabeled_root=str(unl)).setup()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for folder, match in ((tmp_path / "empty", "holds no image files"), (tmp_path / "missing", "is not a folder")):
        with pytest.raises(ValueError, match=f"data.unlabeled_root: .*{match}") as e:
            ImageDataModule("imagefolder", root=str(tmp_path / "data"), img_size=8, batch_size=4,
                            unlabeled_root=str(folder)).setup()
        assert "\n" not in str(e.value)


def test_unlabelled_files_that_are_held_out_images_are_refused(tmp_path):
    pool = _digits_folder(tmp_path / "data")
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for i, img in enumerate(pool[:4]):
        Image.fromarray(img).save(unl / f"{i}.png")
    val_file = sorted((tmp_path / "data" / "val" / "1").iterdir())[0]
    shutil.copy(val_file, unl / "renamed.png")
    with pytest.raises(ValueError, match=r"data.unlabeled_root: 1 of 5 unlabelled images are validation/test images too "
                                         r"\(e.g. .*renamed.png is .*val/1/.*\.png\); remove them") as e:
        ImageDataModule("imagefolder", root=str(tmp_path / "data"), img_size=8, batch_size=4,
                        unlabeled_root=str(unl)).setup()
    assert "\n" not in str(e.value)
    # data held in arrays (digits): the same pixels, whatever the file
    dm = ImageDataModule("digits")
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(noise / f"{i}.png")
    ImageDataModule("digits", unlabeled_root=str(noise)).setup()  # nothing held out in it: fine
    Image.fromarray(dm._digits["images"][dm._digits["val"][3]]).save(noise / "renamed.png")
    with pytest.raises(ValueError, match=r"1 of 5 unlabelled images are validation/test images too .*held-out image"):
        ImageDataModule("digits", unlabeled_root=str(noise)).setup()


# ------------------------------------------------------------------------- who reads the unlabelled images
def _batches_of(module, dm, **trainer_kwargs):
    """The labels of every training batch a fit of `module` on `dm` draws."""
    from conftest import make_trainer

    seen = []

    class Probe(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[1].clone())

    make_trainer(trainer_kwargs.pop("root"), callbacks=[Probe()], limit_val_batches=0, **trainer_kwargs).fit(module, dm)
    return torch.cat(seen)


def test_the_teacher_trains_on_the_labelled_images_alone_and_the_student_on_every_image(tmp_path):
    pool = _digits_folder(tmp_path / "data")
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for i, img in enumerate(pool):
        Image.fromarray(img).save(unl / f"{i}.png")
    data = dict(root=str(tmp_path / "data"), img_size=8, batch_size=6, unlabeled_root=str(unl), drop_last=False)
    dm = ImageDataModule("imagefolder", **data)
    folder_teacher = TeacherModule(**TINY_TEACHER)
    labels = _batches_of(folder_teacher, dm, root=tmp_path / "t", max_epochs=1)
    assert len(dm.train_set) == 18 and (labels >= 0).all() and len(labels) == 18  # no unlabelled image, ever
    # with held-back labels: exactly the kept images, none of the others
    dm = ImageDataModule("digits", labels_per_class=3, batch_size=10)
    teacher = TeacherModule(**TINY_TEACHER)
    labels = _batches_of(teacher, dm, root=tmp_path / "t2", max_epochs=1)
    kept = dm._labels_kept
    assert len(dm.train_set) == 30 and (labels >= 0).all() and len(labels) == 30
    raw = dm._raw_train()
    seen = {dm.train_set.labeled.images[j].tobytes() for j in dm.train_set.index}
    assert seen == {raw.images[j].tobytes() for j in np.flatnonzero(kept)}
    # the student reads every image when its loss has a teacher term, the labelled ones alone without one
    dm = ImageDataModule("imagefolder", **data)
    student = DistillModule(student=dict(TINY_STUDENT), teacher=folder_teacher.model, loss=DistillationLoss("hard"),
                            warmup_epochs=0)
    labels = _batches_of(student, dm, root=tmp_path / "s", max_epochs=1)
    assert len(dm.train_set) == 18 + len(pool) and (labels == -1).sum() == len(pool)
    dm = ImageDataModule("imagefolder", **data)
    alone = DistillModule(student=dict(TINY_STUDENT), teacher=folder_teacher.model, loss=DistillationLoss("none"),
                          warmup_epochs=0)
    labels = _batches_of(alone, dm, root=tmp_path / "n", max_epochs=1)
    assert len(dm.train_set) == 18 and (labels >= 0).all()


def test_a_student_with_other_labelled_images_than_its_teacher_is_refused(tmp_path, trainer_factory):
    from conftest import make_trainer

    def teacher_ckpt(name, **data):
        dm = ImageDataModule("digits", img_size=8, batch_size=32, **data)
        trainer = make_trainer(tmp_path / name, max_steps=1, limit_val_batches=0)
        trainer.fit(TeacherModule(**TINY_TEACHER), dm)
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
        return tmp_path / f"{name}.ckpt"

    def setup_student(teacher, **data):
        dm = ImageDataModule("digits", img_size=8, batch_size=32, **data)
        module = DistillModule(student=dict(TINY_STUDENT), teacher=str(teacher), warmup_epochs=0)
        trainer_factory(max_steps=1, limit_val_batches=0).fit(module, dm)

    five = teacher_ckpt("five", labels_per_class=5)
    setup_student(five, labels_per_class=5)  # the same labelled images: fine
    for data, theirs in ((dict(labels_per_class=6), "5"), (dict(), "5")):
        with pytest.raises(ValueError, match=rf"model.teacher was trained on other labelled images of this data than "
                                             rf"this student's \(its data.labels_per_class was {theirs}") as e:
            setup_student(five, **data)
        assert "\n" not in str(e.value)
    every = teacher_ckpt("every")  # a teacher that saw every label cannot teach a student that holds labels back
    with pytest.raises(ValueError, match=r"a teacher that saw labels the student holds back would fake the result"):
        setup_student(every, labels_per_class=5)


# ------------------------------------------------------------------------------------------ the loss
MODES = [("hard", {}), ("soft", dict(tau=2.0)), ("dkd", dict(tau=4.0)), ("dist", dict(tau=1.0))]


def _batch(b=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_cls, z_dist, z_t = (torch.randn(b, c, generator=g) for _ in range(3))
    y = torch.randint(0, c, (b,), generator=g)
    y[[1, 4, 5]] = -1
    return z_cls, z_dist, z_t * 3, y


@pytest.mark.parametrize("mode,kwargs", MODES)
def test_unlabelled_images_reach_the_distillation_term_and_not_the_ground_truth_term(mode, kwargs):
    z_cls, z_dist, z_t, y = _batch()
    labeled = y >= 0
    loss = DistillationLoss(mode, alpha=0.3, label_smoothing=0.1, **kwargs)
    s_cls, s_dist = z_cls.clone().requires_grad_(), z_dist.clone().requires_grad_()
    terms = loss((s_cls, s_dist), z_t, y)
    terms.total.backward()
    # the class head: the ground truth of the labelled images only, an independent cross-entropy
    ce = F.cross_entropy(z_cls[labeled], y[labeled], label_smoothing=0.1)
    torch.testing.assert_close(terms.ce, ce)
    assert (s_cls.grad[~labeled] == 0).all() and (s_cls.grad[labeled] != 0).any()
    # the distillation head: every image
    assert (s_dist.grad.abs().sum(-1) > 0).all()
    assert terms.labeled_fraction.item() == pytest.approx(5 / 8)
    # one head (no token): the unlabelled rows get exactly the distillation term's gradient
    one = z_cls.clone().requires_grad_()
    loss(one, z_t, y).total.backward()
    alone = z_cls.clone().requires_grad_()
    target = torch.where(labeled, y, z_t.argmax(-1))  # DKD's target class of an unlabelled image: the teacher's
    if mode == "dkd":
        d = dkd_distillation(alone, z_t, target, kwargs["tau"])
    else:
        d = DistillationLoss(mode, alpha=1.0, **kwargs)(alone, z_t, target).distill
    (0.3 * d).backward()
    torch.testing.assert_close(one.grad[~labeled], alone.grad[~labeled])


def test_ce_reduction_batch_sums_the_labelled_rows_over_the_batch_size():
    """`ce_reduction: batch`: the ground-truth term is the labelled rows' cross-entropy summed and divided by the
    batch size (an independent sum here), for class indices and for mixed soft targets; with every row
    labelled it is the usual mean, bit for bit, as with `labeled`; an unknown value is one line."""
    z_cls, z_dist, z_t, y = _batch()
    labeled = y >= 0
    rows = F.cross_entropy(z_cls[labeled], y[labeled], reduction="none", label_smoothing=0.1)
    batch = DistillationLoss("soft", alpha=0.3, label_smoothing=0.1, ce_reduction="batch")
    torch.testing.assert_close(batch((z_cls, z_dist), z_t, y).ce, rows.sum() / 8)
    soft = torch.zeros(8, 5)
    soft[labeled] = F.one_hot(y[labeled], 5).float()
    torch.testing.assert_close(batch((z_cls, z_dist), z_t, soft).ce, rows.new_tensor(
        F.cross_entropy(z_cls[labeled], soft[labeled], reduction="none", label_smoothing=0.1).sum() / 8))
    full = y.clamp(min=0)
    for target in (full, F.one_hot(full, 5).float()):
        assert torch.equal(batch((z_cls, z_dist), z_t, target).ce, F.cross_entropy(z_cls, target, label_smoothing=0.1))
    assert batch.config()["ce_reduction"] == "batch" and DistillationLoss().config()["ce_reduction"] == "labeled"
    with pytest.raises(ValueError, match="ce_reduction='mean' is unknown"):
        DistillationLoss("soft", ce_reduction="mean")


def test_a_batch_without_any_label_has_a_zero_ground_truth_term_never_nan():
    z_cls, z_dist, z_t, y = _batch()
    y[:] = -1
    for target in (y, torch.zeros(8, 5)):  # class indices, and soft targets of mixed unlabelled images
        s_cls, s_dist = z_cls.clone().requires_grad_(), z_dist.clone().requires_grad_()
        terms = DistillationLoss("soft", alpha=0.5, label_smoothing=0.1)((s_cls, s_dist), z_t, target)
        terms.total.backward()
        assert terms.ce.item() == 0.0 and torch.isfinite(terms.total) and terms.labeled_fraction.item() == 0.0
        assert torch.isfinite(s_cls.grad).all() and (s_cls.grad == 0).all() and (s_dist.grad != 0).any()


def test_mixed_images_keep_a_ground_truth_target_only_when_both_are_labelled():
    from timm.data import Mixup

    x = torch.randn(8, 3, 8, 8)
    y = torch.tensor([0, -1, -1, 3, 4, 1, 2, 1])  # images 1 and 2 are mixed with labelled 6 and 5
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        torch.manual_seed(0)
        np.random.seed(0)
        mixed_x, soft = UnlabeledMixup(Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0, num_classes=6),
                                       5)(x.clone(), y)
        partner = y.flip(0)  # timm's batch mode mixes image i with image B-1-i
        both = (y >= 0) & (partner >= 0)
        assert (soft[~both] == 0).all() and both.sum() == 4
        # the labelled pairs: timm's own target for the same draw, lam on one class and 1 - lam on the other
        torch.manual_seed(0)
        np.random.seed(0)
        ref_x, ref = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0, num_classes=5)(
            x.clone(), y.clamp(min=0))
        torch.testing.assert_close(mixed_x, ref_x)  # the images are timm's mix, unlabelled ones included
        torch.testing.assert_close(soft[both], ref[both])
        torch.testing.assert_close(soft[both].sum(-1), torch.ones(4))
        # and the loss reads those rows only
        z = torch.randn(8, 5)
        ce = -(ref[both] * z[both].log_softmax(-1)).sum(-1).mean()
        torch.testing.assert_close(DistillationLoss("none")(z, None, soft).ce, ce)


def test_the_student_step_logs_the_labelled_share_and_feeds_the_loss_labels_of_minus_one(tmp_path, trainer_factory):
    """A fit on digits with 3 labels a class, keyed views on the device and the teacher cache: every batch's
    labels are -1 where the label is held back, the loss gets them, and train/labeled_fraction is logged."""
    from conftest import make_trainer
    from lightning.pytorch.loggers import CSVLogger

    dm = ImageDataModule("digits", img_size=8, batch_size=64, labels_per_class=3, keyed_views=True, on_device=True)
    teacher_trainer = make_trainer(tmp_path / "t", max_steps=2, limit_val_batches=0)
    teacher_trainer.fit(TeacherModule(**TINY_TEACHER), ImageDataModule("digits", img_size=8, batch_size=10,
                                                                      labels_per_class=3))
    teacher_trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    probe = LossInputs()
    module = DistillModule(student=dict(TINY_STUDENT), teacher=str(tmp_path / "teacher.ckpt"), warmup_epochs=0,
                           loss=DistillationLoss("soft", alpha=0.5), teacher_cache=str(tmp_path / "cache"))
    trainer = trainer_factory(max_epochs=1, limit_train_batches=4, limit_val_batches=0, callbacks=[probe],
                              logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1)
    trainer.fit(module, dm)
    kept = dm.train_set.keep
    for (x, y, keys), call in zip(probe.batches, probe.calls):
        assert torch.equal(y, torch.where(torch.from_numpy(kept[keys[:, 0]]), y, -1))  # -1 exactly where held back
        assert torch.equal(call["target"], y) and (y == -1).any()
        assert call["terms"].labeled_fraction.item() == pytest.approx((y >= 0).float().mean().item())
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/labeled_fraction")]
    shares = [float(r["train/labeled_fraction"]) for r in rows]
    assert len(shares) == 4 and all(0 <= s < 0.2 for s in shares) and sum(shares) > 0


@pytest.mark.parametrize("form", ["feature_guidance", "ensemble"])
def test_feature_guidance_and_ensembles_learn_from_unlabelled_images(tmp_path, trainer_factory, form):
    """The student forms with extra parts read unlabelled images end to end: feature guidance (live teacher's
    feature maps on every image) and a two-teacher ensemble (the combination on every image), on digits with
    3 labels a class in batches a quarter labelled. The loss gets -1 where a label is held back, its
    ground-truth term is the labelled rows' cross-entropy and its distillation term covers every row."""
    from conftest import make_trainer
    from lightning.pytorch.loggers import CSVLogger

    from distill.teacher.ensemble import combine_logits

    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        t = make_trainer(tmp_path / f"t{seed}", max_steps=2, limit_val_batches=0)
        t.fit(TeacherModule(**TINY_TEACHER), ImageDataModule("digits", img_size=8, batch_size=10, labels_per_class=3))
        t.save_checkpoint(tmp_path / f"teacher{seed}.ckpt")
        teachers.append(str(tmp_path / f"teacher{seed}.ckpt"))
    if form == "feature_guidance":
        extra = dict(teacher=teachers[0],
                     feature_guidance=dict(student_blocks=[0], teacher_layers=["stages.0"], weight=2.5))
    else:
        extra = dict(teacher=teachers, teacher_combine="mean_probs")
    module = DistillModule(student=dict(TINY_STUDENT, distilled=False), warmup_epochs=0,
                           loss=DistillationLoss("soft", alpha=0.5), **extra)
    probe = LossInputs()
    dm = ImageDataModule("digits", img_size=8, batch_size=64, labels_per_class=3, labeled_fraction=0.25)
    trainer = trainer_factory(max_steps=3, limit_val_batches=0, callbacks=[probe], log_every_n_steps=1,
                              logger=CSVLogger(tmp_path / "log", name="", version=""))
    trainer.fit(module, dm)
    assert len(probe.calls) == 3
    for (x, y), call in zip(probe.batches, probe.calls):
        labelled = y >= 0
        assert labelled.float().mean().item() == 0.25 and torch.equal(call["target"], y)
        terms, student = call["terms"], call["student"]
        torch.testing.assert_close(terms.ce, F.cross_entropy(student[labelled], y[labelled]))
        teacher = call["teacher"]
        torch.testing.assert_close(terms.distill, F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                                                           reduction="batchmean", log_target=True))
        if form == "ensemble":
            with torch.no_grad():
                members = [m(x) for m in module.teacher.members]
            torch.testing.assert_close(teacher, combine_logits(members, "mean_probs"))
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "log" / "metrics.csv")) if r.get("train/loss")]
    assert len(rows) == 3
    for r in rows:
        mix = 0.5 * float(r["train/loss_ce"]) + 0.5 * float(r["train/loss_distill"])
        feature = float(r["train/loss_feature"]) if form == "feature_guidance" else 0.0
        assert feature >= 0 and float(r["train/loss"]) == pytest.approx(mix + 2.5 * feature, rel=1e-4)
        assert (feature > 0) == (form == "feature_guidance")


# ----------------------------------------------------------------------------- the labelled share of a batch
def test_every_batch_holds_the_labelled_share_asked_for_on_every_loader():
    """data.labeled_fraction 0.25 with 5 labels a class of digits (3.5% of the images): every batch of the host,
    keyed and on-device loaders holds 4 labelled images of 16; an epoch keeps its length; the order is the
    same for the same epoch, another for the next."""
    from distill.data.samplers import LabeledShare

    for extra in (dict(), dict(keyed_views=True), dict(keyed_views=True, on_device=True)):
        dm = ImageDataModule("digits", labels_per_class=5, labeled_fraction=0.25, batch_size=16, **extra)
        dm.setup()
        loader = dm.train_dataloader()
        batches = [b[1] for b in loader]
        assert len(batches) == len(loader) == len(dm.train_set) // 16, extra
        assert all(int((y >= 0).sum()) == 4 for y in batches), extra
    share = LabeledShare(np.arange(100) < 10, batch_size=10, fraction=0.3, seed=0)
    first, again, later = share.order(0), share.order(0), share.order(1)
    assert np.array_equal(first, again) and not np.array_equal(first, later) and len(first) == 100
    assert all((batch < 10).sum() == 3 for batch in first.reshape(-1, 10))
    # shuffled within each batch: mixup pairs image i with image B-1-i, so labelled ones must meet too
    assert len({tuple(np.flatnonzero(batch < 10)) for batch in first.reshape(-1, 10)}) > 1
    # two processes take every other batch of one order: disjoint batches, each with its share
    ranks = [share.order(0, r, 2).reshape(-1, 10) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and all((b < 10).sum() == 3 for r in ranks for b in r)
    with pytest.raises(ValueError, match="data.labeled_fraction=1.0 must lie strictly between 0 and 1"):
        ImageDataModule("digits", labels_per_class=5, labeled_fraction=1.0)
    with pytest.raises(ValueError, match="data.labeled_fraction needs unlabelled images"):
        ImageDataModule("digits", labeled_fraction=0.5)


def test_a_resumed_epoch_with_a_labelled_share_replays_the_rest_of_its_order():
    from distill.data.keyed_views import KeyedViews, ViewKeySampler
    from distill.data.samplers import LabeledShare

    dm = ImageDataModule("digits", labels_per_class=5, batch_size=16, keyed_views=True)
    dm.setup()
    share = LabeledShare(np.asarray(dm.train_set.targets) >= 0, 16, 0.5, seed=0)
    sampler = ViewKeySampler(KeyedViews(dm.train_set, 0), share=share)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.skip_once(3, 32)
    assert list(sampler) == whole[32:] and len(whole) == len(sampler)


def test_prepare_cifar10_lays_the_other_training_images_out_flat_without_their_class(tmp_path):
    """tools/prepare_cifar10.py: data/cifar10-unlabeled holds every training image that cifar10-small leaves out,
    as hard links in one flat folder named by a fixed shuffle (no name tells the class), the same each time."""
    from conftest import load_tool

    prepare = load_tool("prepare_cifar10")
    full = tmp_path / "cifar10-jpeg"
    for c in ("cat", "dog", "ship"):
        (full / "train" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((4, 4, 3), 20 * i + len(c), np.uint8)).save(full / "train" / c / f"{i:04d}.jpg")
    folder = prepare.unlabeled_rest(full, tmp_path, per_class=2)
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{k:05d}.jpg" for k in range(9)]
    sources = {f.stat().st_ino for c in ("cat", "dog", "ship") for f in (full / "train" / c).iterdir() if int(f.stem) >= 2}
    assert {f.stat().st_ino for f in files} == sources  # hard links to the 3 images per class past the first 2
    order = [f.stat().st_ino for f in files]
    shutil.rmtree(folder)
    prepare.unlabeled_rest(full, tmp_path, per_class=2)
    assert [f.stat().st_ino for f in sorted(folder.iterdir())] == order
    classes = [next(c for c in ("cat", "dog", "ship") if any(g.stat().st_ino == f.stat().st_ino
                                                               for g in (full / "train" / c).iterdir())) for f in files]
    assert classes != sorted(classes)  # shuffled: not class after class
