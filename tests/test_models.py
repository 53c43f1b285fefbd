"""build_student / build_teacher / student_heads / cifar_resnet on timm, and the metadata that travels
with each model."""
from __future__ import annotations

import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from distill import ImageDataModule, build_student, build_teacher, model_meta, student_heads
from distill.cifar_resnet import CifarResNet


def tiny_student(**overrides):
    kwargs = dict(num_classes=5, img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                  drop_path_rate=0.0)
    kwargs.update(overrides)
    return build_student(**kwargs)


# ---------------------------------------------------------------------------------------- student
def test_distilled_student_two_heads_in_train_mode_fused_in_eval():
    torch.manual_seed(0)
    model = tiny_student()
    assert isinstance(model, VisionTransformerDistilled)
    x = torch.randn(3, 1, 8, 8)

    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    z_cls, z_dist = out
    assert z_cls.shape == z_dist.shape == (3, 5)
    assert not torch.allclose(z_cls, z_dist)  # two different heads on two different tokens

    model.eval()
    fused = model(x)
    assert isinstance(fused, torch.Tensor) and fused.shape == (3, 5)
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(fused, expected)
    # with drop_path 0 and no dropout, the train-mode heads are the same numbers
    torch.testing.assert_close(fused, (z_cls + z_dist) / 2)


def test_student_heads_in_eval_mode():
    torch.manual_seed(0)
    model = tiny_student().eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        z_cls, z_dist = student_heads(model, x)
        fused = model(x)
        model.train()
        t_cls, t_dist = model(x)
    assert z_cls.shape == z_dist.shape == (2, 5)
    torch.testing.assert_close(z_cls, t_cls)
    torch.testing.assert_close(z_dist, t_dist)
    torch.testing.assert_close((z_cls + z_dist) / 2, fused)


def test_one_head_student():
    torch.manual_seed(0)
    model = tiny_student(distilled=False)
    assert isinstance(model, VisionTransformer) and not isinstance(model, VisionTransformerDistilled)
    assert model.dist_token is None if hasattr(model, "dist_token") else True
    x = torch.randn(2, 1, 8, 8)
    out = model.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        a, b = student_heads(model, x)
        torch.testing.assert_close(a, model(x))
    assert a is b


def test_student_size_overrides_and_metadata():
    model = tiny_student(num_classes=7, img_size=12, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=4)
    assert len(model.blocks) == 2
    assert model.embed_dim == 48
    assert model.blocks[0].attn.num_heads == 4
    assert tuple(model.patch_embed.patch_size) == (4, 4)
    assert model.pos_embed.shape[1] == (12 // 4) ** 2 + 2  # patches + class + distillation tokens
    meta = model_meta(model)
    assert meta["num_classes"] == 7 and meta["in_chans"] == 3 and meta["img_size"] == 12
    assert len(meta["mean"]) == len(meta["std"]) == 3


@pytest.mark.parametrize("img_size, patch_size", [(10, 4), (8, 3), (32, 5)])
def test_img_size_not_divisible_by_patch_size(img_size, patch_size):
    with pytest.raises(ValueError, match="patch_size"):
        tiny_student(img_size=img_size, patch_size=patch_size)


def test_img_size_not_divisible_by_default_patch_size():
    # deit_*_patch16: a 30-pixel image would silently lose its last 14 rows and columns
    with pytest.raises(ValueError, match="patch"):
        build_student(num_classes=3, img_size=30, embed_dim=32, depth=1, num_heads=2)


def test_non_distilled_name_with_distilled_true_is_refused():
    with pytest.raises(ValueError, match="distill"):
        build_student("vit_tiny_patch16_224", num_classes=3, img_size=16, embed_dim=32, depth=1, num_heads=2)


# ------------------------------------------------------------------------------------ cifar_resnet
def test_cifar_resnet18_registered_with_timm():
    assert timm.is_model("cifar_resnet18")
    assert "cifar_resnet18" in timm.list_models("cifar_resnet*")
    model = timm.create_model("cifar_resnet18", num_classes=10)
    assert isinstance(model, CifarResNet)
    assert model.get_classifier().out_features == 10
    # ResNet-18 at width 64: 11.17M parameters
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("size", [32, 8])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_cifar_resnet_runs_on_small_inputs(size, in_chans):
    model = timm.create_model("cifar_resnet10", num_classes=4, in_chans=in_chans, base_width=8)
    x = torch.randn(2, in_chans, size, size)
    out = model.train()(x)  # batch statistics need 2 samples even at the 1x1 last stage
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 4)


@pytest.mark.parametrize("size", [32, 8])
def test_cifar_resnet18_full_width_on_small_inputs(size):
    model = timm.create_model("cifar_resnet18", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, size, size)).shape == (1, 10)


# ----------------------------------------------------------------------------------------- teacher
def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_build_teacher_metadata():
    names = ["ant", "bee", "cat"]
    model = build_teacher("cifar_resnet10", 3, in_chans=1, class_names=names, mean=[0.3], std=[0.2], img_size=8,
                          base_width=8)
    meta = model_meta(model)
    assert meta == dict(name="cifar_resnet10", num_classes=3, class_names=names, in_chans=1, img_size=8,
                        mean=(0.3,), std=(0.2,))
    assert model.get_classifier().out_features == 3
    assert model.stem[0].in_channels == 1


