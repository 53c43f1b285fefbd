"""Sharing models the way timm users do, all without network (any connection off this machine fails
the test): `distill export --format hf` (timm's save_for_hf folder + model card), `hf-hub:` and
`local-dir:` model names (teacher, step-2 teacher, pretrained student), `distill push` up to the
upload call, and W&B model artifacts read back from an offline run."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import timm
import torch
from conftest import TINY_STUDENT, earlier_threads, make_trainer
from PIL import Image

from huggingface_hub import HfApi
from distill import DistillationLoss, DistillModule, ImageDataModule, StudentConfig, TeacherModule
from distill.data.transforms import build_eval_transform
from distill.models.build import build_student, build_teacher
from distill.models.heads import student_heads
from distill.models.meta import eval_spec_of
from distill.models.weights import load_weights_file, sha256_of
from distill.sharing.hf_export import export_hf
from distill.student.module import load_student

REPO = Path(__file__).resolve().parent.parent
REAL_CREATE_REPO = HfApi.create_repo  # before any test replaces it
X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # digits-shaped inputs


# ------------------------------------------------------------------------------------- no network
@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every connection off this machine fails (and is recorded); local ones (wandb-core's) go through.
    A test that expects an attempt empties the list; any other attempt fails the test."""
    attempts: list = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo
    local = ("127.0.0.1", "::1", "localhost", None)
    earlier = earlier_threads()  # threads an earlier test left running (wandb's): refused, not recorded

    def guarded_connect(self, address):
        if self.family == socket.AF_UNIX or (address[0] if isinstance(address, tuple) else address) in local:
            return connect(self, address)
        if threading.get_ident() not in earlier:
            attempts.append(address)
        raise OSError(f"network disabled in tests (connect to {address})")

    def guarded_getaddrinfo(host, *args, **kwargs):  # name lookups go off the machine too
        if host in local or (isinstance(host, bytes) and host.decode() in local):
            return getaddrinfo(host, *args, **kwargs)
        if threading.get_ident() not in earlier:
            attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, f"network disabled in tests (look-up of {host})")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield attempts
    assert attempts == [], f"unexpected network connections: {attempts}"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher_ckpt):
    """A tiny student distilled for 3 steps from the tiny teacher, and hf exports of both: the
    student with each head (cls through the CLI), the teacher."""
    from distill.commands.main import main

    root = tmp_path_factory.mktemp("hub")
    L.seed_everything(0)
    module = DistillModule(StudentConfig(**TINY_STUDENT), str(tiny_teacher_ckpt), DistillationLoss("hard"))
    trainer = make_trainer(root / "student_run", max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, ImageDataModule("digits", img_size=8, batch_size=32))
    student_ckpt = root / "student.ckpt"
    trainer.save_checkpoint(student_ckpt)
    out = SimpleNamespace(root=root, student_ckpt=student_ckpt, teacher_ckpt=tiny_teacher_ckpt, student={})
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", str(student_ckpt), "--format", "hf", "--head", "cls", "--out", str(root / "cls"),
                     "--dataset", "digits", "--license", "mit"]) == 0
    out.cli_stdout = stdout.getvalue()
    out.student["cls"] = root / "cls"
    out.results = {}
    for head in ("dist", "fused"):
        out.results[head] = export_hf(student_ckpt, root / head, head, dataset="digits")
        out.student[head] = root / head
    out.results["teacher"] = export_hf(tiny_teacher_ckpt, root / "teacher", dataset="digits")
    out.teacher = root / "teacher"
    return out


def _probe_image(mode: str, size=(13, 9)) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + (() if mode == "L" else (3,))
    return Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode)


