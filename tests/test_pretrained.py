"""Starting from pretrained weights (issue 11), without network: every socket a test opens fails it.

"Pretrained" files are made here: a teacher and a student trained briefly on digits (8x8, grayscale,
10 classes), saved in each supported format, then fine-tuned on a 3-class RGB image folder: heads new,
every other weight the file's before the first step, position embeddings timm's resample for 8 -> 16
px, grayscale weights adapted to RGB. Also: `pretrained: true` from the local cache and offline without
it, an export fed back, layer-wise lr decay, the frozen backbone (and its resume), the data's input
config, the transfer recipe end to end.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from distill import (
    DistillationLoss,
    DistillModule,
    ImageDataModule,
    StudentConfig,
    TeacherModule,
    build_student,
    build_teacher,
    load_student,
)
from distill.commands.main import main
from distill.models.pretrained import registry_cfg

from conftest import earlier_threads

REPO = Path(__file__).resolve().parent.parent
SIZES = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2)
TEACHER_FORMATS = ("step1", "safetensors", "pth", "bin", "deit")
STUDENT_FORMATS = ("step2", "export", "safetensors", "pth", "deit")
STUDENT_HEADS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
TEACHER_HEADS = ("head.fc.weight", "head.fc.bias")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every connection attempt raises and is recorded (the test fails at teardown unless it expected
    them); the Hugging Face and torch hub caches are empty folders."""
    attempts: list[str] = []
    earlier = earlier_threads()

    def refuse(*args, **kwargs):
        if threading.get_ident() not in earlier:
            attempts.append(repr(args[:2]))
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    yield attempts
    assert not attempts, f"the test tried to reach the network: {attempts[:3]}"


def _digit_images(classes, n_train: int, n_val: int) -> dict[str, list]:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = {"train": [], "val": []}
    for c in classes:
        idx = np.flatnonzero(d.target == c)
        for split, sel in (("train", idx[:n_train]), ("val", idx[n_train:n_train + n_val])):
            out[split] += [(c, (d.images[i] * 255 / 16).astype(np.uint8)) for i in sel]
    return out


@pytest.fixture(scope="module")
def folder3(tmp_path_factory) -> str:
    """A 3-class RGB image folder (8x8 digits 0-2, tinted per channel): another task, other channels."""
    root = tmp_path_factory.mktemp("folder3")
    for split, items in _digit_images((0, 1, 2), 16, 6).items():
        for j, (c, g) in enumerate(items):
            path = root / split / f"class_{c}" / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([g, g // 2, 255 - g], -1)).save(path)
    return str(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_teacher_ckpt):
    """The "pretrained" files: a teacher (step-1 checkpoint of a cifar_resnet10 after 3 steps on digits)
    and a student (step-2 checkpoint of a tiny DeiT after 3 steps on digits), each in every format."""
    from distill.commands.export import export

    root = tmp_path_factory.mktemp("pretrained_files")
    teacher_sd = build_teacher("cifar_resnet10", checkpoint=tiny_teacher_ckpt).state_dict()
    teacher = {"step1": tiny_teacher_ckpt}

    L.seed_everything(0)
    module = DistillModule(StudentConfig(**SIZES, drop_path_rate=0.0), loss=DistillationLoss(mode="none"))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, default_root_dir=str(root))
    trainer.fit(module, ImageDataModule("digits", img_size=8, batch_size=32))
    student = {"step2": root / "student.ckpt"}
    trainer.save_checkpoint(student["step2"])
    student_sd = {k: v.clone() for k, v in module.student.state_dict().items()}
    student["export"] = export(str(student["step2"]), "safetensors", "fused", str(root / "export.safetensors"))

    for kind, sd, files in (("teacher", teacher_sd, teacher), ("student", student_sd, student)):
        files["safetensors"] = root / f"{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
        for fmt in ("pth", "bin"):
            files[fmt] = root / f"{kind}.{fmt}"
            torch.save(sd, files[fmt])
        files["deit"] = root / f"{kind}_release.pth"
        torch.save({"model": sd, "epoch": 3}, files["deit"])  # DeiT's release format
    return dict(teacher=teacher, teacher_sd=teacher_sd, student=student, student_sd=student_sd)


class BeforeFirstStep(L.Callback):
    """The network's state_dict as the first training step finds it."""

    def __init__(self, attr: str) -> None:
        self.attr, self.state = attr, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in getattr(pl_module, self.attr).state_dict().items()}


