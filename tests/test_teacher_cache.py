"""Teacher-output cache: round trip against the live teacher, keyed views, stale caches refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill import DistillationLoss, DistillModule, ImageDataModule, build_teacher
from distill.data.keyed_views import KeyedViews
from distill.losses import soft_distillation
from distill.teacher.cache import (
    TeacherCache, TeacherCacheConfig, build_cache, cache_dir, reconstruct_logits, teacher_fields, weights_sha256,
    write_manifest,
)
from helpers.probes import LossInputs

STUDENT = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0)


def tiny_teacher(seed: int = 0, in_chans: int = 3, num_classes: int = 10):
    torch.manual_seed(seed)
    return build_teacher("cifar_resnet10", num_classes, in_chans=in_chans, img_size=8, base_width=8).eval()


def batches_of(n_batches: int = 3, b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        keys = np.stack([np.arange(i * b, (i + 1) * b), np.zeros(b, dtype=np.int64)], 1)
        out.append((torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g), keys))
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_full_logits_round_trip_equals_live_teacher(tmp_path, world_size):
    teacher, data = tiny_teacher(), batches_of()
    with torch.no_grad():
        live = torch.cat([teacher(x) for x, _, _ in data])
    for rank in range(world_size):  # each process writes its own shard
        build_cache(tmp_path, teacher, data, num_samples=24, num_classes=10, topk=None, dtype="float32",
                    rank=rank, world_size=world_size)
    write_manifest(tmp_path, {}, num_samples=24, num_classes=10, topk=None, dtype="float32",
                   world_size=world_size)
    cache = TeacherCache(tmp_path)
    keys = np.stack([np.arange(24)[::-1], np.zeros(24, dtype=np.int64)], 1)  # any order, any shard
    torch.testing.assert_close(cache.logits(keys), live.flip(0), rtol=0, atol=0)
    cache.verify(cache.logits(keys), live.flip(0))


def test_topk_round_trip_keeps_topk_probabilities(tmp_path):
    teacher, data = tiny_teacher(), batches_of()
    with torch.no_grad():
        live = torch.cat([teacher(x) for x, _, _ in data]) * 3  # sharper than an untrained net
    build_cache(tmp_path, lambda x: teacher(x) * 3, data, num_samples=24, num_classes=10, topk=3, dtype="float16",
                manifest={"teacher": {}})
    cache = TeacherCache(tmp_path)
    assert np.load(tmp_path / "view-00000" / "shard-0000-of-0001.indices.npy").dtype == np.int16
    keys = np.stack([np.arange(24), np.zeros(24, dtype=np.int64)], 1)
    z = cache.logits(keys)
    assert torch.equal(z.argmax(-1), live.argmax(-1))  # hard distillation is exact
    top = live.topk(3, dim=-1)
    p_live, p_cache = live.softmax(-1), z.softmax(-1)
    torch.testing.assert_close(p_cache.gather(1, top.indices), p_live.gather(1, top.indices), rtol=5e-3, atol=1e-3)
    torch.testing.assert_close(z.logsumexp(-1), live.logsumexp(-1), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(p_cache.sum(-1), torch.ones(24))
    cache.verify(z, live)


def test_reconstruct_is_finite_when_topk_holds_all_the_mass():
    idx = torch.tensor([[0, 1]])
    z = reconstruct_logits(idx, torch.tensor([[100.0, 0.0]]), torch.tensor([100.0]), num_classes=5)
    assert torch.isfinite(z).all() and z.argmax() == 0


def test_keyed_views_replay_bit_identically():
    dm = ImageDataModule("digits", img_size=8, crop="pad", hflip=0.5, re_prob=0.5)
    dm.setup("fit")
    views = KeyedViews(dm.train_set, seed=3)
    n = len(views)
    a = views[2 * n + 5]
    torch.manual_seed(123)  # the global RNG state does not matter ...
    b = views[2 * n + 5]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2].tolist() == [5, 2]
    state = torch.get_rng_state()
    views[7]
    assert torch.equal(state, torch.get_rng_state())  # ... and is not changed
    # another view of the same image is another augmentation (with these settings, almost surely)
    assert any(not torch.equal(views[v * n + 5][0], a[0]) for v in range(3))


# ------------------------------------------------------------------------------ DistillModule glue
def _fit(trainer_factory, cache_dir, teacher, **data_kwargs):
    kwargs = dict(img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True, view_epochs=1)
    kwargs.update(data_kwargs)
    dm = ImageDataModule("digits", **kwargs)
    module = DistillModule(student=dict(STUDENT), teacher=teacher, warmup_epochs=0,
                           teacher_cache=TeacherCacheConfig(dir=str(cache_dir), topk=5, verify_batches=2))
    trainer = trainer_factory(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, dm)
    return module, dm, trainer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache built by DistillModule at fit start (digits, pad crop + flip, top-5 float16)."""
    from conftest import make_trainer

    root = tmp_path_factory.mktemp("cache")
    teacher = tiny_teacher(in_chans=1)
    factory = lambda **kw: make_trainer(root, **kw)  # noqa: E731
    module, dm, trainer = _fit(factory, root / "cache", teacher)
    return dict(dir=root / "cache", teacher=teacher, module=module, dm=dm, trainer=trainer)