# ------------------------------------------------------------------------------------ export --format hf
@pytest.mark.parametrize("head", ["cls", "dist", "fused"])
def test_student_export_loads_in_timm_with_the_checkpoints_logits_and_transform(trained, head):
    folder = trained.student[head]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    student = load_student(trained.student_ckpt)
    z_cls, z_dist = student_heads(student, X)
    expected = {"cls": z_cls, "dist": z_dist, "fused": (z_cls + z_dist) / 2}[head]
    with torch.no_grad():
        diff = _max_diff(reloaded(X), expected)
    print(f"student --head {head}: timm.create_model('local-dir:...') vs checkpoint, max |logit diff| {diff:.3g}")
    assert diff < 1e-5
    assert not torch.allclose(z_cls, z_dist)  # the heads differ, so the comparison tells them apart

    cfg = json.loads((folder / "config.json").read_text())
    spec = eval_spec_of(student)
    hp = load_weights_file(trained.student_ckpt)["hyper_parameters"]
    assert cfg["architecture"] == "deit_tiny_distilled_patch16_224" and cfg["num_classes"] == 10
    assert cfg["label_names"] == hp["data"]["class_names"]
    assert {k: cfg["model_args"][k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "in_chans")} == \
        dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, in_chans=1)
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["mean"] == spec["mean"] and pcfg["std"] == spec["std"] and pcfg["input_size"] == [1, 8, 8]
    assert pcfg["crop_pct"] == spec["crop_pct"] and pcfg["interpolation"] == spec["interpolation"]
    assert "tag" not in pcfg  # timm's registry tag (fb_in1k) is not true of these weights
    assert cfg["distill"]["head"] == head and cfg["distill"]["checkpoint"]["sha256"] == sha256_of(trained.student_ckpt)

    data_cfg = timm.data.resolve_data_config(model=reloaded)
    image = _probe_image("L")
    theirs, ours = timm.data.create_transform(**data_cfg)(image), build_eval_transform(spec)(image)
    assert theirs.shape == ours.shape == (1, 8, 8) and torch.equal(theirs, ours)


def test_cli_export_prints_the_check_and_the_load_line(trained):
    out = trained.cli_stdout
    folder = trained.student["cls"]
    assert f'load: timm.create_model("local-dir:{folder}", pretrained=True)' in out
    assert "max |diff| 0" in out and f"push: distill push {folder} --repo ORG/NAME" in out


def test_teacher_export_and_a_legacy_stretching_transform(trained, tmp_path):
    reloaded = timm.create_model(f"local-dir:{trained.teacher}", pretrained=True).eval()
    teacher = build_teacher("cifar_resnet10", checkpoint=trained.teacher_ckpt).eval()
    with torch.no_grad():
        diff = _max_diff(reloaded(X), teacher(X))
    print(f"teacher: timm.create_model('local-dir:...') vs checkpoint, max |logit diff| {diff:.3g}")
    assert diff < 1e-5 and trained.results["teacher"].max_diff == diff

    # A checkpoint from before crop_pct was recorded was validated with a stretching Resize((s, s)):
    # exported as timm's `squash` crop, which is that same transform on a non-square image.
    obj = torch.load(trained.teacher_ckpt, map_location="cpu", weights_only=True)
    for key in ("input_crop_pct", "input_interpolation"):
        obj["hyper_parameters"].pop(key)
    legacy = tmp_path / "legacy.ckpt"
    torch.save(obj, legacy)
    export_hf(legacy, tmp_path / "legacy", wandb_link=False)
    cfg = json.loads((tmp_path / "legacy" / "config.json").read_text())["pretrained_cfg"]
    assert cfg["crop_mode"] == "squash"
    model = timm.create_model(f"local-dir:{tmp_path / 'legacy'}", pretrained=True)
    image = _probe_image("L", (20, 8))
    spec = dict(img_size=8, crop_pct=None, interpolation="bilinear", mean=cfg["mean"], std=cfg["std"], in_chans=1)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config(model=model))(image)
    assert torch.allclose(theirs, build_eval_transform(spec)(image), atol=1e-6)


