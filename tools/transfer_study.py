"""Transfer study: does starting from pretrained weights pay off when distilling on a small new task?

    python tools/transfer_study.py --seeds 0 1 2 --out results/transfer

Per seed:
1. pretraining on digits 0-4 (8x8 px, ~700 training images): a CNN teacher (CE), then a DeiT-style
   student with a distillation token, hard-distilled from it;
2. the new task: digits 5-9 with 20 training images per class (a new draw per seed), upsampled to
   16 px, scored on all the other images of 5-9 (~800). A teacher is fine-tuned from scratch and from
   the step-1 weights of 1.; then a student is distilled from each teacher, from scratch and from the
   student weights of 1. (2 x 2). The classes differ (5-9 vs 0-4), so every head is new; the student's
   position embeddings are resampled from a 4x4 to an 8x8 patch grid (16 px, patch 2).

The same optimiser settings for both routes; the pretrained student adds layer-wise lr decay 0.75,
as recipes/transfer does. Accuracy is the last epoch's (no checkpoint selected on the scored images).
Writes OUT/results.json (every run), OUT/results.md (mean +- std and min - max over the seeds, command,
hardware) and OUT/results.png; `--report` writes the last two again from results.json, running nothing.
Data and checkpoints go to --work (git-ignored runs/ by default).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from distill import DistillationLoss, DistillModule, ImageDataModule, StudentConfig, TeacherModule

from distill.commands.study_report import bar_chart, hardware, mean_std, row_stats

TEACHER = dict(model="cifar_resnet10", model_kwargs={"base_width": 16}, lr=2e-3, weight_decay=0.05, warmup_epochs=1,
               label_smoothing=0.1)
STUDENT = dict(name="deit_tiny_distilled_patch16_224", embed_dim=64, depth=4, num_heads=4, drop_path_rate=0.0)
PATCH = dict(pretrain=2, new=4)  # 8 px / 2 = 16 px / 4: the same 4x4 grid, timm resamples the patch embedding
STUDENT_OPT = dict(lr=2e-3, weight_decay=0.05, warmup_epochs=3)
LOSS = dict(mode="hard", alpha=0.5)
PRE_EPOCHS = dict(teacher=15, student=40)
NEW_EPOCHS = dict(teacher=30, student=50)
SHOTS, NEW_SIZE = 20, 16


# ------------------------------------------------------------------------------------------------ data
def write_folders(work: Path, seed: int) -> tuple[Path, Path]:
    """digits 0-4 (80/20 split, fixed) and digits 5-9 (SHOTS per class to train, a draw per seed; the
    rest to score) as image folders."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    pre, new = work / "data" / "digits0-4", work / "data" / f"digits5-9-{SHOTS}shot-seed{seed}"
    if not pre.is_dir():
        rng = np.random.default_rng(1234)
        for c in range(5):
            idx = rng.permutation(np.flatnonzero(d.target == c))
            cut = int(0.8 * len(idx))
            _save(pre / "train" / str(c), images[idx[:cut]])
            _save(pre / "val" / str(c), images[idx[cut:]])
    if not new.is_dir():
        rng = np.random.default_rng(seed)
        for c in range(5, 10):
            idx = rng.permutation(np.flatnonzero(d.target == c))
            _save(new / "train" / str(c), images[idx[:SHOTS]])
            _save(new / "val" / str(c), images[idx[SHOTS:]])
    return pre, new


def _save(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")


# ----------------------------------------------------------------------------------------------- runs
def fit(module: L.LightningModule, dm: ImageDataModule, epochs: int, root: Path) -> tuple[Path, float, float]:
    """Trains `epochs` epochs, validates once at the end; (checkpoint, val/acc, seconds)."""
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=epochs, default_root_dir=str(root))
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, float(trainer.callback_metrics["val/acc"]), seconds


def data(root: Path, size: int, batch: int) -> ImageDataModule:
    return ImageDataModule("imagefolder", root=str(root), img_size=size, batch_size=batch, crop="pad",
                           num_workers=0, persistent_workers=False)