def trainer(root, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(root), limit_val_batches=1)
    options.update(kwargs)
    return L.Trainer(**options)


# ------------------------------------------------------------------------ fine-tuning from each format
@pytest.mark.parametrize("fmt", TEACHER_FORMATS)
def test_teacher_fine_tunes_from_each_format(fmt, weights, folder3, tmp_path):
    sd = weights["teacher_sd"]
    module = TeacherModule("cifar_resnet10", model_kwargs=None if fmt == "step1" else {"base_width": 8},
                           pretrained=str(weights["teacher"][fmt]))
    snap = BeforeFirstStep("model")
    trainer(tmp_path, max_steps=1, callbacks=[snap]).fit(module, ImageDataModule("imagefolder", root=folder3, batch_size=8))
    before = snap.state
    assert module.hparams.model_kwargs == {"base_width": 8}  # recorded, so step 2 rebuilds it
    assert before["head.fc.weight"].shape == (3, 64) and before["head.fc.bias"].shape == (3,)
    assert not torch.equal(before["head.fc.weight"], sd["head.fc.weight"][:3])
    for key, value in sd.items():
        if key in TEACHER_HEADS:
            continue
        expected = adapt_input_conv(3, value, base_chans=1) if key == "stem.0.weight" else value  # grayscale -> RGB
        assert torch.equal(before[key], expected), key
    assert before["stem.0.weight"].shape[1] == 3


@pytest.mark.parametrize("fmt", STUDENT_FORMATS)
def test_student_fine_tunes_from_each_format(fmt, weights, folder3, tmp_path):
    sd = weights["student_sd"]
    sizes = {} if fmt in ("step2", "export") else SIZES  # toolkit files record their sizes
    module = DistillModule(StudentConfig(pretrained=str(weights["student"][fmt]), drop_path_rate=0.0, **sizes),
                           loss=DistillationLoss(mode="none"))
    snap = BeforeFirstStep("student")
    dm = ImageDataModule("imagefolder", root=folder3, batch_size=8, img_size=16)
    trainer(tmp_path, max_steps=1, callbacks=[snap]).fit(module, dm)
    before = snap.state
    assert {k: module.hparams.student[k] for k in SIZES} == SIZES
    for key in STUDENT_HEADS:  # both heads new for 3 classes
        assert before[key].shape[0] == 3, key
    assert torch.equal(before["dist_token"], sd["dist_token"])  # the distillation token kept
    expected_pos = resample_abs_pos_embed(sd["pos_embed"], new_size=[8, 8], num_prefix_tokens=2)  # 4x4 -> 8x8 patches
    assert before["pos_embed"].shape == (1, 66, 32) and torch.equal(before["pos_embed"], expected_pos)
    assert torch.equal(before["patch_embed.proj.weight"], adapt_input_conv(3, sd["patch_embed.proj.weight"], base_chans=1))
    for key, value in sd.items():
        if key not in (*STUDENT_HEADS, "pos_embed", "patch_embed.proj.weight"):
            assert torch.equal(before[key], value), key


def test_report_line_names_loaded_adapted_new_and_dropped(weights):
    model = build_student(num_classes=3, img_size=16, in_chans=3, pretrained=weights["student"]["pth"], **SIZES)
    report = model.pretrained_report
    assert "\n" not in report and str(weights["student"]["pth"]) in report
    assert "loaded 19/23 tensors" in report
    assert "adapted pos_embed 1x18x32->1x66x32, patch_embed.proj.weight 32x1x2x2->32x3x2x2" in report
    assert "new head.weight, head.bias, head_dist.weight, head_dist.bias" in report
    assert "dropped head.bias, head.weight, head_dist.bias, head_dist.weight" in report