def test_model_card_is_hub_yaml_with_lineage_accuracies_and_command(trained):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained.student["cls"] / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and data["license"] == "mit" and data["datasets"] == ["digits"]
    assert {"image-classification", "knowledge-distillation"} <= set(data["tags"]) and data["metrics"] == ["accuracy"]
    obj = load_weights_file(trained.student_ckpt)
    teacher, metrics = obj["distill_teacher"], obj["distill_run"]["metrics"]
    text = card.text
    assert teacher["sha256"] in text and "`cifar_resnet10`" in text
    for label, key in (("class token", "val/acc_cls"), ("distillation token", "val/acc_dist"),
                       ("fused (`--head fused`", "val/acc"), ("agreement with the teacher", "val/agreement")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
        assert f"{100 * metrics[key]:.2f}%" in row, row
    params = sum(p.numel() for p in load_student(trained.student_ckpt).parameters())
    assert f"{params:,} parameters" in text
    # the command, its paths relative to the run folder (root/student_run) they lie beside
    assert "distill export ../student.ckpt --format hf --head cls --out ../cls" in text and str(trained.root) not in text
    assert "hf-hub:ORG/NAME" in text and "class-token head alone" in text


def test_model_card_results_rows_read_their_own_metrics():
    """Each row of the card's results table shows its own metric: the teacher row the teacher's
    accuracy (`val/acc_teacher`), not the student's; every value distinct, so a row reading another
    metric shows up. A teacher's card reads its top-1 and top-5."""
    from distill.sharing.model_card import _results

    metrics = {"val/acc_cls": 0.11, "val/acc_dist": 0.22, "val/acc": 0.33, "val/acc_top5": 0.44, "val/acc_ema": 0.55,
               "val/agreement": 0.66, "val/acc_teacher": 0.77}
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |")
            for line in _results({"kind": "student", "metrics": metrics}).splitlines() if line.startswith("| ") and "%" in line}
    assert rows == {"class token (`--head cls`)": "11.00%", "distillation token (`--head dist`)": "22.00%",
                    "fused (`--head fused`, DeiT's evaluation)": "33.00%", "fused, top-5": "44.00%",
                    "EMA of the student": "55.00%", "agreement with the teacher (fused vs. teacher argmax)": "66.00%",
                    "teacher": "77.00%"}
    teacher = _results({"kind": "teacher", "metrics": {"val/acc": 0.8, "val/acc_top5": 0.95, "val/acc_teacher": 0.1}})
    assert "| top-1 | 80.00% |" in teacher and "| top-5 | 95.00% |" in teacher and "10.00%" not in teacher


