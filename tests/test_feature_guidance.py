"""Feature guidance (locality guidance): the loss is the authors' (projected student map vs teacher map,
bilinear to the larger grid, MSE summed over pairs), it trains the projections with the student, is
logged on its own, works with and without the distillation token, survives a checkpoint, and bad
settings give one-line errors."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from distill import DistillationLoss, DistillModule, ImageDataModule, StudentConfig, build_teacher
from distill.student.feature_guidance import FeatureGuidanceConfig

STUDENT = dict(patch_size=2, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
GUIDE = dict(student_blocks=[0, -1], teacher_layers=["stages.0", "stages.2"], weight=2.5)


def teacher(dm):
    torch.manual_seed(0)
    return build_teacher("cifar_resnet10", dm.num_classes, in_chans=dm.in_chans, img_size=dm.img_size, mean=dm.mean,
                         std=dm.std, class_names=dm.class_names, base_width=8)


def digits():
    return ImageDataModule("digits", img_size=8, batch_size=32)


def test_guidance_loss_is_the_authors_formula():
    dm = digits()
    module = DistillModule(StudentConfig(**STUDENT, num_classes=10, img_size=8, in_chans=1), teacher=teacher(dm),
                           feature_guidance=FeatureGuidanceConfig(**GUIDE))
    guidance = module.guidance
    # student maps: 4x4 patch grid, width 32; teacher stages.0 is 8x8 with 8 channels, stages.2 2x2 with 32
    assert [p.in_channels for p in guidance.proj] == [32, 32]
    assert [p.out_channels for p in guidance.proj] == [8, 32]
    x = torch.randn(4, 1, 8, 8)
    out, feats = guidance.student_forward(module.student.train(), x)
    assert [tuple(f.shape) for f in feats] == [(4, 32, 4, 4), (4, 32, 4, 4)]
    assert isinstance(out, tuple) and out[0].shape == (4, 10)  # (z_cls, z_dist) as student(x) returns
    module.teacher(x)
    t0, t2 = module.teacher.watched(["stages.0", "stages.2"])
    expected = (F.mse_loss(F.interpolate(guidance.proj[0](feats[0]), (8, 8), mode="bilinear"), t0)
                + F.mse_loss(guidance.proj[1](feats[1]), F.interpolate(t2, (4, 4), mode="bilinear")))
    torch.testing.assert_close(guidance.loss(feats), expected)


@pytest.mark.parametrize("distilled", [True, False])
def test_guidance_trains_projections_with_the_student_and_is_logged(trainer_factory, distilled, tmp_path):
    dm = digits()
    loss = DistillationLoss("hard") if distilled else DistillationLoss("none")
    module = DistillModule(StudentConfig(**STUDENT, distilled=distilled,
                                         name="deit_tiny_distilled_patch16_224"), teacher=teacher(dm), loss=loss,
                           feature_guidance=FeatureGuidanceConfig(**GUIDE), warmup_epochs=0, lr=3e-3)
    before = []

    class Snapshot(L.Callback):  # the projections exist once the student is built from the data
        def on_train_start(self, trainer, pl_module):
            before.extend(p.detach().clone() for p in pl_module.guidance.proj.parameters())

    trainer = trainer_factory(max_epochs=3, limit_train_batches=10, limit_val_batches=1, log_every_n_steps=1,
                              logger=CSVLogger(tmp_path, name="", version=""), callbacks=[Snapshot()])
    trainer.fit(module, dm)
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.guidance.proj.parameters()} <= in_optimizer
    assert before and not all(torch.equal(a, b) for a, b in zip(before, module.guidance.proj.parameters()))
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/loss_feature")]
    first, last = float(rows[0]["train/loss_feature"]), float(rows[-1]["train/loss_feature"])
    assert last < first  # the student's maps move towards the teacher's
    r = rows[-1]
    total = float(r["train/loss_ce"]) if not distilled else (
        0.5 * float(r["train/loss_ce"]) + 0.5 * float(r["train/loss_distill"]))
    assert float(r["train/loss"]) == pytest.approx(total + 2.5 * float(r["train/loss_feature"]), rel=1e-4)


def test_guidance_projections_survive_a_checkpoint(trainer_factory, tiny_teacher_ckpt, tmp_path):
    module = DistillModule(StudentConfig(**STUDENT), teacher=str(tiny_teacher_ckpt), warmup_epochs=0,
                           feature_guidance=dict(GUIDE))
    trainer = trainer_factory(max_steps=2, limit_val_batches=0)
    trainer.fit(module, digits())
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    loaded = DistillModule.load_from_checkpoint(path)
    for a, b in zip(module.guidance.proj.parameters(), loaded.guidance.proj.parameters()):
        assert torch.equal(a, b)


def test_bad_guidance_settings_are_one_line_errors(tiny_teacher_ckpt, tmp_path):
    dm = digits()
    cfg = StudentConfig(**STUDENT, num_classes=10, img_size=8, in_chans=1)
    with pytest.raises(ValueError, match="has no module 'layer9'; choose among .*stages"):
        DistillModule(cfg, teacher=teacher(dm), feature_guidance=dict(GUIDE, teacher_layers=["stages.0", "layer9"]))
    with pytest.raises(ValueError, match="block 5 does not exist in a student of depth 2"):
        DistillModule(cfg, teacher=teacher(dm), feature_guidance=dict(GUIDE, student_blocks=[0, 5]))
    with pytest.raises(ValueError, match="pair up one to one"):
        DistillModule(cfg, teacher=teacher(dm), feature_guidance=dict(GUIDE, student_blocks=[0]))
    with pytest.raises(ValueError, match="teacher cache does not store"):
        DistillModule(cfg, teacher=teacher(dm), feature_guidance=dict(GUIDE), teacher_cache=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillModule(cfg, loss=DistillationLoss("none"), feature_guidance=dict(GUIDE))
    with pytest.raises(ValueError, match=r"does not output a \(B, C, H, W\)"):
        DistillModule(cfg, teacher=teacher(dm), feature_guidance=dict(GUIDE, teacher_layers=["stages.0", "head"]))


@pytest.mark.parametrize("teacher_dtype", [None, "bfloat16"])
def test_guided_checkpoint_holds_no_teacher_and_reload_keeps_the_teacher_files_weights(
        trainer_factory, tiny_teacher_ckpt, tmp_path, teacher_dtype):
    from distill.teacher.frozen import FrozenTeacher

    module = DistillModule(StudentConfig(**STUDENT), teacher=str(tiny_teacher_ckpt), warmup_epochs=0,
                           feature_guidance=dict(GUIDE), teacher_dtype=teacher_dtype)
    trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    trainer.fit(module, digits())
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert [k for k in saved if not k.startswith(("student.", "guidance.proj."))] == []  # no teacher tensor
    loaded = DistillModule.load_from_checkpoint(path)
    reference = FrozenTeacher.load(str(tiny_teacher_ckpt)).network.state_dict()
    weights = loaded.teacher.network.state_dict()
    assert weights.keys() == reference.keys()
    for k, v in reference.items():  # bit for bit the file's, not a (bf16-rounded) copy from the student
        assert weights[k].dtype == v.dtype and torch.equal(weights[k], v), k
    assert [k for k, _ in loaded.named_modules() if ".guide" in k] == []
    # a checkpoint of an older version, with a bf16 teacher copy under guidance.guide.*, still loads the file's
    legacy = torch.load(path, map_location="cpu", weights_only=True)
    legacy["state_dict"].update({f"guidance.guide.network.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v
                                 for k, v in reference.items()})
    torch.save(legacy, tmp_path / "legacy.ckpt")
    weights = DistillModule.load_from_checkpoint(tmp_path / "legacy.ckpt").teacher.network.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in reference.items())


@pytest.mark.parametrize("blocks", [[2, 0], [-1, 0], [1, 1], [0, 2]])
def test_student_blocks_pair_with_teacher_layers_by_block_index(blocks):
    dm = digits()
    layers = ["stages.2", "stages.0"]
    module = DistillModule(StudentConfig(**dict(STUDENT, depth=3), num_classes=10, img_size=8, in_chans=1),
                           teacher=teacher(dm), feature_guidance=dict(GUIDE, student_blocks=blocks,
                                                                       teacher_layers=layers))
    guidance, student = module.guidance, module.student.eval()
    assert [p.out_channels for p in guidance.proj] == [32, 8]  # one projection per pair, to its teacher layer
    x = torch.randn(2, 1, 8, 8)
    _, feats = guidance.student_forward(student, x)
    # each pair's map is its own block's, computed alone
    alone = [student.forward_intermediates(x, indices=[b], intermediates_only=True)[0] for b in blocks]
    assert len(feats) == len(blocks)
    for f, a in zip(feats, alone):
        torch.testing.assert_close(f, a)
    module.teacher(x)
    targets = module.teacher.watched(layers)
    expected = 0
    for proj, f, t in zip(guidance.proj, alone, targets):  # the authors' formula on the right pairs
        size = (max(f.shape[-2], t.shape[-2]), max(f.shape[-1], t.shape[-1]))
        expected = expected + F.mse_loss(F.interpolate(proj(f), size, mode="bilinear"),
                                         F.interpolate(t, size, mode="bilinear"))
    torch.testing.assert_close(guidance.loss(feats), expected)


def _outputs_of(network: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Forward hooks of the test's own on the named submodules: their outputs of the latest forward."""
    modules, seen = dict(network.named_modules()), {}
    for name in names:
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    return seen