def test_plain_vit_initialises_a_distilled_student(weights, tmp_path):
    plain = build_student(num_classes=10, img_size=8, in_chans=1, distilled=False, **SIZES)
    torch.save({"model": plain.state_dict()}, tmp_path / "vit.pth")
    torch.manual_seed(1)
    student = build_student(num_classes=10, img_size=8, in_chans=1, pretrained=tmp_path / "vit.pth", **SIZES)
    sd, plain_sd = student.state_dict(), plain.state_dict()
    assert "new dist_token, head_dist.weight, head_dist.bias" in student.pretrained_report
    assert torch.equal(sd["pos_embed"][:, :1], plain_sd["pos_embed"][:, :1])  # class token's position
    assert torch.equal(sd["pos_embed"][:, 2:], plain_sd["pos_embed"][:, 1:])  # the patches' positions
    assert not torch.equal(sd["pos_embed"][:, 1], sd["pos_embed"][:, 0])  # a new slot for the distillation token
    for key, value in plain_sd.items():
        if key != "pos_embed":
            assert torch.equal(sd[key], value), key  # the class head too: same classes
    for key in ("head_dist.weight", "head_dist.bias"):  # a new classifier on pretrained features starts at 0
        assert sd[key].shape[0] == 10 and torch.count_nonzero(sd[key]) == 0, key
    # ... and back: a distilled student's weights into a one-head ViT drop the token and second head
    one_head = build_student(num_classes=10, img_size=8, in_chans=1, distilled=False, pretrained=weights["student"]["pth"],
                             **SIZES)
    assert "dropped dist_token, head_dist.bias, head_dist.weight" in one_head.pretrained_report
    assert torch.equal(one_head.state_dict()["pos_embed"],
                       torch.cat([weights["student_sd"]["pos_embed"][:, :1], weights["student_sd"]["pos_embed"][:, 2:]], 1))


def test_same_class_count_other_class_names_gets_new_heads(weights):
    digits = [str(i) for i in range(10)]
    kept = build_teacher("cifar_resnet10", 10, 1, class_names=digits, pretrained=weights["teacher"]["step1"])
    assert torch.equal(kept.state_dict()["head.fc.weight"], weights["teacher_sd"]["head.fc.weight"])
    other = build_teacher("cifar_resnet10", 10, 1, class_names=[f"x{i}" for i in range(10)],
                          pretrained=weights["teacher"]["step1"])
    assert not torch.equal(other.state_dict()["head.fc.weight"], weights["teacher_sd"]["head.fc.weight"])
    assert "head.fc new (classes" in other.pretrained_report