def test_every_fit_meets_the_others_at_the_manifest_barrier_whether_it_found_the_manifest_or_not(
        built, trainer_factory, monkeypatch):
    """Under DDP a rank that looks for the manifest after rank 0 wrote it must still call the barrier the other
    ranks wait in (a skipped barrier hung the DDP cache test under load): a fit on an existing cache calls it too."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    names: list = []
    barrier = SingleDeviceStrategy.barrier
    monkeypatch.setattr(SingleDeviceStrategy, "barrier",
                        lambda self, name=None: (names.append(name), barrier(self, name))[1])
    _fit(trainer_factory, built["dir"], built["teacher"])  # the manifest exists
    assert "teacher_cache_manifest" in names, names


def test_module_builds_cache_that_matches_live_teacher_on_replayed_views(built):
    cache = TeacherCache(built["dir"])
    m = cache.manifest
    assert (m["topk"], m["dtype"], m["num_samples"]) == (5, "float16", len(built["dm"].train_set))
    assert cache.built_views() == [0]  # view_epochs 1: the one view, built when the first epoch read it
    assert "RandomCrop" in m["transform"] and m["teacher"]["weights_sha256"] == weights_sha256(tiny_teacher(in_chans=1))
    module, dm = built["module"], built["dm"]
    assert module.teacher.cache is not None and module.teacher.cache.to_verify == 0  # checked, then used
    views = KeyedViews(dm.train_set, dm.hparams.seed)
    items = [views[i] for i in (0, 17, 400, len(views) - 1)]
    x = torch.stack([it[0] for it in items])
    keys = np.stack([it[2] for it in items])
    live = module.teacher(x).float()
    z = cache.logits(keys)
    assert torch.equal(z.argmax(-1), live.argmax(-1))
    top = z.topk(5, dim=-1).indices
    torch.testing.assert_close(z.gather(1, top), live.gather(1, top), rtol=2e-3, atol=2e-3)


def test_training_batches_carry_keys_and_old_batches_still_work(built, trainer_factory):
    batch = next(iter(built["dm"].train_dataloader()))
    assert len(batch) == 3 and isinstance(batch[2], np.ndarray) and batch[2].shape == (64, 2)
    # without the cache, (x, y) batches are unchanged
    dm = ImageDataModule("digits", img_size=8, batch_size=64)
    module = DistillModule(student=dict(STUDENT), teacher=built["teacher"], warmup_epochs=0)
    trainer_factory(max_steps=2, limit_val_batches=0).fit(module, dm)
    assert module.teacher.cache is None


def test_the_loss_gets_the_stored_logits_during_and_after_verification(built, trainer_factory):
    """The cache feeds the loss: at every step, verified or not, the teacher logits handed to the loss
    are the cache's rows of the batch's views (float16, top-5 rebuilt), not the live teacher's."""
    dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True, view_epochs=1)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           teacher_cache=TeacherCacheConfig(dir=str(built["dir"]), topk=5, verify_batches=1))
    seen = LossInputs()
    trainer_factory(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[seen]).fit(module, dm)
    assert module.teacher.cache.to_verify == 0 and len(seen.calls) == len(seen.batches) == 3
    cache = TeacherCache(built["dir"])
    for step, (call, (x, _, keys)) in enumerate(zip(seen.calls, seen.batches)):
        assert torch.equal(call["teacher"], cache.logits(keys)), f"step {step}: the loss did not get the stored logits"
        # ... which are not the live teacher's (a live forward has no rebuilt tail of the top 5)
        assert not torch.equal(call["teacher"], module.teacher(x).float()), step