def test_export_writes_nothing_when_refused_or_when_the_check_fails(trained, tmp_path, monkeypatch):
    import distill.sharing.hf_export as hf_export

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier export"):
        export_hf(trained.student_ckpt, taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="a teacher has one head"):
        export_hf(trained.teacher_ckpt, tmp_path / "t", "cls")
    monkeypatch.setattr(hf_export, "MAX_LOGIT_DIFF", -1.0)  # any reload now "differs"
    with pytest.raises(RuntimeError, match="nothing was written"):
        export_hf(trained.student_ckpt, tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no folder, no temporary left
    # a timm whose save_for_hf writes another file: EXPORT_FILES (what push uploads) would miss it
    monkeypatch.setattr(hf_export, "MAX_LOGIT_DIFF", 1e-5)
    save_for_hf = timm.models.save_for_hf

    def save_and_more(model, folder, **kwargs):
        save_for_hf(model, folder, **kwargs)
        (Path(folder) / "open_clip_config.json").write_text("{}")

    monkeypatch.setattr(timm.models, "save_for_hf", save_and_more)
    with pytest.raises(RuntimeError, match="save_for_hf wrote .*open_clip_config.json.*nothing was written"):
        export_hf(trained.student_ckpt, tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` with its bytes (None for a folder): what "left intact" compares."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _fake_hub_clone(folder: Path) -> Path:
    """What `git clone https://huggingface.co/someone/model` leaves: .git, the owner's notes in README.md,
    a config.json and weights that no export of this toolkit wrote."""
    (folder / ".git" / "refs" / "heads").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "refs" / "heads" / "main").write_text("0" * 40 + "\n")
    (folder / "README.md").write_text("# resnet18 digits\n\nMy notes: trained on the night of the 3rd.\n")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    (folder / "model.safetensors").write_bytes(b"not really weights")
    return folder


def test_export_refuses_a_hub_clone_in_one_line_and_leaves_it_intact(trained, tmp_path):
    from distill.commands.main import main

    clone = _fake_hub_clone(tmp_path / "digits-clone")
    before = _tree(clone)
    with pytest.raises(ValueError) as err:
        export_hf(trained.student_ckpt, clone, wandb_link=False)
    message = str(err.value)
    print(message)
    assert "\n" not in message and str(clone) in message and "not an earlier export" in message
    assert ".git/" in message and "README.md" in message and "config.json" in message  # what is in it
    assert _tree(clone) == before  # byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-clone"]  # no temporary or renamed folder left
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(trained.student_ckpt), "--format", "hf", "--out", str(clone)]) == 2
    assert stderr.getvalue().count("\n") == 1 and str(clone) in stderr.getvalue()
    assert _tree(clone) == before and sorted(p.name for p in tmp_path.iterdir()) == ["digits-clone"]
    # the same files without .git (a downloaded snapshot): only names an export writes, but not its record
    snapshot = tmp_path / "snapshot"
    shutil.copytree(clone, snapshot, ignore=shutil.ignore_patterns(".git"))
    before = _tree(snapshot)
    with pytest.raises(ValueError, match="has no distill export record"):
        export_hf(trained.student_ckpt, snapshot, wandb_link=False)
    assert _tree(snapshot) == before


def test_export_replaces_an_earlier_export_but_not_one_holding_a_users_file(trained, tmp_path, monkeypatch):
    import distill.sharing.hf_export as hf_export

    earlier = tmp_path / "earlier"
    shutil.copytree(trained.student["fused"], earlier)
    export_hf(trained.student_ckpt, earlier, "dist", wandb_link=False)  # a re-export over an earlier export
    assert json.loads((earlier / "config.json").read_text())["distill"]["head"] == "dist"
    assert {p.name for p in earlier.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    (earlier / "notes.txt").write_text("mine")
    before = _tree(earlier)
    with pytest.raises(ValueError, match=r"not an earlier export .*notes\.txt"):
        export_hf(trained.student_ckpt, earlier, "cls", wandb_link=False)
    assert _tree(earlier) == before
    # a file that appears while the export is being checked is the user's too: checked again before the move
    (earlier / "notes.txt").unlink()
    check = hf_export._check

    def check_while_the_user_writes(folder, ex):
        (earlier / "notes.txt").write_text("written during the export")
        return check(folder, ex)

    monkeypatch.setattr(hf_export, "_check", check_while_the_user_writes)
    with pytest.raises(ValueError, match=r"not an earlier export .*notes\.txt"):
        export_hf(trained.student_ckpt, earlier, "cls", wandb_link=False)
    assert (earlier / "notes.txt").read_text() == "written during the export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]  # the temporary folder is gone


# ------------------------------------------------------------------------ hf-hub: / local-dir: sources
def test_round_trip_local_dir_as_step2_teacher_and_as_pretrained_student(trained, tmp_path):
    # (a) the exported teacher teaches step 2 through `local-dir:`: the same logits as its checkpoint
    source = f"local-dir:{trained.teacher}"
    L.seed_everything(0)
    module = DistillModule(StudentConfig(**TINY_STUDENT), source, DistillationLoss("hard"))
    original = build_teacher("cifar_resnet10", checkpoint=trained.teacher_ckpt).eval()
    diff = _max_diff(module.teacher(X), original(X))
    print(f"local-dir teacher in step 2 vs its checkpoint: max |logit diff| {diff:.3g}")
    assert diff < 1e-5
    trainer = make_trainer(tmp_path / "a", max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, ImageDataModule("digits", img_size=8, batch_size=32))  # same split: accepted
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    hp = load_weights_file(tmp_path / "a.ckpt")["hyper_parameters"]
    assert hp["teacher"] == source and hp["teacher_sha256"] == sha256_of(trained.teacher / "model.safetensors")
    again = DistillModule.load_from_checkpoint(tmp_path / "a.ckpt")  # the teacher reloads from the folder
    assert _max_diff(again.teacher(X), original(X)) < 1e-5

    # (b) the exported student (fused: both heads as trained) starts a student on another dataset:
    # 3 classes, RGB, 16 px; sizes from config.json, heads new, patch embedding and positions adapted
    L.seed_everything(0)
    data = ImageDataModule("synthetic", img_size=16, batch_size=8, num_samples=48, num_classes_synthetic=3,
                           in_chans_synthetic=3)
    module = DistillModule(StudentConfig(f"local-dir:{trained.student['fused']}", drop_path_rate=0.0),
                           loss=DistillationLoss("none"))
    trainer = make_trainer(tmp_path / "b", max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, data)
    report = module.student.pretrained_report
    assert "head/head_dist new (3 classes, the weights have 10)" in report and "pos_embed 1x18x32->1x66x32" in report
    exported = timm.create_model(f"local-dir:{trained.student['fused']}", pretrained=True)
    assert data.mean == pytest.approx([exported.pretrained_cfg["mean"][0]] * 3)  # the data follows the weights
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    moved = trained.root / "fused_moved"
    trained.student["fused"].rename(moved)  # the checkpoint is self-contained: no folder needed to reload it
    try:
        hp = load_weights_file(tmp_path / "b.ckpt")["hyper_parameters"]
        assert hp["student"]["name"] == "deit_tiny_distilled_patch16_224" and hp["student"]["embed_dim"] == 32
        assert hp["pretrained_from"] == f"local-dir:{trained.student['fused']}"
        assert load_student(tmp_path / "b.ckpt").num_classes == 3
    finally:
        moved.rename(trained.student["fused"])


def test_a_bicubic_teacher_exported_and_reloaded_keeps_its_interpolation(trained, tmp_path):
    """A teacher whose step 1 resized with bicubic: its export records it (timm's pretrained_cfg) and the
    step-2 teacher read back through `local-dir:` resizes the student's batch with bicubic too."""
    from distill import FrozenTeacher

    obj = torch.load(trained.teacher_ckpt, map_location="cpu", weights_only=True)
    obj["hyper_parameters"]["input_interpolation"] = "bicubic"  # what a step 1 with data.interpolation bicubic records
    torch.save(obj, tmp_path / "bicubic.ckpt")
    export_hf(tmp_path / "bicubic.ckpt", tmp_path / "export", wandb_link=False)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]["interpolation"] == "bicubic"
    for source in (tmp_path / "bicubic.ckpt", f"local-dir:{tmp_path / 'export'}"):
        teacher = FrozenTeacher.load(source)
        teacher.adapt_to([0.5], [0.25], 1)
        assert teacher.input.interpolation == "bicubic", source
    # the sha256 the student recorded pins the folder's weights as it pins a file
    with pytest.raises(ValueError, match="has weights with sha256 .* but this run was trained with 000000000000"):
        FrozenTeacher.load(f"local-dir:{tmp_path / 'export'}", expected_sha256="0" * 64)


def test_teacher_module_fine_tunes_from_local_dir_and_its_checkpoint_stands_alone(trained, tmp_path):
    module = TeacherModule(f"local-dir:{trained.teacher}", lr=1e-3)
    data = ImageDataModule("synthetic", img_size=12, batch_size=8, num_samples=32, num_classes_synthetic=4,
                           in_chans_synthetic=3)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, data)
    assert "head.fc new (4 classes, the weights have 10)" in module.model.pretrained_report
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    hp = load_weights_file(tmp_path / "t.ckpt")["hyper_parameters"]
    assert hp["model"] == "cifar_resnet10" and hp["model_kwargs"]["base_width"] == 8
    net = build_teacher("ignored", checkpoint=tmp_path / "t.ckpt")
    assert net.num_classes == 4 and _max_diff(net(torch.zeros(1, 3, 12, 12)), module.model(torch.zeros(1, 3, 12, 12))) == 0


def test_a_source_with_a_weights_file_as_well_is_refused(trained):
    with pytest.raises(ValueError, match=r"model\.student\.pretrained: .* brings its own weights"):
        build_student(f"local-dir:{trained.student['fused']}", pretrained=str(trained.student_ckpt),
                      pretrained_field="model.student.pretrained")
    net = build_student(f"local-dir:{trained.student['fused']}", pretrained=False)  # the architecture alone
    assert net.embed_dim == 32 and not hasattr(net, "pretrained_report")
    with pytest.raises(FileNotFoundError, match=r"model: local-dir:/nowhere: '/nowhere' is not a folder"):
        build_teacher("local-dir:/nowhere")


def test_a_single_head_export_as_a_student_source_says_so_in_one_line(trained):
    import warnings

    def heads_warnings(**kwargs) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_student(f"local-dir:{trained.student[head]}", drop_path_rate=0.0, **kwargs)
        return [str(w.message) for w in caught if "--head fused" in str(w.message)]

    for head in ("cls", "dist"):
        (message,) = heads_warnings()  # the same 10 classes: the exported heads are kept
        print(message)
        assert "\n" not in message and f"--head {head}" in message and str(trained.student[head]) in message
        assert heads_warnings(num_classes=3) == []  # new heads for another task: nothing doubled is kept
        assert heads_warnings(pretrained=False) == []  # the architecture alone
    head = "fused"
    assert heads_warnings() == []


def _fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """The layout huggingface_hub keeps a downloaded repository in (refs/main -> snapshots/<commit>/)."""
    commit = "0" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit)