def test_export_fed_back_as_pretrained_gives_the_same_logits(weights, tmp_path):
    from distill.commands.export import main as export_main

    ckpt = weights["student"]["step2"]
    reference = load_student(ckpt)
    x = torch.randn(6, 1, 8, 8)
    for head in ("fused", "cls", "dist"):
        out = tmp_path / f"{head}.safetensors"
        assert export_main([str(ckpt), "--head", head, "--out", str(out)]) == 0
        model = build_student(num_classes=10, img_size=8, in_chans=1, pretrained=out).eval()  # sizes from the file
        with torch.no_grad():
            z_cls, z_dist = reference.head(reference.forward_features(x)[:, 0]), reference.head_dist(reference.forward_features(x)[:, 1])
            expected = {"fused": reference(x), "cls": z_cls, "dist": z_dist}[head]
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    # through the recipe side too: the export as a StudentConfig's pretrained, no training
    module = DistillModule(StudentConfig(num_classes=10, img_size=8, in_chans=1, pretrained=str(tmp_path / "fused.safetensors")),
                           loss=DistillationLoss(mode="none"))
    with torch.no_grad():
        torch.testing.assert_close(module.student.eval()(x), reference(x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- pretrained: true
def _fake_hub_cache(cache: Path, name: str) -> torch.nn.Module:
    """timm's weights of `name` as the Hugging Face cache holds them after a download (random ones)."""
    import timm

    repo = registry_cfg(name)["hf_hub_id"]
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    save_file(model.state_dict(), str(folder / "snapshots" / commit / "model.safetensors"))
    return model


def test_pretrained_true_reads_the_local_cache_offline(tmp_path):
    reference = _fake_hub_cache(tmp_path / "hf_cache", "deit_tiny_distilled_patch16_224")
    student = build_student(num_classes=3, img_size=32, pretrained=True)
    sd, ref = student.state_dict(), reference.state_dict()
    assert "timm timm/deit_tiny_distilled_patch16_224.fb_in1k" in student.pretrained_report
    assert "head/head_dist new (3 classes, the weights have 1000)" in student.pretrained_report
    assert torch.equal(sd["blocks.11.mlp.fc2.weight"], ref["blocks.11.mlp.fc2.weight"])
    assert torch.equal(sd["dist_token"], ref["dist_token"])
    assert torch.equal(sd["pos_embed"], resample_abs_pos_embed(ref["pos_embed"], new_size=[2, 2], num_prefix_tokens=2))


def test_pretrained_true_offline_with_an_empty_cache_is_one_line(capsys, folder3, tmp_path, no_network, monkeypatch):
    """No HF_HUB_OFFLINE: the download is tried (and refused) before the one-line error."""
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)  # skip huggingface_hub's retry back-off
    code = main(["fit", "--config", str(REPO / "recipes/transfer/teacher.yaml"), "--data.root", folder3,
                 "--data.img_size", "8", "--data.batch_size", "8", "--data.num_workers", "0",
                 "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("distill: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "resnet50" in lines[0] and "model.pretrained" in lines[0] and "local file" in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert no_network, "the download was not even tried"
    no_network.clear()  # expected here: the attempts failed, as they must


def test_cli_offline_mode_exit_code_2(folder3, tmp_path):
    """`distill fit` as a process with HF_HUB_OFFLINE=1, an empty cache and sockets refused."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import socket
        def _refuse(*args, **kwargs):
            raise OSError("network access in a test")
        socket.socket.connect = socket.create_connection = socket.getaddrinfo = _refuse
    """))
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    cmd = [sys.executable, "-m", "distill.cli", "fit", "--config", str(REPO / "recipes/transfer/student.yaml"),
           "--data.root", folder3, "--data.img_size", "16", "--data.batch_size", "8", "--data.num_workers", "0",
           "--model.init_args.teacher", "null", "--model.init_args.loss.mode", "none",
           "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.startswith("distill: error:")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "deit_tiny_distilled_patch16_224" in lines[0] and "model.student.pretrained" in lines[0], lines[0]


# ------------------------------------------------------------------------------------- bad input
def test_bad_pretrained_files_are_one_line_errors(weights, tmp_path):
    def one_line(error, match: str) -> str:
        message = str(error.value)
        assert "\n" not in message and message.strip() == message, message
        assert re.search(match, message), message
        return message

    with pytest.raises(FileNotFoundError) as e:
        build_teacher("cifar_resnet10", 3, pretrained=tmp_path / "nope.pth")
    one_line(e, "pretrained weights .*nope.pth.* do not exist")
    with pytest.raises(ValueError) as e:
        build_teacher("resnet18", 3, pretrained=weights["teacher"]["step1"])
    one_line(e, r"holds a cifar_resnet10, not a resnet18")
    with pytest.raises(ValueError) as e:
        build_teacher("resnet18", 3, pretrained=weights["teacher"]["pth"])
    one_line(e, r"does not fit resnet18: \d+ weights are not in the file")
    with pytest.raises(ValueError) as e:
        build_student(num_classes=3, img_size=8, in_chans=1, patch_size=2, embed_dim=64, depth=1, num_heads=2,
                      pretrained=weights["student"]["pth"])
    one_line(e, r"does not fit deit_tiny_distilled_patch16_224 \(size mismatch")

    marker = tmp_path / "payload-ran"

    class Payload:  # a pickle that creates a file when it is loaded
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError) as e:
        build_teacher("cifar_resnet10", 3, pretrained=tmp_path / "evil.pth")
    assert not marker.exists(), "loading the file ran its pickled code"
    one_line(e, "evil.pth.* holds pickled objects that could run code and was refused")


def test_checkpoints_reload_without_the_pretrained_file(weights, folder3, tmp_path):
    import shutil

    for kind in ("teacher", "student"):
        source = tmp_path / f"{kind}_weights.pth"
        shutil.copy(weights[kind]["pth"], source)
        if kind == "teacher":
            module = TeacherModule("cifar_resnet10", model_kwargs={"base_width": 8}, pretrained=str(source))
        else:
            module = DistillModule(StudentConfig(pretrained=str(source), **SIZES), loss=DistillationLoss(mode="none"))
        t = trainer(tmp_path, max_steps=1)
        t.fit(module, ImageDataModule("imagefolder", root=folder3, batch_size=8, img_size=8))
        t.save_checkpoint(tmp_path / f"{kind}.ckpt")
        source.unlink()  # gone: another machine, a cleaned cache
        cls = TeacherModule if kind == "teacher" else DistillModule
        reloaded = cls.load_from_checkpoint(tmp_path / f"{kind}.ckpt")
        net, again = (module.model, reloaded.model) if kind == "teacher" else (module.student, reloaded.student)
        for key, value in net.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key
        saved = torch.load(tmp_path / f"{kind}.ckpt", weights_only=True)["hyper_parameters"]
        assert saved["pretrained_from"] == str(source)  # the lineage stays
        assert module.hparams.get("pretrained") or module.hparams["student"]["pretrained"]  # the live run unchanged


# ------------------------------------------------------------------------------ fine-tuning settings
def test_layer_decay_scales_each_layer_and_keeps_the_weight_decay_rules(tmp_path):
    module = DistillModule(StudentConfig(patch_size=2, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0),
                           loss=DistillationLoss(mode="none"), lr=1e-3, weight_decay=0.05, layer_decay=0.5,
                           warmup_epochs=0)
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, ImageDataModule("digits", img_size=8, batch_size=32))
    groups = t.optimizers[0].param_groups
    names = {id(p): n for n, p in module.student.named_parameters()}
    lr_of = {names[id(p)]: g["initial_lr"] for g in groups for p in g["params"]}
    decay_of = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert set(lr_of) == set(names.values())  # every student parameter, nothing else
    # timm's layers of a DeiT: embeddings, block 0, block 1 (+ final norm), heads: lr x 0.5^3, 0.5^2, 0.5, 1
    for name, scale in (("patch_embed.proj.weight", 0.125), ("pos_embed", 0.125), ("cls_token", 0.125),
                        ("dist_token", 0.125), ("blocks.0.attn.qkv.weight", 0.25), ("blocks.1.mlp.fc1.weight", 0.5),
                        ("norm.weight", 0.5), ("head.weight", 1.0), ("head_dist.weight", 1.0)):
        assert lr_of[name] == pytest.approx(1e-3 * scale), name
    for name in ("pos_embed", "cls_token", "dist_token", "norm.weight", "blocks.0.norm1.bias", "head.bias"):
        assert decay_of[name] == 0.0, name
    for name in ("blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
        assert decay_of[name] == 0.05, name


class ParamsAtEpochEnd(L.Callback):
    def __init__(self, attr: str) -> None:
        self.attr, self.states = attr, []

    def _snap(self, pl_module):
        self.states.append({n: p.detach().clone() for n, p in getattr(pl_module, self.attr).named_parameters()})

    def on_train_start(self, trainer, pl_module):
        self._snap(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._snap(pl_module)


def _changed(a: dict, b: dict, heads: tuple[str, ...]) -> tuple[set, set]:
    diff = {k for k in a if not torch.equal(a[k], b[k])}
    return {k for k in diff if k.startswith(heads)}, {k for k in diff if not k.startswith(heads)}


def test_frozen_backbone_trains_the_heads_first_then_everything_and_resumes(weights, folder3, tmp_path):
    def run(max_epochs: int, ckpt=None):
        module = DistillModule(StudentConfig(pretrained=str(weights["student"]["step2"]), drop_path_rate=0.0),
                               loss=DistillationLoss(mode="none"), warmup_epochs=0, frozen_backbone_epochs=2)
        snaps = ParamsAtEpochEnd("student")
        t = trainer(tmp_path, max_epochs=max_epochs, limit_train_batches=2, callbacks=[snaps])
        t.fit(module, ImageDataModule("imagefolder", root=folder3, batch_size=8, img_size=16), ckpt_path=ckpt)
        return module, t, snaps.states

    module, t, states = run(1)
    n_params = len(list(module.student.parameters()))
    assert sum(len(g["params"]) for g in t.optimizers[0].param_groups) == n_params  # frozen ones included
    # (loss mode none: head_dist only sees weight decay, so its bias may stay put)
    heads, backbone = _changed(states[0], states[1], ("head",))
    assert {"head.weight", "head.bias"} <= heads and not backbone  # epoch 0: the heads only
    assert all(p.requires_grad for p in module.student.parameters())  # unfrozen once training ends
    t.save_checkpoint(tmp_path / "epoch0.ckpt")

    module, t, states = run(3, ckpt=str(tmp_path / "epoch0.ckpt"))  # resume: epoch 1 frozen, epoch 2 not
    heads, backbone = _changed(states[0], states[1], ("head",))
    assert {"head.weight", "head.bias"} <= heads and not backbone
    heads, backbone = _changed(states[1], states[2], ("head",))
    assert heads and "blocks.0.attn.qkv.weight" in backbone and "patch_embed.proj.weight" in backbone


def test_frozen_backbone_of_the_teacher(weights, folder3, tmp_path):
    module = TeacherModule("cifar_resnet10", pretrained=str(weights["teacher"]["step1"]), frozen_backbone_epochs=1,
                           warmup_epochs=0)
    snaps = ParamsAtEpochEnd("model")
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[snaps]).fit(
        module, ImageDataModule("imagefolder", root=folder3, batch_size=8))
    heads, backbone = _changed(snaps.states[0], snaps.states[1], ("head.fc",))
    assert heads == set(TEACHER_HEADS) and not backbone
    heads, backbone = _changed(snaps.states[1], snaps.states[2], ("head.fc",))
    assert "stem.0.weight" in backbone


# ---------------------------------------------------------------------------------- input config
def test_data_takes_mean_std_and_size_from_the_pretrained_weights_unless_set(weights, folder3, tmp_path):
    def fit(pretrained, **data):
        dm = ImageDataModule("imagefolder", root=folder3, batch_size=8, **data)
        module = TeacherModule("cifar_resnet10", model_kwargs={"base_width": 8}, pretrained=str(pretrained))
        trainer(tmp_path, max_steps=1).fit(module, dm)
        return dm, module

    # a plain state_dict: the named model's timm pretrained_cfg (cifar_resnet: CIFAR statistics, 32 px)
    dm, module = fit(weights["teacher"]["pth"])
    cfg = registry_cfg("cifar_resnet10")
    assert dm.mean == pytest.approx(cfg["mean"]) and dm.std == pytest.approx(cfg["std"]) and dm.img_size == 32
    assert module.hparams.input_mean == pytest.approx(cfg["mean"]) and module.hparams.input_size == 32
    # a step-1 checkpoint records its own (digits: one channel, 8 px) -> per channel of the RGB data
    dm, _ = fit(weights["teacher"]["step1"])
    recorded = torch.load(weights["teacher"]["step1"], weights_only=True)["hyper_parameters"]
    assert dm.mean == pytest.approx(recorded["input_mean"] * 3) and dm.img_size == 8
    # the recipe's values win
    dm, _ = fit(weights["teacher"]["pth"], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], img_size=12)
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.25, 0.25, 0.25) and dm.img_size == 12
    # without pretrained weights: the dataset's own statistics and 8 px, as before
    dm = ImageDataModule("imagefolder", root=folder3, batch_size=8)
    trainer(tmp_path, max_steps=1).fit(TeacherModule("cifar_resnet10", model_kwargs={"base_width": 8}), dm)
    assert dm.img_size == 8 and dm.mean != pytest.approx(cfg["mean"])