def test_build_teacher_grayscale_defaults_have_one_channel_of_stats():
    meta = model_meta(build_teacher("cifar_resnet10", 4, in_chans=1, base_width=8))
    assert len(meta["mean"]) == len(meta["std"]) == 1


def test_build_teacher_class_names_must_match_num_classes():
    with pytest.raises(ValueError, match="class_names"):
        build_teacher("cifar_resnet10", 3, class_names=["a", "b"], base_width=8)


def test_build_teacher_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_teacher("cifar_resnet10", base_width=8)


@pytest.mark.parametrize("name, suggestion", [("cifar_resnet81", "cifar_resnet18"), ("resnet_50", "resnet50")])
def test_unknown_model_suggests_close_names(name, suggestion):
    with pytest.raises(ValueError, match=suggestion) as err:
        build_teacher(name, num_classes=10)
    assert repr(name) in str(err.value) or name in str(err.value)


def test_unknown_student_name_is_a_value_error():
    with pytest.raises(ValueError, match="deit_tiny_distilled_patch16_224"):
        build_student("deit_tiny_distiled_patch16_224", num_classes=3, img_size=16)


def test_build_teacher_from_toolkit_checkpoint(tiny_teacher_ckpt):
    ckpt = torch.load(tiny_teacher_ckpt, map_location="cpu", weights_only=True)
    data = ImageDataModule("digits", img_size=8)  # what the tiny teacher was trained on
    # the name passed is ignored: the checkpoint knows its architecture and its task
    model = build_teacher("resnet18", checkpoint=tiny_teacher_ckpt)
    assert isinstance(model, CifarResNet)
    meta = model_meta(model)
    assert meta["name"] == "cifar_resnet10"
    assert meta["num_classes"] == 10
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["in_chans"] == 1 and meta["img_size"] == 8
    assert meta["mean"] == pytest.approx(data.mean) and meta["std"] == pytest.approx(data.std)
    assert 0.2 < meta["mean"][0] < 0.4  # digits' own statistics, not ImageNet's
    assert model.stem[0].out_channels == 8  # model_kwargs (base_width) restored too
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "deit_model_key"])
def test_build_teacher_from_plain_weights(tmp_path, fmt):
    torch.manual_seed(0)
    source = build_teacher("cifar_resnet10", 6, in_chans=3, base_width=8)
    with torch.no_grad():  # make running statistics non-default so they are checked too
        source.train()(torch.randn(4, 3, 8, 8))
    if fmt == "safetensors":
        path = tmp_path / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        path = tmp_path / "teacher.pth"
        obj = source.state_dict() if fmt == "state_dict" else {"model": source.state_dict()}
        torch.save(obj, path)
    # num_classes is read from the classifier's shape when not given
    model = build_teacher("cifar_resnet10", checkpoint=path, base_width=8)
    assert model_meta(model)["num_classes"] == 6
    _same_weights(source, model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source.eval()(x))


def test_build_teacher_plain_weights_of_other_architecture_refused(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(build_teacher("cifar_resnet10", 6, base_width=8).state_dict(), path)
    with pytest.raises(ValueError) as err:
        build_teacher("cifar_resnet18", checkpoint=path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400  # one line naming the first mismatch, not thousands
    assert "other shapes, e.g. stem.0.weight [8, 3, 3, 3] in the file, [64, 3, 3, 3] in the model" in message


@pytest.mark.parametrize("in_chans", [1, 3])
def test_build_teacher_reads_the_channel_count_of_plain_weights(tmp_path, in_chans):
    path = tmp_path / "teacher.pth"
    torch.save(build_teacher("cifar_resnet10", 4, in_chans=in_chans, base_width=8).state_dict(), path)
    model = build_teacher("cifar_resnet10", checkpoint=path, base_width=8)
    assert model_meta(model)["in_chans"] == in_chans and model_meta(model)["num_classes"] == 4


def test_student_checkpoint_refused_as_teacher(tiny_teacher_ckpt, tmp_path):
    ckpt = torch.load(tiny_teacher_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "distill_kind": "student"}
    path = tmp_path / "student.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="student"):
        build_teacher("cifar_resnet10", checkpoint=path)


def test_missing_and_corrupted_checkpoints(tmp_path, tiny_teacher_ckpt):
    with pytest.raises(FileNotFoundError):
        build_teacher("cifar_resnet10", checkpoint=tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(tiny_teacher_ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="bad.ckpt"):
        build_teacher("cifar_resnet10", checkpoint=bad)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        build_teacher("cifar_resnet10", checkpoint=bad_st)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "obj": shutil.copy}, path)  # a global weights_only refuses to unpickle
    with pytest.raises(ValueError, match="weights_only|pickled"):
        build_teacher("cifar_resnet10", checkpoint=path)