def test_hf_hub_names_read_the_cache_offline_and_fail_fast_without_it(trained, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "someone/digits-student", trained.student["dist"])
    student = build_student("hf-hub:someone/digits-student", drop_path_rate=0.0).eval()
    expected = student_heads(load_student(trained.student_ckpt), X)[1]
    diff = _max_diff(student(X), expected)  # the export's dist head: the fused output is that head
    print(f"hf-hub (cache) student vs checkpoint dist head: max |logit diff| {diff:.3g}")
    assert diff < 1e-5
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _max_diff(timm.create_model("hf-hub:someone/digits-student", pretrained=True).eval()(X), expected) < 1e-5

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        build_teacher("hf-hub:someone/not-here")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="the Hub cannot be reached") as err:
        build_student("hf-hub:someone/not-here", pretrained_field="model.student.pretrained")
    assert "\n" not in str(err.value) and str(err.value).startswith("model.student.name: hf-hub:someone/not-here")
    assert time.perf_counter() - start < 5  # no 20 s of huggingface_hub retries
    assert len(no_network) == 1  # one probe connection, refused
    no_network.clear()


# ------------------------------------------------------------------------------------------ push
@pytest.fixture
def hub_api(monkeypatch):
    """HfApi.create_repo / upload_folder recorded instead of sent."""
    from huggingface_hub import HfApi, RepoUrl

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):  # records the card as it is at upload time
        card = Path(kwargs["folder_path"]) / "README.md"
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "card": card.read_text(encoding="utf-8")}))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _push(*args: str) -> tuple[int, str]:
    from distill.commands.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["push", *args])
    return code, err.getvalue()