def run_seed(seed: int, work: Path, log) -> list[dict]:
    pre, new = write_folders(work, seed)
    out = work / f"seed{seed}"
    runs = []

    def record(**row):
        runs.append(row)
        log(row)

    # 1. pretraining on digits 0-4
    L.seed_everything(seed, workers=True)
    t_pre, acc, s = fit(TeacherModule(**TEACHER), data(pre, 8, 64), PRE_EPOCHS["teacher"], out / "pre-teacher")
    record(seed=seed, stage="pretrain", model="teacher", init="scratch", teacher=None, val_acc=acc, seconds=round(s, 1),
           checkpoint=str(t_pre))
    L.seed_everything(seed, workers=True)
    module = DistillModule(StudentConfig(**STUDENT, patch_size=PATCH["pretrain"]), teacher=str(t_pre),
                           loss=DistillationLoss(**LOSS), **STUDENT_OPT)
    s_pre, acc, s = fit(module, data(pre, 8, 64), PRE_EPOCHS["student"], out / "pre-student")
    record(seed=seed, stage="pretrain", model="student", init="scratch", teacher="pretrain", val_acc=acc,
           seconds=round(s, 1), checkpoint=str(s_pre))

    # 2. the new task: teachers, then students from each teacher
    teachers = {}
    for init, pretrained in (("scratch", None), ("pretrained", str(t_pre))):
        L.seed_everything(seed, workers=True)
        ckpt, acc, s = fit(TeacherModule(**TEACHER, pretrained=pretrained), data(new, NEW_SIZE, 20),
                           NEW_EPOCHS["teacher"], out / f"new-teacher-{init}")
        teachers[init] = ckpt
        record(seed=seed, stage="transfer", model="teacher", init=init, teacher=None, val_acc=acc,
               seconds=round(s, 1), checkpoint=str(ckpt))
    for teacher_init, teacher_ckpt in teachers.items():
        for init, pretrained in (("scratch", None), ("pretrained", str(s_pre))):
            L.seed_everything(seed, workers=True)
            extra = dict(layer_decay=0.75) if pretrained else {}
            module = DistillModule(StudentConfig(**STUDENT, patch_size=PATCH["new"], pretrained=pretrained),
                                   teacher=str(teacher_ckpt),
                                   loss=DistillationLoss(**LOSS), **STUDENT_OPT, **extra)
            ckpt, acc, s = fit(module, data(new, NEW_SIZE, 20), NEW_EPOCHS["student"],
                               out / f"new-student-{init}-teacher-{teacher_init}")
            record(seed=seed, stage="transfer", model="student", init=init, teacher=teacher_init, val_acc=acc,
                   seconds=round(s, 1), checkpoint=str(ckpt))
    return runs


# ---------------------------------------------------------------------------------------------- report
ROWS = [  # (label, model, init, teacher)
    ("teacher from scratch", "teacher", "scratch", None),
    ("teacher pretrained (0-4), fine-tuned", "teacher", "pretrained", None),
    ("student from scratch, teacher from scratch", "student", "scratch", "scratch"),
    ("student from scratch, pretrained teacher", "student", "scratch", "pretrained"),
    ("student pretrained, teacher from scratch", "student", "pretrained", "scratch"),
    ("student pretrained, pretrained teacher (the pretrained route)", "student", "pretrained", "pretrained"),
]


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for label, model, init, teacher in ROWS:
        accs = [r["val_acc"] for r in runs if r["stage"] == "transfer" and r["model"] == model and r["init"] == init
                and r["teacher"] == teacher]
        rows.append(dict(row=label, model=model, init=init, teacher=teacher, **row_stats(accs)))
    return rows