def test_build_false_refuses_an_empty_directory_and_reads_a_built_cache(built, trainer_factory, tmp_path):
    def fit(directory):
        dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True,
                             view_epochs=1)
        module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                               teacher_cache=TeacherCacheConfig(dir=str(directory), topk=5, build=False))
        trainer_factory(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, dm)
        return module

    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match=f"model.teacher_cache: '{empty}' holds no cache and build is false"):
        fit(empty)
    assert not empty.exists()  # nothing built
    before = sorted((p.name, p.stat().st_mtime_ns) for p in built["dir"].iterdir())
    assert fit(built["dir"]).teacher.cache is not None  # a built cache is read ...
    assert sorted((p.name, p.stat().st_mtime_ns) for p in built["dir"].iterdir()) == before  # ... not rebuilt


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(teacher_seed=1), "teacher differs"),
        (dict(hflip=0.0), "transforms differ"),
        (dict(seed=1), "data differs"),
    ],
)
def test_stale_cache_is_refused(built, trainer_factory, change, match):
    change = dict(change)
    teacher = tiny_teacher(seed=change.pop("teacher_seed", 0), in_chans=1)
    with pytest.raises(ValueError, match=match):
        _fit(trainer_factory, built["dir"], teacher, **change)


@pytest.mark.parametrize("tamper", ["sign", "one_percent", "none"])
def test_cache_that_disagrees_with_live_teacher_is_refused(built, trainer_factory, tmp_path, tamper):
    """Same manifest, other numbers: logits of the other sign, or 1% off (10 times float16's rounding,
    so more than its storage explains), are refused; the stored numbers as they are pass."""
    import shutil

    copy_dir = tmp_path / "tampered"
    shutil.copytree(built["dir"], copy_dir)
    values = np.load(copy_dir / "view-00000" / "shard-0000-of-0001.values.npy", mmap_mode="r+")
    if tamper == "sign":
        values[:] = -values[:]
    elif tamper == "one_percent":
        values[:] = values[:] * np.float16(1.01)
    values.flush()
    if tamper == "none":
        module = _fit(trainer_factory, copy_dir, tiny_teacher(in_chans=1))[0]
        assert module.teacher.cache.to_verify == 0  # verified against the live teacher, and accepted
        return
    with pytest.raises(ValueError, match="disagrees with the live teacher"):
        _fit(trainer_factory, copy_dir, tiny_teacher(in_chans=1))


def _float32_cache(directory, live: torch.Tensor, precision: str) -> TeacherCache:
    keys = np.stack([np.arange(len(live)), np.zeros(len(live), dtype=np.int64)], 1)
    build_cache(directory, lambda x: x, [(live, None, keys)], num_samples=len(live), num_classes=live.shape[1],
                topk=None, dtype="float32")
    write_manifest(directory, {"precision": precision}, num_samples=len(live), num_classes=live.shape[1],
                   topk=None, dtype="float32", world_size=1)
    return TeacherCache(directory)


def test_a_float32_cache_one_percent_off_is_refused_unless_a_16_bit_pass_explains_it(tmp_path):
    """Verification's tolerance follows the precision: a float32 cache of a float32 run must match the
    live teacher to float32 rounding (1% noise is refused), while a 16-bit pass on either side allows for
    bfloat16's rounding (~0.4% a step, so 1% passes)."""
    g = torch.Generator().manual_seed(0)
    live = torch.randn(64, 10, generator=g) * 3
    noisy = live * (1 + 0.01 * torch.randn(live.shape, generator=g))
    cache = _float32_cache(tmp_path / "f32", live, "32-true")
    keys = np.stack([np.arange(64), np.zeros(64, dtype=np.int64)], 1)
    cache.verify(cache.logits(keys), live, "32-true")  # its own numbers pass
    with pytest.raises(ValueError, match="disagrees with the live teacher"):
        cache.verify(noisy, live, "32-true")
    cache.verify(noisy, live, "32-true, teacher bfloat16")  # the live pass in bfloat16
    _float32_cache(tmp_path / "bf16", live, "bf16-mixed").verify(noisy, live, "32-true")  # built in bf16


def test_cache_refuses_mixup_and_unkeyed_data(built, trainer_factory):
    with pytest.raises(ValueError, match="mixup"):
        _fit(trainer_factory, built["dir"], tiny_teacher(in_chans=1), mixup=0.8)
    with pytest.raises(ValueError, match="keyed_views"):
        _fit(trainer_factory, built["dir"], tiny_teacher(in_chans=1), keyed_views=False)


def test_manifest_teacher_fields_and_config_in_hparams(built):
    hp = built["module"].hparams
    assert hp["teacher_cache"]["dir"] == str(built["dir"]) and hp["teacher_cache"]["topk"] == 5
    fields = teacher_fields({"weights_sha256": "x"}, torch.nn.Identity())
    assert fields["input"]["mean"] is None and json.dumps(fields)