def _expected_loss(proj, student_maps, teacher_maps) -> torch.Tensor:
    """The authors' formula: each projected student map and its teacher map bilinear to the larger grid, MSE, summed."""
    total = torch.zeros(())
    for p, s, t in zip(proj, student_maps, teacher_maps):
        s = p(s)
        size = (max(s.shape[-2], t.shape[-2]), max(s.shape[-1], t.shape[-1]))
        total = total + F.mse_loss(F.interpolate(s, size, mode="bilinear"), F.interpolate(t, size, mode="bilinear"))
    return total


def test_guidance_reads_the_blocks_it_was_asked_for():
    """A depth-4 student guided at blocks [1, 3] only: the maps guided (and the loss) are those of blocks 1
    and 3, as timm's forward_intermediates returns them when called on its own, not those of blocks 0 and 1."""
    dm = digits()
    module = DistillModule(StudentConfig(**{**STUDENT, "depth": 4}, num_classes=10, img_size=8, in_chans=1),
                           teacher=teacher(dm), feature_guidance=dict(GUIDE, student_blocks=[1, 3]))
    student, guidance = module.student.train(), module.guidance
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        out, feats = guidance.student_forward(student, x)
        final, expected = student.forward_intermediates(x, indices=[1, 3])
        _, every = student.forward_intermediates(x, indices=[0, 1, 2, 3])
    assert len(feats) == 2
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(every[0], every[1]) and not torch.allclose(every[1], every[3])  # blocks differ
    torch.testing.assert_close(out, student.forward_head(final))
    maps = _outputs_of(module.teacher.network, GUIDE["teacher_layers"])
    with torch.no_grad():
        module.teacher(x)
        torch.testing.assert_close(guidance.loss(feats), _expected_loss(
            guidance.proj, expected, [maps[n] for n in GUIDE["teacher_layers"]]))


def test_guidance_with_timm_resnet_layer_names():
    """A timm ResNet teacher guides by its own layer names (layer1..layer4, as the README says): the
    projections map to those layers' output channels and the loss reads those layers' outputs."""
    torch.manual_seed(0)
    net = build_teacher("resnet18", 10, in_chans=1, img_size=16)
    layers = ["layer1", "layer3"]
    module = DistillModule(StudentConfig(**STUDENT, num_classes=10, img_size=16, in_chans=1), teacher=net,
                           feature_guidance=dict(student_blocks=[0, 1], teacher_layers=layers, weight=2.5))
    guidance = module.guidance
    assert [p.out_channels for p in guidance.proj] == [64, 256]  # resnet18's layer1 and layer3 outputs
    maps = _outputs_of(net, layers)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        _, feats = guidance.student_forward(module.student.train(), x)
        module.teacher(x)
        assert [tuple(maps[n].shape) for n in layers] == [(2, 64, 4, 4), (2, 256, 1, 1)]
        torch.testing.assert_close(guidance.loss(feats), _expected_loss(guidance.proj, feats, [maps[n] for n in layers]))