def write_markdown(results: dict, path: Path) -> None:
    pre = {m: mean_std([r["val_acc"] for r in results["runs"] if r["stage"] == "pretrain" and r["model"] == m])
           for m in ("teacher", "student")}
    lines = [
        f"<!-- regenerate: {results['command']} -->",
        f"Command: `{results['command']}`",
        "",
        f"Hardware: {results['hardware']}; wall time {results['seconds'] / 60:.1f} min for the whole study.",
        "",
        f"Task: digits 5-9 with {SHOTS} training images per class (a new draw per seed), upsampled to {NEW_SIZE} px, "
        f"scored on the other {results['val_images']} images of 5-9. Pretraining: digits 0-4 at 8 px "
        f"(~{results['pretrain_images']} training images; val top-1 teacher {100 * pre['teacher'][0]:.2f} +- "
        f"{100 * pre['teacher'][1]:.2f}, student {100 * pre['student'][0]:.2f} +- {100 * pre['student'][1]:.2f}).",
        "",
        "| digits 5-9, 20 images per class | val top-1 (mean +- std) | min - max | seeds |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["table"]:
        lines.append(f"| {row['row']} | {100 * row['mean']:.2f} +- {100 * row['std']:.2f} "
                     f"| {100 * row['min']:.2f} - {100 * row['max']:.2f} | {row['n']} |")
    lines += [
        "",
        f"Gain of the pretrained route (student and teacher pretrained) over from scratch (both from scratch): "
        f"{100 * (results['table'][5]['mean'] - results['table'][2]['mean']):+.2f} points for the student; "
        f"pretrained teacher vs teacher from scratch: {100 * (results['table'][1]['mean'] - results['table'][0]['mean']):+.2f}.",
        "",
        f"Teacher: {TEACHER['model']} (base width {TEACHER['model_kwargs']['base_width']}), pretraining "
        f"{PRE_EPOCHS['teacher']} epochs, new task {NEW_EPOCHS['teacher']} epochs, AdamW lr {TEACHER['lr']}. Student: "
        f"DeiT-style ViT (width 64, depth 4, 4 heads, patch {PATCH['pretrain']} at 8 px, {PATCH['new']} at "
        f"{NEW_SIZE} px) with a distillation token, hard distillation (alpha 0.5), pretraining {PRE_EPOCHS['student']} "
        f"epochs, new task {NEW_EPOCHS['student']} epochs, AdamW lr {STUDENT_OPT['lr']}; the pretrained student adds "
        "layer-wise lr decay 0.75. Pretrained = initialised from the digits 0-4 weights through `pretrained` (every "
        "head new: other classes; the student's patch embedding resampled by timm from 2x2 to 4x4). Batch 20 on the "
        "new task, random 2-pixel shifts. Accuracy of the last epoch, no checkpoint selection. Every run is in "
        "results.json next to this file.",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    labels = ["teacher\nscratch", "teacher\npretrained", "student scratch\nteacher scratch",
              "student scratch\nteacher pretr.", "student pretr.\nteacher scratch", "student pretr.\nteacher pretr."]
    colors = ["#bdbdbd", "#636363", "#fdd0a2", "#fdae6b", "#6baed6", "#08519c"]
    bar_chart(path, results["table"], labels, colors,
              f"Digits 5-9, {SHOTS} images per class: from scratch vs pretrained on digits 0-4", margin=10, top=104)


def report(out: Path) -> int:
    """--report: the report written again from the runs in results.json (after a change to its format)."""
    path = out / "results.json"
    if not path.is_file():
        print(f"transfer_study.py: error: --report needs {path}; run the study first (or pass its --out)", file=sys.stderr)
        return 2
    write_report(json.loads(path.read_text()), out)
    return 0


def write_report(results: dict, out: Path) -> None:
    """The table derived from the runs, then OUT/results.json, results.md and results.png."""
    results["table"] = table(results["runs"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md")
    write_plot(results, out / "results.png")
    print((out / "results.md").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="results/transfer")
    parser.add_argument("--work", default="runs/transfer_study", help="data and checkpoints (git-ignored)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared CPU)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: rewrite OUT/results.md and OUT/results.png (and the table in "
                             "results.json) from the runs in OUT/results.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    if args.report:
        return report(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        runs += run_seed(seed, work, lambda row: print(json.dumps({k: v for k, v in row.items() if k != "checkpoint"}),
                                                       flush=True))
    pre, new = write_folders(work, args.seeds[0])
    results = {
        "command": "python tools/transfer_study.py " + shlex.join(argv),
        "hardware": hardware(),
        "pretrain_images": sum(1 for _ in (pre / "train").rglob("*.png")),
        "val_images": sum(1 for _ in (new / "val").rglob("*.png")),
        "settings": dict(teacher=TEACHER, student=STUDENT, patch=PATCH, student_opt=STUDENT_OPT, loss=LOSS, pre_epochs=PRE_EPOCHS,
                         new_epochs=NEW_EPOCHS, shots=SHOTS, new_size=NEW_SIZE, pretrained_layer_decay=0.75),
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_report(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