# ------------------------------------------------------------------------ soft losses need all logits
def test_topk_tail_breaks_the_soft_loss_at_tau_3():
    """Why a top-k cache is refused for soft losses: with 1,000 classes and k = 10 the rebuilt
    distribution is exact for the argmax, not for the KL at a temperature."""
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(64, 1000, generator=g) * 3, torch.randn(64, 1000, generator=g) * 3
    top = z_t.topk(10, dim=-1)
    rebuilt = reconstruct_logits(top.indices, top.values, torch.logsumexp(z_t, -1), 1000)
    assert torch.equal(rebuilt.argmax(-1), z_t.argmax(-1))
    live = soft_distillation(z_s, z_t, tau=3.0)
    assert abs(float(soft_distillation(z_s, rebuilt, tau=3.0)) / float(live) - 1) > 0.05


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_from_the_cache_matches_the_live_teacher(trainer_factory, tmp_path, tau):
    dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True, view_epochs=1)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           loss=DistillationLoss("soft", alpha=0.5, tau=tau),
                           teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache")))  # topk: auto
    trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
    cache = TeacherCache(tmp_path / "cache")
    assert cache.manifest["topk"] is None  # auto: all logits for a soft loss
    views = KeyedViews(dm.train_set, dm.hparams.seed)
    items = [views[i] for i in range(0, len(views), 7)]
    x, keys = torch.stack([it[0] for it in items]), np.stack([it[2] for it in items])
    z_s = torch.randn(len(items), 10, generator=torch.Generator().manual_seed(1)) * 2
    live = soft_distillation(z_s, module.teacher(x).float(), tau=tau)
    cached = soft_distillation(z_s, cache.logits(keys), tau=tau)
    assert float(cached) == pytest.approx(float(live), rel=0.01)


def test_soft_distillation_with_a_topk_cache_is_refused(trainer_factory, tmp_path):
    dm = ImageDataModule("digits", img_size=8, batch_size=64, keyed_views=True, view_epochs=1)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           loss=DistillationLoss("soft", tau=3.0),
                           teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"), topk=5))
    with pytest.raises(ValueError, match="teacher_cache.topk=5 .* hard distillation only"):
        trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_cache_next_to_its_teacher_and_shared_by_hard_and_soft_when_k_covers_every_class(
        trainer_factory, tiny_teacher_ckpt, tmp_path):
    """`{teacher_dir}` puts the cache in the teacher's run folder; with 10 classes, hard distillation's
    top-10 is every logit, so a soft run reads the cache a hard run built."""
    import shutil

    run = tmp_path / "teacher_run"
    (run / "checkpoints").mkdir(parents=True)
    teacher = run / "checkpoints" / "best.ckpt"
    shutil.copy(tiny_teacher_ckpt, teacher)
    cfg = TeacherCacheConfig(dir="{teacher_dir}/cache")
    for mode in ("hard", "soft"):
        dm = ImageDataModule("digits", img_size=8, batch_size=64, keyed_views=True, view_epochs=1)
        module = DistillModule(student=dict(STUDENT), teacher=str(teacher), warmup_epochs=0,
                               loss=DistillationLoss(mode, tau=3.0), teacher_cache=cfg)
        trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
        assert module.teacher.cache is not None
    assert TeacherCache(run / "cache").manifest["topk"] is None


def test_teacher_dir_of_a_hub_or_local_dir_teacher_is_a_folder_of_its_own(tmp_path, monkeypatch):
    """`{teacher_dir}` of `local-dir:PATH` is PATH (the folder holding the teacher, as a run folder holds its
    checkpoints); of `hf-hub:ORG/NAME[@REV]` it is `hf-hub/ORG/NAME[@REV]` in the working directory, so two
    teachers of one owner, or two revisions, never share a cache (the Hub's own cache is left alone)."""
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    cfg = TeacherCacheConfig(dir="{teacher_dir}/cache")
    of = lambda path: cache_dir(cfg, SimpleNamespace(identity=dict(path=path)))  # noqa: E731
    assert of("hf-hub:me/digits-teacher") == tmp_path / "hf-hub" / "me" / "digits-teacher" / "cache"
    assert of("hf-hub:me/other-teacher") == tmp_path / "hf-hub" / "me" / "other-teacher" / "cache"
    assert of("hf-hub:me/digits-teacher@v2") == tmp_path / "hf-hub" / "me" / "digits-teacher@v2" / "cache"
    assert of("hf_hub:me/digits-teacher") == of("hf-hub:me/digits-teacher")  # timm's older spelling
    folder = tmp_path / "exports" / "teacher"
    assert of(f"local-dir:{folder}") == folder / "cache"
    assert of("local-dir:exports/teacher") == folder / "cache"
    assert of(str(tmp_path / "run" / "checkpoints" / "best.ckpt")) == tmp_path / "run" / "cache"  # a run's file