def test_push_without_token_or_network_says_so_in_one_line_and_sends_nothing(trained, tmp_path, monkeypatch,
                                                                            hub_api, no_network):
    from huggingface_hub import constants

    folder = tmp_path / "export"
    shutil.copytree(trained.student["fused"], folder)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, err = _push(str(folder), "--repo", "me/digits")
    assert code == 2 and err.count("\n") == 1 and "no Hugging Face token" in err
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    code, err = _push(str(folder), "--repo", "me/digits")
    assert code == 2 and err.count("\n") == 1 and "the Hugging Face Hub cannot be reached" in err
    assert len(no_network) == 1
    no_network.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = _push(str(folder), "--repo", "me/digits")
    assert code == 2 and "HF_HUB_OFFLINE is set" in err
    code, err = _push(str(folder), "--repo", "not a repo")
    assert code == 2 and "is not a Hub repository id" in err
    (folder / "model.safetensors").unlink()
    code, err = _push(str(folder), "--repo", "me/digits")
    assert code == 2 and "has no model.safetensors" in err
    assert hub_api == [] and no_network == []  # nothing was sent


def test_push_creates_the_repo_then_uploads_the_folder_in_one_commit(trained, tmp_path, monkeypatch, hub_api,
                                                                     no_network):
    import distill.models.sources as sources
    from distill.sharing.hub import push

    folder = tmp_path / "export"
    shutil.copytree(trained.student["fused"], folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(sources, "hub_reachable", lambda: (True, ""))
    pushed = push(folder, "me/digits-student", private=True)
    assert pushed.url == "https://huggingface.co/me/digits-student" and pushed.left_out == []
    assert pushed.uploaded == ["README.md", "config.json", "model.safetensors"]
    (c_name, c_repo, c_kw), (u_name, u_repo, u_kw) = hub_api
    assert (c_name, c_repo, c_kw["private"], c_kw["exist_ok"]) == ("create_repo", "me/digits-student", True, True)
    assert (u_name, u_repo, Path(u_kw["folder_path"])) == ("upload_folder", "me/digits-student", folder)
    # the uploaded card already names the repository (named before the upload, not after it)
    assert 'timm.create_model("hf-hub:me/digits-student", pretrained=True)' in u_kw["card"]
    assert "ORG/NAME" not in u_kw["card"]
    card = (folder / "README.md").read_text()
    assert 'timm.create_model("hf-hub:me/digits-student", pretrained=True)' in card and "ORG/NAME" not in card

    # the real create_repo, with the network gone after the reachability check: one line, no upload
    from huggingface_hub import HfApi

    hub_api.clear()
    monkeypatch.setattr(HfApi, "create_repo", REAL_CREATE_REPO)
    with pytest.raises(ConnectionError, match="the upload to me/digits-student failed .* all or nothing"):
        push(folder, "me/digits-student")
    assert hub_api == [] and no_network  # it tried to connect, and uploaded nothing
    no_network.clear()


def test_push_uploads_only_the_files_an_export_writes_and_names_the_others(trained, tmp_path, monkeypatch,
                                                                          hub_api):
    import distill.models.sources as sources
    from huggingface_hub.utils import filter_repo_objects

    from distill.commands.main import main
    from distill.sharing.hf_export import EXPORT_FILES

    folder = tmp_path / "export"
    shutil.copytree(trained.student["fused"], folder)
    (folder / "recipe.yaml").write_text("seed_everything: 0\n")  # an export file too (runs with a config.yaml)
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "config").write_text("[core]\n")
    (folder / "notes.md").write_text("private notes")
    (folder / "runs" / "checkpoints").mkdir(parents=True)
    (folder / "runs" / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    (folder / "README.md.bak").write_text("an old card")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(sources, "hub_reachable", lambda: (True, ""))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["push", str(folder), "--repo", "me/digits-student"]) == 0
    (_, _, upload), = [c for c in hub_api if c[0] == "upload_folder"]
    # what upload_folder sends: huggingface_hub's own filter over every file under the folder
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    sent = set(filter_repo_objects(files, allow_patterns=upload.get("allow_patterns"),
                                   ignore_patterns=upload.get("ignore_patterns")))
    assert sent == {"config.json", "model.safetensors", "README.md", "recipe.yaml"}
    assert sent <= set(EXPORT_FILES)
    (line,) = [l for l in stdout.getvalue().splitlines() if "left out" in l]
    print(line)
    assert all(name in line for name in (".git/", "notes.md", "runs/", "README.md.bak"))
    assert not any(name in line for name in ("config.json,", "model.safetensors", "recipe.yaml"))


