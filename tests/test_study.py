"""`distill study` (and tools/reproduce.py, which is that command) end to end on digits with tiny settings, and
its parts with training stood in for: shared claims, resume, teachers keyed on their sha256, the report."""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from distill.commands import study, study_claims, study_report, study_runs, study_variants
from distill.commands.main import main as distill

REPO = Path(__file__).resolve().parent.parent

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--teacher.model.init_args.model", "cifar_resnet10",
        "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32"]


@pytest.mark.slow
def test_study_writes_results_json_markdown_and_plot(tmp_path):
    os.environ["WANDB_MODE"] = "offline"
    out = tmp_path / "study"
    assert study.main([str(REPO / "recipes/digits"), "--seeds", "2", "--out", str(out), *TINY]) == 0

    results = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in results["runs"]} == {"none", "soft", "hard", "token"}
    assert len(results["runs"]) == 8 and sorted({r["seed"] for r in results["runs"]}) == [0, 1]
    assert 0 <= results["teacher"]["val/acc"] <= 1 and results["seconds"] > 0 and results["hardware"]
    rows = {row["row"]: row for row in results["table"]}
    assert len(rows) == 6
    token = [r for r in results["runs"] if r["variant"] == "token"]
    cls_row = rows["distillation token: class head"]
    assert cls_row["mean"] == pytest.approx(sum(r["metrics"]["val/acc_cls"] for r in token) / 2)
    # the variants really differ in how they were trained
    hp = lambda run: torch.load(out / run["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]  # noqa: E731
    by_variant = {r["variant"]: hp(r) for r in results["runs"] if r["seed"] == 0}
    assert by_variant["none"]["loss"]["mode"] == "none" and not by_variant["none"]["student"]["distilled"]
    assert by_variant["soft"]["loss"] == {**by_variant["soft"]["loss"], "mode": "soft", "tau": 3.0, "alpha": 0.1}
    assert by_variant["token"]["student"]["distilled"] and by_variant["token"]["loss"]["mode"] == "hard"

    # every row against the runs it names (the label says which variant and which head)
    expected_rows = {
        "no distillation": ("none", "val/acc"),
        "soft distillation (tau 3, alpha 0.1), no token": ("soft", "val/acc"),
        "hard distillation, no token": ("hard", "val/acc"),
        "distillation token: class head": ("token", "val/acc_cls"),
        "distillation token: distillation head": ("token", "val/acc_dist"),
        "distillation token: both heads fused": ("token", "val/acc"),
    }
    assert list(rows) == list(expected_rows)
    for label, (variant, metric) in expected_rows.items():
        values = [r["metrics"][metric] for r in results["runs"] if r["variant"] == variant]
        assert (rows[label]["variant"], rows[label]["metric"], rows[label]["n"]) == (variant, metric, 2), label
        assert rows[label]["mean"] == pytest.approx(statistics.fmean(values)), label
        assert rows[label]["std"] == pytest.approx(statistics.stdev(values)), label
        assert (rows[label]["min"], rows[label]["max"]) == (min(values), max(values)), label
    # ... and every run against its own folder: its checkpoint, and the re-validation of that checkpoint in its log
    for run in results["runs"]:
        folder = out / "runs" / f"{run['variant']}-seed{run['seed']}"
        assert (out / run["checkpoint"]).parent == folder / "checkpoints"  # recorded relative to the study folder
        revalidation = [r for r in csv.DictReader(open(folder / "metrics.csv")) if r.get("val/acc")][-1]
        for metric in ("val/acc", "val/acc_cls", "val/acc_dist"):
            assert run["metrics"][metric] == pytest.approx(float(revalidation[metric]), abs=1e-6), (folder, metric)

    md = (out / "results.md").read_text()
    assert md.startswith("<!-- regenerate: distill study ")
    assert md.count("\n| ") == 8  # header, separator and 6 rows
    # one validation per run (one epoch): no curves
    assert "samples seen" not in md and not (out / "curves.png").exists()
    for label, row in rows.items():
        assert f"| {label} | {100 * row['mean']:.2f} +- {100 * row['std']:.2f} " \
               f"| {100 * row['min']:.2f} - {100 * row['max']:.2f} | 2 |" in md, label
    assert "+-" in md and "Teacher val accuracy" in md

    with Image.open(out / "results.png") as im:
        assert im.size == (800, 400)
        assert len(set(im.convert("L").getdata())) > 2


def test_report_is_written_again_from_results_json_with_ranges(tmp_path, capsys):
    """--report: results.md (mean +- std and min - max per row) and the table in results.json recomputed from
    the runs in results.json, nothing run; without a results.json, one line saying so."""
    out = tmp_path / "study"
    out.mkdir()
    accs = {"none": [0.50, 0.56, 0.53], "token": [0.61, 0.55]}
    runs = [{"variant": v, "seed": s, "metrics": {"val/acc": a, "val/acc_cls": a - 0.01, "val/acc_dist": a - 0.02}}
            for v, values in accs.items() for s, a in enumerate(values)]
    results = {"recipe": "recipes/digits", "command": "python tools/reproduce.py recipes/digits --seeds 3",
               "hardware": "CPU (1 threads, test)", "score": "last", "seconds": 60.0,
               "teacher": {"val/acc": 0.9, "seconds": 5.0}, "runs": runs, "table": []}
    (out / "results.json").write_text(json.dumps(results))
    assert study.main(["recipes/digits", "--out", str(out), "--report"]) == 0
    assert not (out / "runs").exists()  # nothing was run
    md = (out / "results.md").read_text()
    assert md.startswith("<!-- regenerate: distill study recipes/digits --seeds 3 -->")  # the same command, today's name
    assert "| variant | val top-1 (mean +- std) | min - max | seeds |" in md
    assert "| no distillation | 53.00 +- 3.00 | 50.00 - 56.00 | 3 |" in md
    assert "| distillation token: both heads fused | 58.00 +- 4.24 | 55.00 - 61.00 | 2 |" in md
    assert "| distillation token: class head | 57.00 +- 4.24 | 54.00 - 60.00 | 2 |" in md
    table = json.loads((out / "results.json").read_text())["table"]
    assert [(r["variant"], r["metric"], r["n"]) for r in table] == [
        ("none", "val/acc", 3), ("token", "val/acc_cls", 2), ("token", "val/acc_dist", 2), ("token", "val/acc", 2)]
    assert table[0]["min"] == 0.50 and table[0]["max"] == 0.56
    assert (out / "results.png").stat().st_size > 0
    capsys.readouterr()
    assert distill(["study", "recipes/digits", "--out", str(tmp_path / "none"), "--report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--report needs" in err, err
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_study_resumes_and_runs_the_new_variants(tmp_path):
    """A study interrupted after some runs picks up where it stopped: the teacher and the runs already in
    results.json are kept; the feature-guidance variant reads the recipe's guidance.yaml."""
    os.environ["WANDB_MODE"] = "offline"
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), *TINY, "--student.model.init_args.student.depth", "3"]
    assert study.main([*args, "--seeds", "1", "--variants", "none"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in first["runs"]] == [("none", 0)]
    # a run killed before it finished left its folder, with a checkpoint that is not this study's
    stale = out / "runs" / "none-seed1" / "checkpoints"
    stale.mkdir(parents=True)
    torch.save({"stale": True}, stale / "best-epoch099.ckpt")
    assert study.main([*args, "--seeds", "2", "--variants", "none", "lg"]) == 0
    assert not (stale / "best-epoch099.ckpt").exists()
    second = json.loads((out / "results.json").read_text())
    assert second["teacher"] == first["teacher"]  # not trained again
    assert second["runs"][:1] == first["runs"]  # kept as it was
    assert sorted((r["variant"], r["seed"]) for r in second["runs"]) == [("lg", 0), ("lg", 1), ("none", 0), ("none", 1)]
    hp = {r["variant"]: torch.load(out / r["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]
          for r in second["runs"] if r["seed"] == 1}
    assert hp["lg"]["feature_guidance"]["teacher_layers"] == ["stages.0", "stages.1", "stages.2"]
    assert hp["none"]["feature_guidance"] is None
    assert {row["variant"]: row["n"] for row in second["table"]} == {"none": 2, "lg": 2}


# Each variant's whole loss configuration, as the module docstring (and the README) state it, on top of the
# digits student recipe (hard, alpha 0.5): every field of DistillationLoss, not only the mode.
LOSS_DEFAULTS = dict(mode="hard", alpha=0.5, tau=1.0, kl_reduction="batchmean", label_smoothing=0.0, standardize=False,
                     dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup_epochs=0, dist_beta=1.0, dist_gamma=1.0, ce_reduction="labeled")
VARIANT_LOSS = {
    "none": dict(mode="none"),
    "soft": dict(mode="soft", tau=3.0, alpha=0.1, kl_reduction="deit"),  # DeiT's soft distillation
    "hard": dict(mode="hard", alpha=0.5),
    "token": dict(mode="hard", alpha=0.5),
    "dkd": dict(mode="dkd", tau=4.0, alpha=0.5, dkd_alpha=1.0, dkd_beta=8.0),  # TCKD 1, NCKD 8
    "dist": dict(mode="dist", tau=4.0, alpha=0.5, dist_beta=1.0, dist_gamma=1.0),
    "ls": dict(mode="soft", standardize=True, tau=2.0, alpha=0.9),
    "lg": dict(mode="hard", alpha=0.5),
    "lg_dkd": dict(mode="dkd", tau=4.0, alpha=0.5, dkd_alpha=1.0, dkd_beta=8.0),
    "token_soft": dict(mode="soft", tau=1.0, alpha=0.5),
    "cls_soft": dict(mode="soft", tau=1.0, alpha=0.5),  # token_soft's term on the class token
    "fm": dict(mode="soft", tau=1.0, alpha=1.0),  # Beyer et al.'s function matching: KL at tau 1 alone
    "none_mix": dict(mode="none"),
}
VARIANT_TOKEN = {"none": False, "soft": False, "hard": False, "cls_soft": False, "fm": False, "none_mix": False}  # every other variant has the distillation token


@pytest.mark.parametrize("variant", sorted(study_variants.VARIANTS))
def test_every_variant_resolves_to_its_method(variant):
    from distill import DistillationLoss
    from distill.commands.recipe_cli import DistillCLI

    assert set(VARIANT_LOSS) == set(study_variants.VARIANTS)
    recipe = REPO / "recipes/digits"
    extra = study_runs.guidance_args(recipe) if variant in study_variants.GUIDED else []
    config = DistillCLI.parse_recipe(["--config", str(recipe / "student.yaml"), *extra, *study_variants.VARIANTS[variant]])
    init = config["model"]["init_args"]
    loss = init["loss"] if isinstance(init["loss"], dict) else vars(init["loss"])
    loss = dict(vars(loss["init_args"]) if "init_args" in loss else loss)
    assert loss == {**LOSS_DEFAULTS, **VARIANT_LOSS[variant]}
    assert DistillationLoss(**loss).config() == loss  # a valid loss, built as the module builds it
    assert init["student"]["distilled"] == VARIANT_TOKEN.get(variant, True)
    guidance = init.get("feature_guidance")
    if variant in study_variants.GUIDED:  # the recipe folder's guidance.yaml, as written there
        assert vars(guidance) == dict(student_blocks=[0, 1, 2], teacher_layers=["stages.0", "stages.1", "stages.2"],
                                      weight=2.5)
    else:
        assert guidance is None
    mixed = (config["data"]["mixup"], config["data"]["cutmix"]) == (0.8, 1.0)
    assert mixed == (variant in ("fm", "none_mix"))  # function matching and its baseline mix the images
    if variant == "fm":  # and function matching reads the live teacher on them
        assert init["teacher_cache"] is None


def fake_study(tmp_path, monkeypatch, trained: list, scores: dict | None = None):
    """run_study with a stand-in for training (each run returns at once), to test how workers share a study.
    `scores`, when given, gets each run's `score` argument by run folder name."""
    def run_step(config, args, root, score, resume=None):
        root.mkdir(parents=True, exist_ok=True)
        name = root.name
        trained.append(name)
        if scores is not None:
            scores[name] = score
        (root / "last.ckpt").write_bytes(name.encode())  # the teacher's checkpoint is read (its sha256 keys the runs)
        return str(root / "last.ckpt"), {"val/acc": 0.5, "val/acc_cls": 0.5, "val/acc_dist": 0.5}, 1.0

    monkeypatch.setattr(study_runs, "run_step", run_step)
    (tmp_path / "study").mkdir()
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"x")
    return {"teacher": {"checkpoint": str(teacher), "val/acc": 0.9, "seconds": 5.0}, "runs": [], "seconds": 5.0}


def live_process():
    """Another live process (a sleeping child) and a claim in its name, as `claim_run` writes it."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    claim = {"pid": child.pid, "start": study_claims._start_time(child.pid), "boot": study_claims._boot_id()}
    return child, json.dumps(claim)


def test_workers_sharing_a_study_skip_each_others_runs(tmp_path, monkeypatch):
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    runs = tmp_path / "study" / "runs"
    runs.mkdir()
    child, claim = live_process()
    try:
        # another live process holds none-seed0; its folder must survive
        (runs / "none-seed0.running").write_text(claim)
        (runs / "none-seed0").mkdir()
        # a run saved by another worker meanwhile (of this teacher)
        sha = study_runs.sha256_of(previous["teacher"]["checkpoint"])
        other = [{"variant": "none", "seed": 1, "checkpoint": "x", "seconds": 1.0, "metrics": {"val/acc": 0.4},
                  "teacher_sha256": sha}]
        results = study_runs.run_study(str(REPO / "recipes/digits"), ["none"], 3, runs.parent, [], "cmd", previous=previous,
                                       finished=lambda: other)
    finally:
        child.kill()
    assert trained == ["none-seed2"] and (runs / "none-seed0").is_dir()
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [("none", 2)]
    assert results["held"] and results["held"][0].startswith("none-seed0 ")
    assert not (runs / "none-seed2.running").exists()  # released after the run


def test_a_claim_whose_process_died_is_taken_over(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = tmp_path / "token-seed0.running"
    claim.write_text(dead.stdout.strip())
    assert study_claims.claim_run(claim) and study_claims.claim_owner(claim) == str(os.getpid())
    child, other = live_process()
    try:
        claim.write_text(other)
        assert not study_claims.claim_run(claim)  # held by a live process
    finally:
        child.kill()
        child.wait()
    assert study_claims.claim_run(claim)  # ... until it dies


def test_a_claim_in_this_process_name_from_an_earlier_process_is_taken_over(tmp_path):
    """After a restart a new worker may get the pid that wrote a claim: a claim naming this very pid but
    another boot (or another start time, or the old plain-pid form) is stale, not "alive"."""
    claim = tmp_path / "none-seed0.running"
    me = {"pid": os.getpid(), "start": study_claims._start_time(os.getpid()), "boot": study_claims._boot_id()}
    for stale in (str(os.getpid()), json.dumps({**me, "boot": "another-boot"}), json.dumps({**me, "start": "1"})):
        claim.write_text(stale)
        assert not study_claims.claim_alive(claim), stale
        assert study_claims.claim_run(claim)
    assert study_claims.claim_alive(claim)  # the claim it wrote itself


def test_a_run_saved_between_the_look_and_the_claim_is_not_trained_again(tmp_path, monkeypatch):
    """Worker 2 looks (none-seed0 not done), worker 1 saves it and releases its claim, worker 2 claims:
    worker 2 must see the saved run once it holds the claim, and not train it again."""
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    runs = tmp_path / "study" / "runs"
    sha = study_runs.sha256_of(previous["teacher"]["checkpoint"])
    saved = {"variant": "none", "seed": 0, "checkpoint": "x", "seconds": 1.0, "metrics": {"val/acc": 0.4},
             "teacher_sha256": sha}
    looks = []

    def finished():  # the first look comes before worker 1's save; every later one after it
        looks.append(1)
        return [] if len(looks) == 1 else [saved]

    results = study_runs.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs.parent, [], "cmd", previous=previous,
                                   finished=finished)
    assert trained == [] and len(looks) >= 2 and results["runs"] == []


def test_two_workers_taking_over_one_dead_claim_do_not_both_get_it(tmp_path):
    """Two workers restarted together find the same dead claim; with a delay between looking at it and
    writing their own, exactly one of them holds the run."""
    import multiprocessing

    claim = tmp_path / "none-seed0.running"
    claim.write_text(json.dumps({"pid": 999_999_999, "start": "1", "boot": study_claims._boot_id()}))
    slow_alive = study_claims.claim_alive

    def claim_alive(path):
        alive = slow_alive(path)
        time.sleep(0.5)  # both workers look before either writes
        return alive

    def worker(queue):
        study_claims.claim_alive = claim_alive
        queue.put(study_claims.claim_run(claim))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(queue,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(queue.get(timeout=5) for _ in procs) == [False, True]


def test_a_worker_exits_3_while_another_live_worker_holds_a_run(tmp_path, monkeypatch, capsys):
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    out = tmp_path / "study"
    (out / "results.json").write_text(json.dumps({**previous, "command": "c", "hardware": "h", "score": "best"}))
    (out / "runs").mkdir()
    child, claim = live_process()
    try:
        (out / "runs" / "none-seed0.running").write_text(claim)
        code = study.main([str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "2", "--variants", "none"])
    finally:
        child.kill()
    assert code == 3 and trained == ["none-seed1"]
    assert f"1 run(s) held by other live workers: none-seed0 (process {child.pid})" in capsys.readouterr().err


def fake_teacher_study(tmp_path, monkeypatch, trained: list, contents: list):
    """Fake training where the teacher step writes a checkpoint whose bytes are the next of `contents`."""
    def run_step(config, args, root, score, resume=None):
        root.mkdir(parents=True, exist_ok=True)
        trained.append(root.name)
        ckpt = root / "checkpoints" / "best-epoch009.ckpt"  # the same name for every teacher
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(contents.pop(0) if root.name == "teacher" else b"student")
        return str(ckpt), {"val/acc": 0.5, "val/acc_cls": 0.5, "val/acc_dist": 0.5}, 1.0

    monkeypatch.setattr(study_runs, "run_step", run_step)


def test_a_retrained_teacher_drops_the_runs_of_the_former_one(tmp_path, monkeypatch):
    """The teacher's checkpoint is gone: the teacher is trained again (a checkpoint of the same name) and
    every student is trained again for it; results.json and the run folders hold no run of the former
    teacher, even when a worker that still holds the former teacher saves afterwards."""
    trained = []
    fake_teacher_study(tmp_path, monkeypatch, trained, [b"teacher one", b"teacher two"])
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none", "token"]
    assert study.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert trained == ["teacher", "none-seed0", "token-seed0"]
    old_sha = first["teacher"]["sha256"]
    assert {r["teacher_sha256"] for r in first["runs"]} == {old_sha}

    (out / first["teacher"]["checkpoint"]).unlink()  # recorded relative to the study folder
    assert study.main(args) == 0
    second = json.loads((out / "results.json").read_text())
    assert trained[3:] == ["teacher", "none-seed0", "token-seed0"]  # every student again
    new_sha = second["teacher"]["sha256"]
    assert new_sha != old_sha and second["teacher"]["checkpoint"] == first["teacher"]["checkpoint"]
    assert sorted((r["variant"], r["seed"], r["teacher_sha256"]) for r in second["runs"]) == [
        ("none", 0, new_sha), ("token", 0, new_sha)]
    # a worker that started with the former teacher saves its run now: it does not come back
    stale = {**first, "runs": [{**first["runs"][0], "seed": 5}]}
    merged = study_runs.merge(second, stale, 1.0, out)
    assert merged["teacher"]["sha256"] == new_sha and {r["teacher_sha256"] for r in merged["runs"]} == {new_sha}
    assert (5 not in {r["seed"] for r in merged["runs"]})


def test_folders_of_the_former_teachers_runs_are_removed(tmp_path, monkeypatch):
    trained = []
    fake_teacher_study(tmp_path, monkeypatch, trained, [b"teacher one", b"teacher two"])
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "2", "--variants", "none"]
    assert study.main(args) == 0
    marker = out / "runs" / "none-seed1" / "from-teacher-one"
    marker.write_text("x")
    results = json.loads((out / "results.json").read_text())
    (out / results["teacher"]["checkpoint"]).write_bytes(b"changed")  # changed, not gone: another teacher too
    assert study.main([*args[:-1], "token"]) == 0  # resumed with another variant only
    assert not marker.exists() and not (out / "runs" / "none-seed1").exists() and trained.count("none-seed1") == 1


def test_runs_another_worker_saved_for_another_teacher_do_not_count(tmp_path, monkeypatch):
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    other = [{"variant": "none", "seed": 0, "checkpoint": "x", "seconds": 1.0, "metrics": {"val/acc": 0.4},
              "teacher_sha256": "another teacher"}]
    study_runs.run_study(str(REPO / "recipes/digits"), ["none"], 1, tmp_path / "study", [], "cmd",
                         previous=previous, finished=lambda: other)
    assert trained == ["none-seed0"]


def test_two_workers_saving_keep_each_others_runs_and_add_their_time(tmp_path, monkeypatch):
    """Worker 2 starts and finishes while worker 1 is inside its run: both runs end up in results.json, each
    run once, and the study's time is the sum of both workers' time."""
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    out = tmp_path / "study"
    (out / "results.json").write_text(json.dumps({**previous, "command": "c", "hardware": "h", "score": "best"}))
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none", "token"]
    ticks = iter(range(0, 10_000, 10))  # every perf_counter() call is 10 s later
    monkeypatch.setattr(study_runs.time, "perf_counter", lambda: float(next(ticks)))
    fake = study_runs.run_step

    def run_step(config, step_args, root, score, resume=None):
        if root.name == "none-seed0":  # worker 1's first run: worker 2 comes and goes meanwhile
            assert study.main(args) == 3  # not 0: none-seed0 is still held by worker 1
        return fake(config, step_args, root, score)

    monkeypatch.setattr(study_runs, "run_step", run_step)
    assert study.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(trained) == ["none-seed0", "token-seed0"]  # each run once
    assert sorted((r["variant"], r["seed"]) for r in results["runs"]) == [("none", 0), ("token", 0)]
    assert {row["variant"]: row["n"] for row in results["table"]} == {"none": 1, "token": 1}
    # clock: worker 1 starts at 0; worker 2 starts at 10 and saves at 20 and 30; worker 1 saves at 40 and 50.
    # The study: 5 s from before + 50 s of worker 1 + 20 s of worker 2 (overlapping, as two processes would)
    assert results["seconds"] == pytest.approx(5.0 + 50 + 20)
    assert "summed over the processes" in (out / "results.md").read_text()


def test_score_last_scores_every_run_by_its_last_checkpoint_and_says_so(tmp_path, monkeypatch):
    trained, scores = [], {}
    fake_study(tmp_path, monkeypatch, trained, scores)  # no results.json: the teacher is trained too
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none", "token"]
    assert study.main([*args, "--score", "last"]) == 0
    assert scores == {"teacher": "last", "none-seed0": "last", "token-seed0": "last"}
    assert json.loads((out / "results.json").read_text())["score"] == "last"
    md = (out / "results.md").read_text()
    assert "scored with its last checkpoint" in md and "best checkpoint" not in md


def test_a_study_scored_otherwise_is_not_resumed(tmp_path, monkeypatch):
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    out = tmp_path / "study"
    (out / "results.json").write_text(json.dumps({**previous, "command": "c", "hardware": "h", "score": "best"}))
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none"]
    with pytest.raises(ValueError, match="--score last: the study being resumed scored its runs by their best "
                                         "checkpoint; use the same --score or another --out"):
        study.main([*args, "--score", "last"])
    assert trained == []  # refused before anything ran
    assert study.main(args) == 0 and trained == ["none-seed0"]  # the same score resumes


def test_the_teacher_is_trained_by_one_worker_only(tmp_path, monkeypatch):
    """A study without a teacher: a worker that finds teacher.running held by a live process stops (its
    students would need that teacher); a claim whose process died is taken over and released after."""
    import subprocess
    import sys

    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    runs = tmp_path / "study" / "runs"
    runs.mkdir()
    claim = runs / "teacher.running"
    child, held = live_process()
    try:
        claim.write_text(held)  # a live process trains the teacher
        with pytest.raises(RuntimeError, match=f"process {child.pid} is training this study's teacher"):
            study_runs.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs.parent, [], "cmd")
    finally:
        child.kill()
    assert trained == [] and claim.read_text() == held  # nothing trained, the claim left alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim.write_text(dead.stdout.strip())
    results = study_runs.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs.parent, [], "cmd")
    assert trained == ["teacher", "none-seed0"] and not claim.exists()
    assert results["teacher"]["checkpoint"] == "runs/teacher/last.ckpt"  # relative to the study folder


def test_a_given_teacher_that_changed_starts_the_study_over(tmp_path, monkeypatch):
    """--teacher_ckpt: the students of a teacher file that changed since are trained again, their folders
    removed first; an unchanged file keeps them."""
    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    teacher = tmp_path / "given.ckpt"
    torch.save({"distill_run": {"metrics": {"val/acc": 0.8}}}, teacher)
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none", "--teacher_ckpt",
            str(teacher)]
    assert study.main(args) == 0 and trained == ["none-seed0"]
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"]["given"] and results["teacher"]["val/acc"] == 0.8 and results["runs"][0]["checkpoint"]
    assert study.main(args) == 0 and trained == ["none-seed0"]  # unchanged: nothing to do
    marker = out / "runs" / "none-seed0" / "of-the-first-teacher"
    marker.write_text("x")
    torch.save({"distill_run": {"metrics": {"val/acc": 0.7}}}, teacher)  # another teacher in the same file
    assert study.main(args) == 0 and trained == ["none-seed0", "none-seed0"] and not marker.exists()
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"]["val/acc"] == 0.7 and len(results["runs"]) == 1
    assert results["runs"][0]["teacher_sha256"] == study_runs.sha256_of(teacher)


def test_the_study_itself_drops_the_runs_of_a_changed_given_teacher(tmp_path, monkeypatch):
    """run_study, not only the merge into results.json, keeps a former teacher's runs out: resumed from the
    results of the first teacher with --teacher_ckpt now holding another one, the runs and the table it
    returns hold the new teacher's run alone."""
    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    teacher = tmp_path / "given.ckpt"
    torch.save({"distill_run": {"metrics": {"val/acc": 0.8}}}, teacher)
    runs, recipe = tmp_path / "study" / "runs", str(REPO / "recipes/digits")
    first = study_runs.run_study(recipe, ["none"], 2, runs, [], "cmd", teacher_ckpt=str(teacher))
    assert [(row["variant"], row["n"]) for row in first["table"]] == [("none", 2)]
    torch.save({"distill_run": {"metrics": {"val/acc": 0.7}}}, teacher)  # another teacher in the same file
    new_sha = study_runs.sha256_of(teacher)
    second = study_runs.run_study(recipe, ["none"], 1, runs, [], "cmd", previous=first, teacher_ckpt=str(teacher))
    assert trained == ["none-seed0", "none-seed1", "none-seed0"]
    assert [(r["variant"], r["seed"], r["teacher_sha256"]) for r in second["runs"]] == [("none", 0, new_sha)]
    assert [(row["variant"], row["n"]) for row in second["table"]] == [("none", 1)]
    assert second["teacher"]["sha256"] == new_sha and second["teacher"]["val/acc"] == 0.7


def interrupted_run(tmp_path, monkeypatch, calls: list, recorded_edit=None, after_write=None, step=None, kept=None):
    """A study whose none-seed0 was interrupted after epoch 2 (its last checkpoint, config.yaml and the
    metrics of epochs 0-3 on disk); `recorded_edit(config)` changes the config.yaml it recorded,
    `after_write(config)` runs once the folder is written; `step` trains in place of the default fake;
    `kept` (a dict) receives the study's earlier results as "previous"."""
    previous = fake_study(tmp_path, monkeypatch, [])
    if kept is not None:
        kept["previous"] = previous
    runs = tmp_path / "study" / "runs"
    root = runs / "none-seed0"
    args = [*study_variants.VARIANTS["none"], "--seed_everything", "0", "--model.init_args.teacher",
            previous["teacher"]["checkpoint"]]
    config = study_runs.resolved_recipe(REPO / "recipes/digits/student.yaml", args, root)
    if recorded_edit:
        recorded_edit(config)
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"epoch": 2}, root / "checkpoints" / "last.ckpt")
    (root / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n0,5,1.0,\n0,5,,0.3\n1,10,0.8,\n2,15,0.7,\n"
                                      "2,15,,0.5\n3,20,0.6,\n")  # epoch 3 was under way: the checkpoint is after 2
    if after_write:
        after_write(config)

    def run_step(config, args, root, score, resume=None):
        calls.append((root.name, resume))
        root.mkdir(parents=True, exist_ok=True)
        (root / "metrics.csv").write_text("epoch,step,lr-AdamW,train/loss,val/acc\n3,20,0.1,0.55,\n3,20,,,0.6\n")
        (root / "checkpoints").mkdir(exist_ok=True)
        torch.save({"epoch": 3}, root / "checkpoints" / "last.ckpt")  # training ends by overwriting last.ckpt
        return str(root / "checkpoints" / "last.ckpt"), {"val/acc": 0.6}, 1.0

    monkeypatch.setattr(study_runs, "run_step", step or run_step)
    return study_runs.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs.parent, [], "cmd", previous=previous), root


def test_an_interrupted_run_continues_from_its_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    results, root = interrupted_run(tmp_path, monkeypatch, calls)
    assert calls == [("none-seed0", str(root / "checkpoints" / "last.ckpt"))]
    assert results["runs"][0]["resumed_from_epoch"] == 3
    rows = list(csv.DictReader((root / "metrics.csv").open()))
    assert [(r["epoch"], r["val/acc"]) for r in rows] == [("0", ""), ("0", "0.3"), ("1", ""), ("2", ""), ("2", "0.5"),
                                                          ("3", ""), ("3", "0.6")]  # the lost epoch 3 once, the new one
    assert rows[-2]["lr-AdamW"] == "0.1" and rows[0]["lr-AdamW"] == ""


def test_a_run_interrupted_twice_keeps_the_metrics_of_every_part(tmp_path, monkeypatch):
    """Interrupted after epoch 2, resumed, interrupted again in epoch 4 (after the checkpoint of epoch 3),
    resumed and finished: Lightning starts metrics.csv anew at each resume, so the rows of epochs 0-2
    must survive the second interruption (in metrics.earlier.csv until the run finishes)."""

    class Killed(BaseException):
        pass

    calls = []

    def killed_in_epoch_4(config, args, root, score, resume=None):
        calls.append((root.name, resume))
        (root / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n3,20,0.55,\n3,20,,0.6\n4,25,0.5,\n")
        torch.save({"epoch": 3}, root / "checkpoints" / "last.ckpt")
        raise Killed

    kept = {}
    with pytest.raises(Killed):
        interrupted_run(tmp_path, monkeypatch, calls, step=killed_in_epoch_4, kept=kept)
    root = tmp_path / "study" / "runs" / "none-seed0"
    assert (root / study_runs.EARLIER_METRICS).is_file()

    def finishes(config, args, root, score, resume=None):
        calls.append((root.name, resume))
        (root / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n4,25,0.45,\n4,25,,0.7\n")
        torch.save({"epoch": 4}, root / "checkpoints" / "last.ckpt")
        return str(root / "checkpoints" / "last.ckpt"), {"val/acc": 0.7}, 1.0

    monkeypatch.setattr(study_runs, "run_step", finishes)
    results = study_runs.run_study(str(REPO / "recipes/digits"), ["none"], 1, root.parent.parent, [], "cmd",
                                   previous=kept["previous"])
    assert [c[1] is not None for c in calls] == [True, True]
    rows = list(csv.DictReader((root / "metrics.csv").open()))
    assert [(r["epoch"], r["val/acc"]) for r in rows] == [("0", ""), ("0", "0.3"), ("1", ""), ("2", ""), ("2", "0.5"),
                                                          ("3", ""), ("3", "0.6"), ("4", ""), ("4", "0.7")]
    assert results["runs"][0]["curve"]["val/acc"] == [0.3, 0.5, 0.6]  # the last row is the re-validation
    assert not (root / study_runs.EARLIER_METRICS).exists()


def test_an_interrupted_run_of_another_recipe_starts_over(tmp_path, monkeypatch):
    calls = []

    def edit(config):
        config["model"]["init_args"]["lr"] = 0.123  # the folder's run was trained with another learning rate

    results, root = interrupted_run(tmp_path, monkeypatch, calls, edit)
    assert calls == [("none-seed0", None)] and "resumed_from_epoch" not in results["runs"][0]
    assert not (root / "config.yaml").exists()  # the folder was removed before the run started over


# ------------------------------------------------------------------- a study started by tools/reproduce.py
def old_study(tmp_path, monkeypatch) -> tuple[Path, list[str], dict]:
    """A study folder exactly as the former tools/reproduce.py left it when stopped mid-way, run from
    tmp_path with a relative --out (as the long studies run from the checkout): its teacher, none-seed0
    finished, none-seed1 interrupted after epoch 1 (its claim's process gone), the lock files; results.json
    of that code (no field added since, paths relative to the directory it ran in, its command)."""
    import shlex
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    out = Path("results/semi")
    argv = [str(REPO / "recipes/digits"), "--seeds", "3", "--variants", "none", "--out", str(out),
            "--trainer.max_epochs", "4"]
    runs = out / "runs"
    teacher = runs / "teacher" / "checkpoints" / "best-epoch003.ckpt"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"the study's teacher")
    sha = study_runs.sha256_of(teacher)
    recipe = REPO / "recipes/digits/student.yaml"
    for seed, epochs in ((0, 4), (1, 1)):
        root = runs / f"none-seed{seed}"
        args = ["--trainer.max_epochs", "4", *study_variants.VARIANTS["none"],
                "--seed_everything", str(seed), "--model.init_args.teacher", str(teacher)]
        (root / "checkpoints").mkdir(parents=True)
        (root / "config.yaml").write_text(yaml.safe_dump(study_runs.resolved_recipe(recipe, args, root)))
        torch.save({"epoch": epochs - 1}, root / "checkpoints" / "last.ckpt")
        (root / "metrics.csv").write_text("epoch,step,val/acc\n" + "".join(f"{e},{22 * e + 21},0.{5 + e}\n"
                                                                           for e in range(epochs)))
    (runs / "none-seed0" / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"best")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (runs / "none-seed1.running").write_text(json.dumps({"pid": int(dead.stdout), "start": "12345",
                                                         "boot": study_claims._boot_id()}))
    (runs / "claims.lock").write_text("")
    (out / "results.json.lock").write_text("")
    metrics = {"val/acc": 0.8, "val/acc_cls": 0.8, "val/acc_dist": 0.8}
    results = {"recipe": str(REPO / "recipes/digits"), "command": "python tools/reproduce.py " + shlex.join(argv),
               "hardware": "CPU (1 threads, test)", "score": "best",
               "teacher": {"checkpoint": str(teacher), "sha256": sha, "val/acc": 0.9, "seconds": 30.0,
                           "metrics": {"val/acc": 0.9}},
               "runs": [{"variant": "none", "seed": 0, "checkpoint": str(runs / "none-seed0/checkpoints/best-epoch003.ckpt"),
                         "teacher_sha256": sha, "seconds": 60.0, "metrics": metrics}],
               "seconds": 90.0}
    results["table"] = study_report.table(results["runs"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return out, argv, results


def test_a_study_written_by_the_former_tools_reproduce_resumes_as_it_is(tmp_path, monkeypatch, capsys):
    """The same command given to `distill study`: the finished run and the teacher are kept as they are,
    the interrupted run continues from its last checkpoint (its dead claim taken over), the missing one is
    trained; nothing is said about the command (only its name changed) and no run is trained again."""
    out, argv, before = old_study(tmp_path, monkeypatch)
    calls = []

    def run_step(config, args, root, score, resume=None):
        calls.append((root.name, resume))
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        (root / "checkpoints" / "last.ckpt").write_bytes(root.name.encode())
        return str(root / "checkpoints" / "last.ckpt"), {"val/acc": 0.7, "val/acc_cls": 0.7, "val/acc_dist": 0.7}, 1.0

    monkeypatch.setattr(study_runs, "run_step", run_step)
    assert distill(["study", *argv]) == 0
    err = capsys.readouterr().err
    assert calls == [("none-seed1", str(out / "runs/none-seed1/checkpoints/last.ckpt")), ("none-seed2", None)]
    assert "written by" not in err and "retraining" not in err and "removing" not in err, err
    after = json.loads((out / "results.json").read_text())
    assert after["teacher"] == before["teacher"]  # as recorded: a worker of the former code still finds it
    kept = after["runs"][0]
    assert {k: v for k, v in kept.items() if k != "curve"} == before["runs"][0]
    assert kept["curve"]["samples"] == [(22 * e + 22) * 64 for e in range(3)]  # from its folder; the last row left out
    assert [(r["variant"], r["seed"], r.get("resumed_from_epoch")) for r in after["runs"]] == [
        ("none", 0, None), ("none", 1, 1), ("none", 2, None)]
    assert after["command"] == "distill study " + " ".join(argv)
    assert not (out / "runs" / "none-seed1.running").exists()  # claim taken over, then released


# ---------------------------------------------------------------- finished runs keyed on their recipe
@pytest.mark.slow
def test_a_finished_run_is_trained_again_when_its_recipe_changed_and_kept_when_not(tmp_path, monkeypatch, capsys):
    """Real training. A rerun with --student.trainer.max_epochs 2 after a 1-epoch study trains the run
    again (one line says why) instead of reporting the 1-epoch run under the new command; the same command
    again, or the study as the former tools/reproduce.py recorded it (no field of today), trains nothing.
    The 2-epoch run, validated twice, gets its curve of val/acc against samples seen."""
    import shlex

    os.environ["WANDB_MODE"] = "offline"
    calls = []
    real = study_runs.run_step

    def run_step(config, args, root, score, resume=None):
        calls.append(root.name)
        return real(config, args, root, score, resume=resume)

    monkeypatch.setattr(study_runs, "run_step", run_step)
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none", *TINY]
    assert study.main(args) == 0 and calls == ["teacher", "none-seed0"]
    results = json.loads((out / "results.json").read_text())
    assert "curve" not in results["runs"][0] or len(results["runs"][0]["curve"]["samples"]) == 1
    old = {**results, "command": "python tools/reproduce.py " + shlex.join(args),  # as the former code wrote it
           "teacher": {**results["teacher"], "checkpoint": str(out / results["teacher"]["checkpoint"])},
           "runs": [{**{k: v for k, v in r.items() if k not in ("finished_at", "curve")},
                     "checkpoint": str(out / r["checkpoint"])} for r in results["runs"]]}
    (out / "results.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert study.main(args) == 0 and calls == ["teacher", "none-seed0"]  # nothing trained again
    assert "retraining" not in capsys.readouterr().err

    longer = [*args, "--student.trainer.max_epochs", "2"]
    assert study.main(longer) == 0 and calls[2:] == ["none-seed0"]
    said = [line for line in capsys.readouterr().err.splitlines() if "none-seed0" in line]
    assert said == ["retraining none-seed0: its recipe changed since it was trained (trainer.max_epochs: 1 -> 2)"]
    [run] = json.loads((out / "results.json").read_text())["runs"]
    folder = out / "runs" / "none-seed0"
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    validations = [r for r in csv.DictReader(open(folder / "metrics.csv")) if r.get("val/acc")]
    assert len(validations) == 3  # after each epoch, and the scored checkpoint's after training
    assert run["curve"] == {"samples": [2 * 64, 4 * 64],  # 2 steps of 64 images an epoch
                            "val/acc": [round(float(r["val/acc"]), 6) for r in validations[:2]]}
    md = (out / "results.md").read_text()
    assert "| samples seen | none |" in md and f"| 128 | {100 * run['curve']['val/acc'][0]:.2f} |" in md
    assert (out / "curves.png").stat().st_size > 0
    assert study.main(longer) == 0 and len(calls) == 3  # the new recipe's run is kept


def test_a_rerun_with_more_epochs_trains_the_runs_again(tmp_path, monkeypatch, capsys):
    """Issue 30, item 5: a study run with 1 epoch, then the same command with --student.trainer.max_epochs 30:
    the 1-epoch runs are not reported under the 30-epoch command; each is trained again, with one line
    saying what changed. The 30-epoch command once more trains nothing. (Training stood in for: each run
    writes the config.yaml Lightning would.)"""
    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    fake = study_runs.run_step

    def run_step(config, args, root, score, resume=None):
        result = fake(config, args, root, score)
        if root.name != "teacher":
            recorded = study_runs.resolved_recipe(config, args, root)
            (root / "config.yaml").write_text(yaml.safe_dump(recorded))
        return result

    monkeypatch.setattr(study_runs, "run_step", run_step)
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "2", "--variants", "none",
            "--student.trainer.max_epochs", "1"]
    assert study.main(args) == 0 and trained == ["teacher", "none-seed0", "none-seed1"]
    capsys.readouterr()
    longer = [*args[:-1], "30"]
    assert study.main(longer) == 0 and trained[3:] == ["none-seed0", "none-seed1"]
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retraining")]
    assert said == [f"retraining none-seed{s}: its recipe changed since it was trained (trainer.max_epochs: 1 -> 30)"
                    for s in (0, 1)]
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 and results["command"].endswith("--student.trainer.max_epochs 30")
    for run in results["runs"]:
        folder = out / "runs" / f"none-seed{run['seed']}"
        assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_epochs"] == 30
    assert study.main(longer) == 0 and len(trained) == 5


def test_recipe_changes_leave_out_the_location_and_fields_added_since(tmp_path):
    """What counts as another recipe: any field both sides record with another value, never the run's
    folder or the teacher's path (the teacher is keyed on its sha256); a field the run's config.yaml does
    not record (added to the toolkit or Lightning since) only where this command sets it."""
    import copy

    config = REPO / "recipes/digits/student.yaml"
    args = [*study_variants.VARIANTS["none"], "--seed_everything", "0", "--model.init_args.teacher", "a.ckpt"]
    resolved = study_runs.resolved_recipe(config, args, tmp_path / "a")
    explicit = study_runs.explicit_keys(config, args)
    elsewhere = study_runs.resolved_recipe(config, [*args[:-1], "elsewhere/b.ckpt"], tmp_path / "b")
    assert study_runs.recipe_changes(elsewhere, resolved, explicit) == []
    older = copy.deepcopy(resolved)
    del older["data"]["mixup"], older["trainer"]["barebones"]  # fields a later toolkit or Lightning added
    assert study_runs.recipe_changes(older, resolved, explicit) == []
    mixed_args = [*args, "--data.mixup", "0.8"]
    mixed = study_runs.resolved_recipe(config, mixed_args, tmp_path / "a")
    assert study_runs.recipe_changes(older, mixed, study_runs.explicit_keys(config, mixed_args)) == [
        "data.mixup: (not set) -> 0.8"]
    assert study_runs.recipe_changes(resolved, study_runs.resolved_recipe(config, [*args, "--model.init_args.lr", "0.1"],
                                                                          tmp_path / "a"), explicit) == [
        "model.init_args.lr: 0.002 -> 0.1"]
    guided_args = [*study_runs.guidance_args(REPO / "recipes/digits"), *args]  # a section where there was none
    guided = study_runs.resolved_recipe(config, guided_args, tmp_path / "a")
    changes = study_runs.recipe_changes(resolved, guided, study_runs.explicit_keys(config, guided_args))
    assert changes[0] == "model.init_args.feature_guidance: null -> (not set)" and len(changes) == 4
    assert study_runs.recipe_changes(guided, resolved, explicit)[:1] == [
        "model.init_args.feature_guidance: (not set) -> null"]  # and back, which this command does not set


# ------------------------------------------------------------------------- a crafted checkpoint
class RunsCode:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_crafted_last_checkpoint_is_refused_in_one_line_without_running_it(tmp_path, monkeypatch, capsys):
    """An interrupted run's last.ckpt whose unpickling would run code: the study reads its epoch with
    weights_only=True, so the code never runs; it stops with one line naming the file and trains nothing."""
    calls = []
    marker = tmp_path / "the-checkpoint-ran-code"

    def crafted(config):
        torch.save({"epoch": 2, "payload": RunsCode(marker)}, tmp_path / "study/runs/none-seed0/checkpoints/last.ckpt")

    with pytest.raises(ValueError, match="cannot resume from .*none-seed0/checkpoints/last.ckpt: it holds pickled "
                                         "objects that could run code, refused"):
        interrupted_run(tmp_path, monkeypatch, calls, after_write=crafted)
    assert not marker.exists() and calls == []
    out = tmp_path / "study"
    argv = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none"]
    teacher = {"checkpoint": str(tmp_path / "teacher.ckpt"), "val/acc": 0.9, "seconds": 5.0}  # interrupted_run's
    (out / "results.json").write_text(json.dumps({"teacher": teacher, "runs": [], "seconds": 5.0, "hardware": "h",
                                                  "command": study_report.study_command(argv), "score": "best"}))
    capsys.readouterr()
    assert distill(["study", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err and "remove that run's folder" in err, err
    assert not marker.exists()


# ----------------------------------------------------------------------------------- own variants
def test_an_own_variant_runs_with_its_overrides_and_the_report_says_them(tmp_path, monkeypatch):
    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    seen = {}
    fake = study_runs.run_step

    def run_step(config, args, root, score, resume=None):
        seen[root.name] = args
        return fake(config, args, root, score)

    monkeypatch.setattr(study_runs, "run_step", run_step)
    out = tmp_path / "study"
    overrides = "--model.init_args.loss.alpha 0.3 --student.model.init_args.loss.tau=2"
    assert study.main([str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none",
                       "--variant", f"mine={overrides}"]) == 0
    assert trained == ["teacher", "none-seed0", "mine-seed0"]
    config = study_runs.resolved_recipe(REPO / "recipes/digits/student.yaml", seen["mine-seed0"], out / "runs/mine-seed0")
    loss = config["model"]["init_args"]["loss"]["init_args"]
    assert (loss["alpha"], loss["tau"], loss["mode"]) == (0.3, 2.0, "hard")  # on top of the recipe's student
    results = json.loads((out / "results.json").read_text())
    assert results["own_variants"] == {"mine": overrides}
    assert [(r["row"], r["variant"]) for r in results["table"]] == [("no distillation", "none"),
                                                                     (f"mine ({overrides})", "mine")]
    md = (out / "results.md").read_text()
    assert f"| mine ({overrides}) | 50.00 +- 0.00 |" in md and f"`mine`: `{overrides}`" in md


@pytest.mark.parametrize("argv, said", [
    (["--variant", "token=--model.init_args.loss.alpha 0.3"], "variant 'token' of --variant is a built-in one"),
    (["--variant", "mine"], "cannot read --variant 'mine'"),
    (["--variant", "mine=alpha 0.3"], "variant 'mine': 'alpha' is not an override"),
    (["--variant", "mine=--teacher.trainer.max_epochs 1"], "--teacher.trainer.max_epochs changes the teacher"),
    (["--variant", "mine=--model.init_args.loss.alpha"], "--model.init_args.loss.alpha has no value"),
    (["--variant", "m=--a 1", "--variant", "m=--b 2"], "variant 'm' is defined twice"),
    (["--variants", "none", "nope"], "no variant nope (--variants)"),
    (["--variant", "mine=--model.init_args.loss.nope 1"], "variant mine: model: Option 'nope' is not accepted"),
    (["--seeds", "0"], "a study needs at least one seed"),
], ids=["built-in name", "no overrides", "not an override", "teacher", "no value", "twice", "unknown", "bad field",
        "no seed"])
def test_bad_variants_are_one_line_and_write_nothing(argv, said, tmp_path, monkeypatch, capsys):
    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    out = tmp_path / "fresh"
    assert distill(["study", str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err
    assert trained == [] and not out.exists()


def test_help_says_what_each_variant_changes(capsys):
    with pytest.raises(SystemExit) as done:
        study.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for name, description in study_variants.DESCRIPTIONS.items():
        assert f"{name} {description}" in text, name
    assert "changes: student.distilled true loss.mode dkd loss.tau 4.0 loss.alpha 0.5 loss.dkd_alpha 1.0 " \
           "loss.dkd_beta 8.0 + RECIPE/guidance.yaml" in text  # lg_dkd
    assert '--variant mine="--model.init_args.loss.alpha 0.3' in text


def test_tools_reproduce_is_distill_study(tmp_path, monkeypatch, capsys):
    """`python tools/reproduce.py ARGS` is `distill study ARGS`: the same study, the same errors and help."""
    import subprocess
    import sys

    from conftest import load_tool

    tool = load_tool("reproduce")
    bad = [str(REPO / "recipes/digits"), "--out", str(tmp_path / "s"), "--variant", "token=--x 1"]
    assert tool.main(bad) == 2
    said = capsys.readouterr().err
    assert distill(["study", *bad]) == 2 and capsys.readouterr().err == said
    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    out = tmp_path / "study"
    assert tool.main([str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none"]) == 0
    assert trained == ["teacher", "none-seed0"]
    assert json.loads((out / "results.json").read_text())["command"].startswith("distill study ")
    helps = [subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}).stdout
             for cmd in ([sys.executable, "tools/reproduce.py", "--help"], [sys.executable, "-m", "distill.cli", "study", "--help"])]
    assert helps[0] == helps[1] and helps[0].startswith("usage: distill study")


# -------------------------------------------------------------------------------------------- paths
def test_a_study_records_no_folder_of_the_machine_and_moves_as_a_folder(tmp_path, monkeypatch):
    """Run from tmp_path with absolute paths: results.json and results.md name checkpoints relative to the
    study folder and the command's paths relative to the current directory; a study with its own teacher
    is resumed after its folder moved, with nothing trained again."""
    trained = []
    fake_teacher_study(tmp_path, monkeypatch, trained, [b"teacher one"])
    monkeypatch.chdir(tmp_path)
    given = tmp_path / "teachers" / "given.ckpt"
    given.parent.mkdir()
    torch.save({"distill_run": {"metrics": {"val/acc": 0.8}}}, given)
    out = tmp_path / "studies" / "mine"
    assert study.main(["digits", "--out", str(out), "--seeds", "1", "--variants", "none", "--teacher_ckpt", str(given)]) == 0
    for name in ("results.json", "results.md"):
        assert str(tmp_path) not in (out / name).read_text(), name
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "distill study digits --out studies/mine --seeds 1 --variants none --teacher_ckpt " \
                                 "teachers/given.ckpt"
    assert results["recipe"] == "digits"
    assert results["teacher"]["checkpoint"] == "../../teachers/given.ckpt"
    assert results["runs"][0]["checkpoint"] == "runs/none-seed0/checkpoints/best-epoch009.ckpt"
    assert "--teacher_ckpt: ../../teachers/given.ckpt, from this folder" in (out / "results.md").read_text()

    assert study.main(["digits", "--out", "a/study", "--seeds", "1", "--variants", "none"]) == 0
    assert trained == ["none-seed0", "teacher", "none-seed0"]
    (tmp_path / "a").rename(tmp_path / "b")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert study.main(["digits", "--out", "../b/study", "--seeds", "1", "--variants", "none"]) == 0
    assert trained == ["none-seed0", "teacher", "none-seed0"]  # the moved study's teacher and run kept


def test_report_rewrites_the_paths_of_the_machine_the_study_ran_on(tmp_path, monkeypatch, capsys):
    """A results.json of the former code, from another checkout: absolute paths of that machine (the given
    teacher made absolute, a run's checkpoint) and paths relative to the directory it ran in. `--report`
    writes them relative to the study folder, and the command in today's form."""
    monkeypatch.chdir(tmp_path)
    out = Path("results/x/short")
    out.mkdir(parents=True)
    elsewhere = "/home/someone/checkout"
    teacher = "results/x/runs/teacher/checkpoints/last.ckpt"
    metrics = {"val/acc": 0.5, "val/acc_cls": 0.5, "val/acc_dist": 0.5}
    results = {"recipe": "recipes/x", "hardware": "CPU (1 threads, test)", "score": "last", "seconds": 60.0,
               "command": f"python tools/reproduce.py recipes/x --teacher_ckpt {teacher} --seeds 1 --out {out}",
               "teacher": {"checkpoint": f"{elsewhere}/{teacher}", "sha256": "s", "val/acc": 0.8, "seconds": 0.0,
                           "metrics": {}, "given": True},
               "runs": [{"variant": "none", "seed": 0, "checkpoint": f"{out}/runs/none-seed0/checkpoints/last.ckpt",
                         "metrics": metrics, "teacher_sha256": "s", "seconds": 1.0},
                        {"variant": "token", "seed": 0, "checkpoint": f"{elsewhere}/{out}/runs/token-seed0/checkpoints/"
                         "last.ckpt", "metrics": metrics, "teacher_sha256": "s", "seconds": 1.0}]}
    (out / "results.json").write_text(json.dumps(results))
    assert distill(["study", "recipes/x", "--out", str(out), "--report"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["teacher"]["checkpoint"] == "../runs/teacher/checkpoints/last.ckpt"
    assert [r["checkpoint"] for r in after["runs"]] == ["runs/none-seed0/checkpoints/last.ckpt",
                                                       "runs/token-seed0/checkpoints/last.ckpt"]
    assert after["command"] == f"distill study recipes/x --teacher_ckpt {teacher} --seeds 1 --out {out}"
    assert {k: v for k, v in after.items() if k not in ("teacher", "runs", "command", "table")} == \
        {k: v for k, v in results.items() if k not in ("teacher", "runs", "command")}
    for name in ("results.json", "results.md"):
        assert elsewhere not in (out / name).read_text(), name
    assert "--teacher_ckpt: ../runs/teacher/checkpoints/last.ckpt, from this folder" in (out / "results.md").read_text()

    # while a worker runs (maybe of the former code, which finds the teacher by its recorded path), that path stays
    (out / "results.json").write_text(json.dumps(results))
    child, claim = live_process()
    try:
        (out / "runs").mkdir()
        (out / "runs" / "none-seed1.running").write_text(claim)
        capsys.readouterr()
        assert distill(["study", "recipes/x", "--out", str(out), "--report"]) == 0
    finally:
        child.kill()
    after = json.loads((out / "results.json").read_text())
    assert after["teacher"]["checkpoint"] == results["teacher"]["checkpoint"]
    assert after["runs"][1]["checkpoint"] == "runs/token-seed0/checkpoints/last.ckpt"
    assert "keeping the teacher's path as recorded while workers run (none-seed1.running)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- curves
def test_a_run_curve_is_val_acc_against_samples_seen(tmp_path):
    """Samples seen = optimizer steps x global batch (batch per device x devices x nodes x accumulation);
    a validation logged at step S came after S + 1 steps; the last row (the scored checkpoint validated
    again after training) is not a point of the curve."""
    folder = tmp_path / "none-seed0"
    folder.mkdir()
    (folder / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n0,5,1.0,\n0,9,,0.25\n1,15,0.9,\n1,19,,0.5\n"
                                        "2,20,,0.5\n")
    config = {"data": {"batch_size": 32}, "trainer": {"devices": 2, "num_nodes": 1, "accumulate_grad_batches": 2,
                                                       "accelerator": "cpu"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert study_report.read_curve(folder) == {"samples": [10 * 128, 20 * 128], "val/acc": [0.25, 0.5]}
    for devices, count in (([0, 1, 2], 3), ("0,1", 2), ("4", 4), ("auto", 1), (-1, 1)):
        assert study_report.global_batch({**config, "trainer": {"devices": devices, "accelerator": "cpu"}}) == 32 * count


def test_the_report_draws_accuracy_against_samples_seen_over_seeds(tmp_path):
    """Variants whose runs were validated more than once: a table of the mean over seeds at each sample
    count in results.md, and curves.png (mean with the min - max band); a variant validated once is left out."""
    out = tmp_path / "study"
    out.mkdir()
    curve = lambda *accs: {"samples": [1000 * (i + 1) for i in range(len(accs))], "val/acc": list(accs)}  # noqa: E731
    metrics = lambda a: {"val/acc": a, "val/acc_cls": a, "val/acc_dist": a}  # noqa: E731
    runs = [{"variant": "none", "seed": 0, "metrics": metrics(0.5), "curve": curve(0.2, 0.4, 0.5)},
            {"variant": "none", "seed": 1, "metrics": metrics(0.6), "curve": curve(0.3, 0.5)},  # stopped early
            {"variant": "fm", "seed": 0, "metrics": metrics(0.7), "curve": curve(0.1, 0.7)},
            {"variant": "token", "seed": 0, "metrics": metrics(0.6), "curve": curve(0.6)}]
    (out / "results.json").write_text(json.dumps({
        "recipe": "recipes/digits", "command": "distill study recipes/digits", "hardware": "CPU (1 threads, test)",
        "score": "last", "seconds": 60.0, "teacher": {"val/acc": 0.9, "seconds": 5.0}, "runs": runs}))
    assert study.main(["recipes/digits", "--out", str(out), "--report"]) == 0
    md = (out / "results.md").read_text()
    assert "| samples seen | none | fm |\n| --- | --- | --- |\n| 1,000 | 25.00 | 10.00 |\n| 2,000 | 45.00 | 70.00 |\n" \
           "| 3,000 | 50.00 | - |\n" in md
    with Image.open(out / "curves.png") as im:
        assert im.size == (800, 450) and len(set(im.convert("L").getdata())) > 2
    curves = study_report.curves_by_variant(json.loads((out / "results.json").read_text()))
    assert curves == {"none": {1000: [0.2, 0.3], 2000: [0.4, 0.5], 3000: [0.5]}, "fm": {1000: [0.1], 2000: [0.7]}}


def test_saving_keeps_of_one_run_the_one_finished_last(tmp_path):
    """A run trained again (its recipe changed) replaces the entry on disk, and a worker still holding the
    former entry does not bring it back; entries from before `finished_at` count as the oldest."""
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"t")
    sha = study_runs.sha256_of(teacher)
    entry = lambda acc, **extra: {"variant": "none", "seed": 0, "teacher_sha256": sha, "metrics": {"val/acc": acc},  # noqa: E731
                                  **extra}
    base = {"command": "c", "seconds": 1.0, "teacher": {"checkpoint": str(teacher), "sha256": sha}}
    old, new = {**base, "runs": [entry(0.5)]}, {**base, "runs": [entry(0.7, finished_at=2.0)]}
    assert study_runs.merge(old, new, 0.0, tmp_path)["runs"] == new["runs"]
    assert study_runs.merge(new, old, 0.0, tmp_path)["runs"] == new["runs"]
    newer = {**base, "runs": [entry(0.6, finished_at=3.0)]}
    assert study_runs.merge(new, newer, 0.0, tmp_path)["runs"] == newer["runs"]


# ------------------------------------------------------------------------------ --progress: runs not finished
def test_progress_reports_the_unfinished_runs_as_far_as_they_got(tmp_path, capsys):
    """A study with one finished run (in results.json) and one resumed twice and interrupted (its metrics
    split between metrics.earlier.csv and metrics.csv, its claim left by a dead process): --progress writes
    progress.md with the unfinished run alone, the steps of its last checkpoint, every validation so far
    (from both files) and no live worker; it trains nothing."""
    out = tmp_path / "study"
    runs = out / "runs"
    config = {"trainer": {"max_steps": 100, "accelerator": "cpu", "devices": 1},
              "data": {"class_path": "distill.ImageDataModule", "init_args": {"batch_size": 16}}}
    for name in ("none-seed0", "kl-seed0"):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "config.yaml").write_text(yaml.safe_dump(config))
    (out / "results.json").write_text(json.dumps({"runs": [{"variant": "none", "seed": 0, "metrics": {}}]}))
    torch.save({"epoch": 5, "global_step": 60}, runs / "kl-seed0" / "checkpoints" / "last.ckpt")
    (runs / "kl-seed0" / study_runs.EARLIER_METRICS).write_text("epoch,step,val/acc\n1,19,0.25\n3,39,0.5\n")
    (runs / "kl-seed0" / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n4,45,0.9,\n5,59,,0.625\n6,61,0.8\n")
    (runs / "kl-seed0.running").write_text(json.dumps({"pid": 2 ** 22 + 7, "boot": "another boot"}))

    assert distill(["study", str(REPO / "recipes/digits"), "--out", str(out), "--progress"]) == 0
    text = (out / "progress.md").read_text()
    assert capsys.readouterr().out == text
    assert "none-seed0" not in text and "--progress" in text.splitlines()[1]
    assert "| kl-seed0 | 60 steps (960 samples) | 100 steps (1,600 samples) | none (resume" in text
    assert [line for line in text.splitlines() if line.startswith("| 320 ")] == ["| 320 | 25.00 |"]
    assert "| 640 | 50.00 |" in text and "| 960 | 62.50 |" in text
    assert not any(p.name.endswith(".ckpt") and p.name != "last.ckpt" for p in runs.rglob("*"))


def test_progress_without_a_study_is_a_one_line_error(tmp_path, capsys):
    assert distill(["study", str(REPO / "recipes/digits"), "--out", str(tmp_path / "nothing"), "--progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err