def _twelve_class_fit(trainer_factory, cache_dir, mode: str, teacher):
    dm = ImageDataModule("synthetic", img_size=8, batch_size=16, num_samples=80, num_classes_synthetic=12,
                         in_chans_synthetic=1, keyed_views=True, view_epochs=1)
    module = DistillModule(student=dict(STUDENT), teacher=teacher, warmup_epochs=0,
                           loss=DistillationLoss(mode, tau=3.0), teacher_cache=TeacherCacheConfig(dir=str(cache_dir)))
    trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
    return module


def test_a_topk_cache_built_by_a_hard_run_is_refused_by_a_soft_run(trainer_factory, tmp_path):
    """12 classes: a hard run builds the shared cache with the top 10 logits (topk auto); a soft run on
    the same folder would read logits rebuilt with a uniform tail, so it is refused in one line. A cache
    of every logit (built by the soft run elsewhere) serves a later hard run."""
    teacher = tiny_teacher(in_chans=1, num_classes=12)
    _twelve_class_fit(trainer_factory, tmp_path / "shared", "hard", teacher)
    assert TeacherCache(tmp_path / "shared").manifest["topk"] == 10
    with pytest.raises(ValueError, match=r"holds only the top 10 of 12 logits .*reads the whole distribution") as e:
        _twelve_class_fit(trainer_factory, tmp_path / "shared", "soft", teacher)
    assert "\n" not in str(e.value)
    _twelve_class_fit(trainer_factory, tmp_path / "full", "soft", teacher)
    assert TeacherCache(tmp_path / "full").manifest["topk"] is None
    module = _twelve_class_fit(trainer_factory, tmp_path / "full", "hard", teacher)  # every logit serves argmax too
    assert module.teacher.cache is not None and module.teacher.cache.cache.dir == tmp_path / "full"


def test_a_second_fit_with_other_data_checks_the_cache_again(trainer_factory, tmp_path):
    """The cache is opened and checked at every fit: a second `trainer.fit` of the same module with
    another datamodule (other data behind the same keys) is refused instead of reading stale logits."""
    kwargs = dict(img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True, view_epochs=1)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache")))
    trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, ImageDataModule("digits", **kwargs))
    first = module.teacher.cache
    with pytest.raises(ValueError, match="data differs"):
        trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
            module, ImageDataModule("digits", seed=1, **kwargs))
    # the same data again: opened anew and verified again against the live teacher
    trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, ImageDataModule("digits", **kwargs))
    assert module.teacher.cache is not first and module.teacher.cache.to_verify == 0


def test_two_processes_starting_together_build_the_shared_cache_once(tmp_path):
    """Two runs of a study start at the same time on one `{teacher_dir}/cache`: one builds it (slowly
    here), the other waits for it and reads it; neither writes over the other's shard."""
    import multiprocessing
    import time

    import distill.teacher.cache_views as tc  # where views are built while training
    from conftest import make_trainer

    builds = tmp_path / "builds.txt"
    real_build = tc.build_cache

    def slow_build(*args, **kwargs):
        with open(builds, "a") as f:
            f.write("build\n")
        time.sleep(1.0)  # the other process arrives meanwhile
        return real_build(*args, **kwargs)

    def run(i, queue):
        tc.build_cache = slow_build
        torch.set_num_threads(1)
        try:
            dm = ImageDataModule("digits", img_size=8, batch_size=64, keyed_views=True, view_epochs=1)
            module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                                   teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache")))
            make_trainer(tmp_path / f"run{i}", max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
            queue.put((i, module.teacher.cache is not None and module.teacher.cache.to_verify == 0))
        except Exception as e:  # noqa: BLE001
            queue.put((i, repr(e)))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=run, args=(i, queue)) for i in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == {0: True, 1: True}
    assert builds.read_text().count("build") == 1