# ------------------------------------------------------------------------------------------- W&B
def test_wandb_log_model_and_export_artifacts_in_the_offline_run_folder(tmp_path, monkeypatch):
    from distill.commands.main import main
    from helpers.wandb_records import finish_and_flush, read_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    root = tmp_path / "run"
    assert main(["fit", "--config", str(REPO / "recipes/digits/teacher.yaml"), "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--model.init_args.model", "cifar_resnet10", "--model.init_args.model_kwargs", "{base_width: 8}",
                 "--logger", "wandb", "--wandb.log_model", "true"]) == 0
    best = next((root / "checkpoints").glob("best-*.ckpt"))
    run_id = load_weights_file(best)["distill_run"]["wandb_id"]
    result = export_hf(best, tmp_path / "export", dataset="digits")
    assert result.wandb and run_id in result.wandb
    finish_and_flush()

    def artifacts(run_dir: Path) -> list:
        (file,) = run_dir.glob("*.wandb")
        return [r.artifact for r in read_records(file) if r.WhichOneof("record_type") == "artifact"]

    first, continued = sorted((root / "wandb").glob(f"offline-run-*-{run_id}"))
    ckpts = artifacts(first)  # log_model true: the best and the last checkpoint, when training ended
    assert {a.name for a in ckpts} == {f"model-{run_id}"} and all(a.type == "model" for a in ckpts)
    best_art = next(a for a in ckpts if "best" in a.aliases)
    (entry,) = best_art.manifest.contents
    staged = Path(entry.local_path)
    assert entry.path == "model.ckpt" and root / "wandb" in staged.parents  # kept with the run, not in ~/.local
    assert staged.read_bytes() == best.read_bytes()
    (export,) = artifacts(continued)  # the export, logged to the same run id
    assert export.name == f"hf-model-{run_id}" and export.run_id == run_id and export.type == "model"
    metadata = json.loads(export.metadata)  # config.json's record: where its metrics were measured too
    assert metadata["metrics_at"] == {"epoch": 0, "global_step": 2} and metadata["global_step"] == 2
    assert {e.path for e in export.manifest.contents} == {"config.json", "model.safetensors", "README.md", "recipe.yaml"}
    assert f"W&B run**: `{run_id}`" in (tmp_path / "export" / "README.md").read_text()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["distill"]["run"]["wandb_id"] == run_id