# ------------------------------------------------------------------------------------- the recipe
def test_transfer_recipe_runs_offline_from_files(weights, folder3, tmp_path):
    from distill.commands.pipeline import run_pipeline

    summary = run_pipeline("transfer", out=str(tmp_path / "run"), overrides=[
        "--data.root", folder3, "--data.img_size", "16", "--data.batch_size", "8", "--data.num_workers", "0",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--teacher.model.init_args.model", "cifar_resnet10",
        "--teacher.model.init_args.pretrained", str(weights["teacher"]["step1"]),
        "--student.model.init_args.student.pretrained", str(weights["student"]["export"]),
    ])
    student = load_student(summary["student"]["checkpoint"])  # rebuilt without the pretrained file
    assert student.num_classes == 3 and student.patch_embed.proj.weight.shape == (32, 3, 2, 2)
    assert summary["student"]["val/acc_teacher"] is not None


# ------------------------------------------------------------------------------------ the study tool
def test_transfer_study_tool_runs_and_writes_its_report(tmp_path, monkeypatch):
    import json

    import distill.models.pretrained
    from conftest import load_tool

    study = load_tool("transfer_study")
    monkeypatch.setattr(study, "PRE_EPOCHS", dict(teacher=1, student=1))
    monkeypatch.setattr(study, "NEW_EPOCHS", dict(teacher=1, student=1))
    loads = []  # every network built from pretrained weights: (name, source, report line)
    create = distill.models.pretrained.create_pretrained

    def recorded(name, weights, **kwargs):
        model = create(name, weights, **kwargs)
        loads.append((name, weights.source, model.pretrained_report))
        return model

    monkeypatch.setattr(distill.models.pretrained, "create_pretrained", recorded)
    threads = torch.get_num_threads()
    try:
        assert study.main(["--seeds", "0", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 8 and [r["n"] for r in results["table"]] == [1] * 6
    # the pretrained routes start from the digits 0-4 weights: the teacher once, the student once per teacher
    seed0 = tmp_path / "work" / "seed0"
    pre_teacher, pre_student = str(seed0 / "pre-teacher" / "last.ckpt"), str(seed0 / "pre-student" / "last.ckpt")
    assert sorted((name, source) for name, source, _ in loads) == sorted(
        [("cifar_resnet10", pre_teacher)] + [("deit_tiny_distilled_patch16_224", pre_student)] * 2)
    for _, _, report in loads:
        loaded, total = map(int, re.search(r"loaded (\d+)/(\d+) tensors", report).groups())
        assert 0 < loaded < total, report  # every weight but the new heads
    for run in runs:
        recorded_from = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"].get(
            "pretrained_from")
        if run["stage"] == "transfer" and run["init"] == "pretrained":
            assert recorded_from == (pre_teacher if run["model"] == "teacher" else pre_student), run
        else:
            assert recorded_from is None, run
    # every row is the run its label names
    expected = {
        "teacher from scratch": ("teacher", "scratch", None),
        "teacher pretrained (0-4), fine-tuned": ("teacher", "pretrained", None),
        "student from scratch, teacher from scratch": ("student", "scratch", "scratch"),
        "student from scratch, pretrained teacher": ("student", "scratch", "pretrained"),
        "student pretrained, teacher from scratch": ("student", "pretrained", "scratch"),
        "student pretrained, pretrained teacher (the pretrained route)": ("student", "pretrained", "pretrained"),
    }
    assert [row["row"] for row in results["table"]] == list(expected)
    for row in results["table"]:
        model, init, teacher = expected[row["row"]]
        (run,) = [r for r in runs if r["stage"] == "transfer" and (r["model"], r["init"], r["teacher"]) == (model, init, teacher)]
        assert (row["model"], row["init"], row["teacher"], row["mean"]) == (model, init, teacher, run["val_acc"]), row["row"]
        teacher_dir = {None: "", "scratch": "-teacher-scratch", "pretrained": "-teacher-pretrained"}[teacher]
        assert Path(run["checkpoint"]).parent.name == f"new-{model}-{init}{teacher_dir}"
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.startswith("<!-- regenerate: python tools/transfer_study.py --seeds 0") and "Hardware: CPU" in md
    for row in results["table"]:
        acc = f"{100 * row['mean']:.2f}"
        assert f"| {row['row']} | {acc} +- 0.00 | {acc} - {acc} | 1 |" in md
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    # --report writes the same report again from results.json, and runs nothing
    (tmp_path / "out" / "results.md").unlink()
    monkeypatch.setattr(study, "run_seed", lambda *a, **k: pytest.fail("--report trained something"))
    assert study.main(["--out", str(tmp_path / "out"), "--report"]) == 0
    assert (tmp_path / "out" / "results.md").read_text() == md


# ------------------------------------------------------------------------------ the README example
def readme_transfer_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("The same from Python:"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_transfer_example_runs_as_written(folder3, tmp_path, monkeypatch):
    """The README's "same from Python" transfer example, with `pretrained=True` read from a local Hugging Face
    cache (random weights stand in for timm's), DIR a small image folder (48 images, batch 16), 32 px instead of
    224 and 1 epoch instead of 30: both steps train, and both networks start from the cached weights."""
    code = readme_transfer_example()
    for text, count in (("max_epochs=30", 2), ('root="DIR"', 1), ("img_size=224", 1), ("batch_size=64", 1)):
        assert code.count(text) == count, text
    code = code.replace("max_epochs=30", "max_epochs=1").replace('root="DIR"', f"root={folder3!r}")
    code = code.replace("img_size=224", "img_size=32").replace("batch_size=64", "batch_size=16")  # 48 images
    cache = Path(os.environ["HF_HUB_CACHE"])
    resnet = _fake_hub_cache(cache, "resnet50").state_dict()
    deit = _fake_hub_cache(cache, "deit_tiny_distilled_patch16_224").state_dict()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (the same from Python)", "exec"), namespace)
    teacher, student = namespace["teacher"], namespace["student"]
    assert "timm timm/resnet50" in teacher.model.pretrained_report
    assert "timm timm/deit_tiny_distilled_patch16_224" in student.student.pretrained_report
    # the teacher's backbone is frozen for the first (here: only) epoch: exactly the cached weights
    assert torch.equal(teacher.model.state_dict()["layer3.0.conv1.weight"], resnet["layer3.0.conv1.weight"]), "backbone moved"
    assert not torch.equal(teacher.model.state_dict()["fc.weight"][:3], resnet["fc.weight"][:3])  # a new 3-class head
    # the student moved from the cached weights by warm-up steps of lr <= 1.25e-4 x 0.75^k only
    for key in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "dist_token"):
        torch.testing.assert_close(student.student.state_dict()[key], deit[key], rtol=0, atol=1e-3, msg=key)
    assert student.trainer.global_step > 0 and student.student.num_classes == 3