def test_a_wait_for_another_build_of_the_same_shard_is_bounded_when_asked(tmp_path, monkeypatch):
    """With DISTILL_CACHE_LOCK_TIMEOUT set, a process waiting for the lock on a shard another process
    (here another open of the same file) is building gives up after that long, naming the holder; the
    lock of another shard is free, and the lock is free again once released."""
    import os
    import time

    from distill.teacher.cache import _build_lock

    monkeypatch.setenv("DISTILL_CACHE_LOCK_TIMEOUT", "0.5")
    with _build_lock(tmp_path, 0):
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=f"waited 0.5 s .* for process {os.getpid()} to finish building shard 0"):
            with _build_lock(tmp_path, 0):
                pass
        assert 0.5 <= time.monotonic() - start < 5
        with _build_lock(tmp_path, 1):  # another rank's shard
            pass
    with _build_lock(tmp_path, 0):  # released
        pass


def test_a_bfloat16_teacher_builds_and_verifies_its_cache(trainer_factory, tmp_path):
    """`teacher_dtype: bfloat16` on a float32 run (2x faster teacher forwards on CPUs with avx512_bf16):
    the manifest says the logits were computed in bfloat16, and verification allows for its rounding."""
    dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True, view_epochs=1)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           teacher_dtype="bfloat16", teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"),
                                                                                      verify_batches=3))
    trainer_factory(max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(module, dm)
    manifest = TeacherCache(tmp_path / "cache").manifest
    assert manifest["precision"] == "32-true, teacher bfloat16"
    assert module.teacher.cache.to_verify == 0 and module.teacher.cache.precision == "32-true, teacher bfloat16"
    # the teacher is identified by its float32 weights (the file's), not by the bfloat16 copy it runs as
    assert manifest["teacher"]["weights_sha256"] == weights_sha256(tiny_teacher(in_chans=1))
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}


def test_views_are_built_when_an_epoch_first_reads_them_and_kept_for_later_runs(trainer_factory, tmp_path, monkeypatch):
    """A new view every epoch (data.view_epochs unset): each epoch builds its view when it starts, and a
    longer run on the same cache builds only the views past the shorter run's; what it reads for the new
    view is the live teacher's output on that view."""
    import distill.teacher.cache_views as tc  # where views are built while training

    built_views = []
    real = tc.build_cache
    monkeypatch.setattr(tc, "build_cache", lambda *a, **kw: (built_views.append(list(kw["views"])), real(*a, **kw))[1])
    teacher = tiny_teacher(in_chans=1)

    def fit(epochs):
        dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True)
        module = DistillModule(student=dict(STUDENT), teacher=teacher, warmup_epochs=0,
                               teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"), verify_batches=1))
        trainer_factory(max_epochs=epochs, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
        return module, dm

    fit(2)
    assert built_views == [[0], [1]] and TeacherCache(tmp_path / "cache").built_views() == [0, 1]
    module, dm = fit(3)
    assert built_views == [[0], [1], [2]] and TeacherCache(tmp_path / "cache").built_views() == [0, 1, 2]
    views = KeyedViews(dm.train_set, dm.hparams.seed)
    items = [views[2 * len(views) + i] for i in (0, 9, len(views) - 1)]
    live = module.teacher(torch.stack([it[0] for it in items])).float()
    z = TeacherCache(tmp_path / "cache").logits(np.stack([it[2] for it in items]))
    assert torch.equal(z.argmax(-1), live.argmax(-1))
    with pytest.raises(ValueError, match=r"holds no view 7 yet \(built: 0-2\)"):
        TeacherCache(tmp_path / "cache").logits(np.array([[0, 7]]))


def test_a_cache_of_the_former_format_is_refused_in_one_line(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"format": 1, "views": 3}))
    with pytest.raises(ValueError, match=r"has format 1, this version reads 2; delete it to rebuild") as e:
        TeacherCache(tmp_path / "cache")
    assert "\n" not in str(e.value)


def test_a_cache_of_another_precision_is_refused_naming_both(trainer_factory, tmp_path):
    """A cache built by a bfloat16 teacher must not serve a float32 run (its logits differ by the rounding
    of a 16-bit pass, enough to flip near-ties): refused in one line naming both precisions, not blamed on
    the teacher, data or transforms; the run's own precision reads it."""
    def fit(teacher_dtype):
        dm = ImageDataModule("digits", img_size=8, batch_size=64, keyed_views=True, view_epochs=1)
        module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                               teacher_dtype=teacher_dtype,
                               teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache")))
        trainer_factory(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, dm)
        return module

    fit("bfloat16")
    with pytest.raises(ValueError, match=r"computed in 32-true, teacher bfloat16 and this run computes them in "
                                         r"32-true; .*model.teacher_cache.dir") as e:
        fit("float32")
    assert "\n" not in str(e.value) and "teacher, data or transforms" not in str(e.value)
    assert fit("bfloat16").teacher.cache is not None


# ------------------------------------------------------------------------- views built ahead of their epoch
def _fit_counting_builds(trainer_factory, cache, build_ahead, monkeypatch, limit, on_device=False, **cfg):
    """A student with drop path (so that a stray draw from the global random generator changes its weights)
    trained for 3 epochs of 3 batches (`limit`: as max_steps or max_epochs), a new view every epoch; returns it
    and the (view, thread name) of every build."""
    import threading

    import distill.teacher.cache_views as tc
    import lightning as L

    from distill.teacher.cache import build_cache as real, view_done

    builds, ready_at_epoch_end = [], []

    def counted(*a, **kw):
        builds.append((kw["views"][0], threading.current_thread().name))
        return real(*a, **kw)

    monkeypatch.setattr(tc, "build_cache", counted)

    class NextViewReady(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            builder = module.teacher.cache.build_view
            builder.wait_ahead()
            ready_at_epoch_end.append(view_done(cache, trainer.current_epoch + 1, 0, 1))

    L.seed_everything(0)
    dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", hflip=0.5, keyed_views=True,
                         on_device=on_device)
    module = DistillModule(student=dict(STUDENT, depth=2, drop_path_rate=0.2), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           teacher_cache=TeacherCacheConfig(dir=str(cache), verify_batches=1, build_ahead=build_ahead,
                                                            **cfg))
    trainer_factory(**{limit: 9 if limit == "max_steps" else 3}, limit_train_batches=3, limit_val_batches=0,
                    callbacks=[NextViewReady()]).fit(module, dm)
    return module, builds, ready_at_epoch_end


@pytest.mark.parametrize("limit, on_device", [("max_steps", False), ("max_epochs", False), ("max_steps", True)],
                         ids=["max_steps", "max_epochs", "on_device"])
def test_the_next_view_is_built_ahead_on_a_thread_and_the_training_is_the_same(trainer_factory, tmp_path, monkeypatch,
                                                                               limit, on_device):
    """build_ahead: while epoch e trains, a background thread builds view e + 1 (ready when the epoch ends), and
    none past the last epoch; the views it builds and the student it trains are bit for bit those of a run
    that builds each view when its epoch starts (the thread leaves the training's random draws alone)."""
    from distill.teacher.cache import view_dir

    plain, plain_builds, plain_ready = _fit_counting_builds(trainer_factory, tmp_path / "plain", False, monkeypatch, limit,
                                                            on_device)
    ahead, ahead_builds, ahead_ready = _fit_counting_builds(trainer_factory, tmp_path / "ahead", True, monkeypatch, limit,
                                                            on_device)
    assert plain_builds == [(0, "MainThread"), (1, "MainThread"), (2, "MainThread")]
    assert plain_ready == [False, False, False]
    assert ahead_builds == [(0, "MainThread"), (1, "teacher-cache-view-1"), (2, "teacher-cache-view-2")]
    assert ahead_ready == [True, True, False]  # 3 epochs (9 steps): no view 3
    for view in range(3):
        a, b = (np.load(view_dir(tmp_path / run, view) / "shard-0000-of-0001.values.npy") for run in ("plain", "ahead"))
        assert np.array_equal(a, b), view
    for (name, a), b in zip(plain.student.state_dict().items(), ahead.student.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_error_in_the_build_ahead_is_raised_by_the_epoch_that_needs_the_view(trainer_factory, tmp_path, monkeypatch):
    import distill.teacher.cache_views as tc

    real = tc.build_cache

    def fails_ahead(*a, **kw):
        if kw["views"][0] == 1:
            raise OSError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(tc, "build_cache", fails_ahead)
    dm = ImageDataModule("digits", img_size=8, batch_size=64, keyed_views=True)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"), build_ahead=True))
    with pytest.raises(RuntimeError, match="building a view ahead failed: disk full"):
        trainer_factory(max_epochs=3, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
    assert TeacherCache(tmp_path / "cache").built_views() == [0]  # view 1 has a folder but no shard marked done
    assert not TeacherCache(tmp_path / "cache").has_view(1)


def test_build_ahead_auto_is_on_for_a_cpu_teacher_with_an_idle_core_only(monkeypatch):
    import os

    from distill.teacher.cache_views import resolve_build_ahead

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert resolve_build_ahead("auto", "cpu") is True
    assert resolve_build_ahead("auto", "cuda:0") is False
    assert resolve_build_ahead(False, "cpu") is False and resolve_build_ahead(True, "cuda:0") is True
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert resolve_build_ahead("auto", "cpu") is False
    with pytest.raises(ValueError, match=r"model.teacher_cache.build_ahead='yes': expected true, false or auto"):
        resolve_build_ahead("yes", "cpu")


def test_a_view_built_ahead_for_an_epoch_that_never_runs_stops_with_the_fit(trainer_factory, tmp_path, monkeypatch):
    """Early stopping ends the fit while view 1 is being built ahead: the thread stops with the fit (none
    outlives it), view 1 is left unmarked, and the next fit that reads it builds it."""
    import threading
    import time

    import distill.teacher.cache_views as tc
    import lightning as L

    from distill.teacher.cache import build_cache as real

    def slow(directory, teacher_fn, *a, **kw):
        return real(directory, lambda x: (time.sleep(0.2), teacher_fn(x))[1], *a, **kw)

    monkeypatch.setattr(tc, "build_cache", slow)

    class StopAfterOneEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    def fit(epochs, callbacks):
        dm = ImageDataModule("digits", img_size=8, batch_size=64, keyed_views=True)
        module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                               teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"), build_ahead=True))
        trainer_factory(max_epochs=epochs, min_epochs=0, limit_train_batches=2, limit_val_batches=0,
                        callbacks=callbacks).fit(module, dm)

    fit(3, [StopAfterOneEpoch()])
    assert not [t.name for t in threading.enumerate() if t.name.startswith("teacher-cache-view")]
    assert TeacherCache(tmp_path / "cache").built_views() == [0]
    fit(2, [])
    assert TeacherCache(tmp_path / "cache").built_views() == [0, 1]


def test_a_view_built_ahead_stops_when_the_fit_fails(trainer_factory, tmp_path, monkeypatch):
    """An error ends the fit while view 1 is being built ahead: the thread stops before the error reaches the
    caller (a daemon thread still running the teacher when the interpreter exits aborts the process:
    "terminate called without an active exception"), and view 1 is left unmarked."""
    import threading
    import time

    import distill.teacher.cache_views as tc
    import lightning as L

    from distill.teacher.cache import build_cache as real

    def slow(directory, teacher_fn, *a, **kw):
        return real(directory, lambda x: (time.sleep(0.2), teacher_fn(x))[1], *a, **kw)

    monkeypatch.setattr(tc, "build_cache", slow)

    class FailAtTheFirstEpochEnd(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            raise RuntimeError("boom")

    dm = ImageDataModule("digits", img_size=8, batch_size=64, keyed_views=True)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"), build_ahead=True))
    trainer = trainer_factory(max_epochs=3, limit_train_batches=2, limit_val_batches=0,
                              callbacks=[FailAtTheFirstEpochEnd()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, dm)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("teacher-cache-view")]
    assert TeacherCache(tmp_path / "cache").built_views() == [0]


def test_the_workers_of_a_view_built_ahead_start_in_the_main_thread_before_it_takes_the_lock(
        trainer_factory, tmp_path, monkeypatch):
    """Forked from the background thread, a worker could inherit a lock the training thread holds and hang; and
    forked under the view's file lock it would hold that lock after its parent was killed, so that the resumed
    run waited for it forever (seen: a kill -9 test timing out). The ahead build's loader starts its workers in
    the main thread, and they are running before the thread takes the lock."""
    import multiprocessing
    import threading

    import distill.teacher.cache_views as tc
    from torch.utils.data import DataLoader

    started_by, children_at_lock = [], []
    real_iter, real_lock = DataLoader.__iter__, tc._build_lock

    def recorded_iter(self):
        if isinstance(self.dataset, KeyedViews) and isinstance(self.sampler, list):  # a view's loader, not training's
            started_by.append((threading.current_thread().name, self.num_workers))
        return real_iter(self)

    def recorded_lock(directory, rank):
        if threading.current_thread().name.startswith("teacher-cache-view"):
            children_at_lock.append(len(multiprocessing.active_children()))
        return real_lock(directory, rank)

    monkeypatch.setattr(DataLoader, "__iter__", recorded_iter)
    monkeypatch.setattr(tc, "_build_lock", recorded_lock)
    dm = ImageDataModule("digits", img_size=8, batch_size=64, crop="pad", keyed_views=True)
    module = DistillModule(student=dict(STUDENT), teacher=tiny_teacher(in_chans=1), warmup_epochs=0,
                           teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"), build_ahead=True))
    trainer_factory(max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(module, dm)
    assert started_by == [("MainThread", 0), ("MainThread", 1)]  # view 0 when epoch 0 starts, view 1 ahead
    assert children_at_lock and children_at_lock[0] >= 1
    assert TeacherCache(tmp_path / "cache").built_views() == [0, 1]
