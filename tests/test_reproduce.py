"""tools/reproduce.py end to end on digits with tiny settings."""
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

from conftest import load_tool

REPO = Path(__file__).resolve().parent.parent
reproduce = load_tool("reproduce")

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--teacher.model.init_args.model", "cifar_resnet10",
        "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32"]


@pytest.mark.slow
def test_reproduce_writes_results_json_markdown_and_plot(tmp_path):
    os.environ["WANDB_MODE"] = "offline"
    out = tmp_path / "study"
    assert reproduce.main([str(REPO / "recipes/digits"), "--seeds", "2", "--out", str(out), *TINY]) == 0

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
    hp = lambda run: __import__("torch").load(run["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]  # noqa: E731
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
        assert Path(run["checkpoint"]).parent == folder / "checkpoints"
        revalidation = [r for r in csv.DictReader(open(folder / "metrics.csv")) if r.get("val/acc")][-1]
        for metric in ("val/acc", "val/acc_cls", "val/acc_dist"):
            assert run["metrics"][metric] == pytest.approx(float(revalidation[metric]), abs=1e-6), (folder, metric)

    md = (out / "results.md").read_text()
    assert md.startswith("<!-- regenerate: python tools/reproduce.py ")
    assert md.count("\n| ") == 8  # header, separator and 6 rows
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
    assert reproduce.main(["recipes/digits", "--out", str(out), "--report"]) == 0
    assert not (out / "runs").exists()  # nothing was run
    md = (out / "results.md").read_text()
    assert md.startswith("<!-- regenerate: python tools/reproduce.py recipes/digits --seeds 3 -->")
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
    assert reproduce.main(["recipes/digits", "--out", str(tmp_path / "none"), "--report"]) == 2
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
    assert reproduce.main([*args, "--seeds", "1", "--variants", "none"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in first["runs"]] == [("none", 0)]
    # a run killed before it finished left its folder, with a checkpoint that is not this study's
    stale = out / "runs" / "none-seed1" / "checkpoints"
    stale.mkdir(parents=True)
    torch.save({"stale": True}, stale / "best-epoch099.ckpt")
    assert reproduce.main([*args, "--seeds", "2", "--variants", "none", "lg"]) == 0
    assert not (stale / "best-epoch099.ckpt").exists()
    second = json.loads((out / "results.json").read_text())
    assert second["teacher"] == first["teacher"]  # not trained again
    assert second["runs"][:1] == first["runs"]  # kept as it was
    assert sorted((r["variant"], r["seed"]) for r in second["runs"]) == [("lg", 0), ("lg", 1), ("none", 0), ("none", 1)]
    hp = {r["variant"]: torch.load(r["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]
          for r in second["runs"] if r["seed"] == 1}
    assert hp["lg"]["feature_guidance"]["teacher_layers"] == ["stages.0", "stages.1", "stages.2"]
    assert hp["none"]["feature_guidance"] is None
    assert {row["variant"]: row["n"] for row in second["table"]} == {"none": 2, "lg": 2}


# Each variant's whole loss configuration, as the module docstring (and the README) state it, on top of the
# digits student recipe (hard, alpha 0.5): every field of DistillationLoss, not only the mode.
LOSS_DEFAULTS = dict(mode="hard", alpha=0.5, tau=1.0, kl_reduction="batchmean", label_smoothing=0.0, standardize=False,
                     dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup_epochs=0, dist_beta=1.0, dist_gamma=1.0)
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
    "fm": dict(mode="soft", tau=1.0, alpha=1.0),  # Beyer et al.'s function matching: KL at tau 1 alone
    "none_mix": dict(mode="none"),
}
VARIANT_TOKEN = {"none": False, "soft": False, "hard": False, "fm": False, "none_mix": False}  # every other variant has the distillation token


@pytest.mark.parametrize("variant", sorted(reproduce.VARIANTS))
def test_every_variant_resolves_to_its_method(variant):
    from distill import DistillationLoss
    from distill.commands.recipe_cli import DistillCLI

    assert set(VARIANT_LOSS) == set(reproduce.VARIANTS)
    recipe = REPO / "recipes/digits"
    extra = reproduce.guidance_args(recipe) if variant in reproduce.GUIDED else []
    config = DistillCLI.parse_recipe(["--config", str(recipe / "student.yaml"), *extra, *reproduce.VARIANTS[variant]])
    init = config["model"]["init_args"]
    loss = init["loss"] if isinstance(init["loss"], dict) else vars(init["loss"])
    loss = dict(vars(loss["init_args"]) if "init_args" in loss else loss)
    assert loss == {**LOSS_DEFAULTS, **VARIANT_LOSS[variant]}
    assert DistillationLoss(**loss).config() == loss  # a valid loss, built as the module builds it
    assert init["student"]["distilled"] == VARIANT_TOKEN.get(variant, True)
    guidance = init.get("feature_guidance")
    if variant in reproduce.GUIDED:  # the recipe folder's guidance.yaml, as written there
        assert vars(guidance) == dict(student_blocks=[0, 1, 2], teacher_layers=["stages.0", "stages.1", "stages.2"],
                                      weight=2.5)
    else:
        assert guidance is None
    mixed = (config["data"]["mixup"], config["data"]["cutmix"]) == (0.8, 1.0)
    assert mixed == (variant in ("fm", "none_mix"))  # function matching and its baseline mix the images
    if variant == "fm":  # and function matching reads the live teacher on them
        assert init["teacher_cache"] is None


@pytest.mark.slow
def test_pipeline_seeds_reports_the_range_over_seeds(tmp_path):
    os.environ["WANDB_MODE"] = "offline"
    tool = load_tool("pipeline_seeds")
    out = tmp_path / "seeds"
    assert tool.main(["digits", "--seeds", "2", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    fused = results["table"]["student val/acc, fused (best checkpoint: what the summary prints)"]
    values = [r["summary"]["student"]["val/acc"] for r in results["runs"]]
    assert fused["n"] == 2 and fused["min"] == min(values) and fused["max"] == max(values)
    specs = [torch.load(r["summary"]["student"]["checkpoint"], map_location="cpu", weights_only=True)
             ["hyper_parameters"]["student"] for r in results["runs"]]
    assert specs[0] == specs[1]  # the same recipe ...
    for run in results["runs"]:  # ... run with the seed it is reported under, in both steps
        folder = out / "runs" / f"seed{run['seed']}"
        for step in ("teacher", "student"):
            assert yaml.safe_load((folder / step / "config.yaml").read_text())["seed_everything"] == run["seed"], step
        # the last epoch's figure is that run's epoch-0 validation (TINY trains one epoch), from its own log
        rows = [r for r in csv.DictReader(open(folder / "student" / "metrics.csv")) if r.get("val/acc")]
        assert run["student_last_epoch"] == float(next(r["val/acc"] for r in rows if r["epoch"] == "0"))
        assert run["summary"] == json.loads((folder / "summary.json").read_text())
    last = results["table"]["student val/acc, fused (last epoch)"]
    assert (last["min"], last["max"]) == tuple(sorted(r["student_last_epoch"] for r in results["runs"]))
    md = (out / "results.md").read_text()
    assert md.startswith("<!-- regenerate: python tools/pipeline_seeds.py digits --seeds 2") and "min - max" in md


def test_pipeline_seeds_last_epoch_leaves_out_the_revalidation_of_the_chosen_checkpoint(tmp_path):
    tool = load_tool("pipeline_seeds")
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/acc\n0,9,1.0,\n0,10,,0.5\n1,20,0.9,\n1,21,,0.6\n"
        "2,22,,0.7\n")  # the last row: run_step validating the best checkpoint after training
    assert tool.last_epoch_acc(tmp_path) == 0.6


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

    monkeypatch.setattr(reproduce, "run_step", run_step)
    (tmp_path / "study").mkdir()
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"x")
    return {"teacher": {"checkpoint": str(teacher), "val/acc": 0.9, "seconds": 5.0}, "runs": [], "seconds": 5.0}


def live_process():
    """Another live process (a sleeping child) and a claim in its name, as `claim_run` writes it."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    claim = {"pid": child.pid, "start": reproduce._start_time(child.pid), "boot": reproduce._boot_id()}
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
        sha = reproduce.sha256_of(previous["teacher"]["checkpoint"])
        other = [{"variant": "none", "seed": 1, "checkpoint": "x", "seconds": 1.0, "metrics": {"val/acc": 0.4},
                  "teacher_sha256": sha}]
        results = reproduce.run_study(str(REPO / "recipes/digits"), ["none"], 3, runs, [], "cmd", previous=previous,
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
    assert reproduce.claim_run(claim) and reproduce.claim_owner(claim) == str(os.getpid())
    child, other = live_process()
    try:
        claim.write_text(other)
        assert not reproduce.claim_run(claim)  # held by a live process
    finally:
        child.kill()
        child.wait()
    assert reproduce.claim_run(claim)  # ... until it dies


def test_a_claim_in_this_process_name_from_an_earlier_process_is_taken_over(tmp_path):
    """After a restart a new worker may get the pid that wrote a claim: a claim naming this very pid but
    another boot (or another start time, or the old plain-pid form) is stale, not "alive"."""
    claim = tmp_path / "none-seed0.running"
    me = {"pid": os.getpid(), "start": reproduce._start_time(os.getpid()), "boot": reproduce._boot_id()}
    for stale in (str(os.getpid()), json.dumps({**me, "boot": "another-boot"}), json.dumps({**me, "start": "1"})):
        claim.write_text(stale)
        assert not reproduce.claim_alive(claim), stale
        assert reproduce.claim_run(claim)
    assert reproduce.claim_alive(claim)  # the claim it wrote itself


def test_a_run_saved_between_the_look_and_the_claim_is_not_trained_again(tmp_path, monkeypatch):
    """Worker 2 looks (none-seed0 not done), worker 1 saves it and releases its claim, worker 2 claims:
    worker 2 must see the saved run once it holds the claim, and not train it again."""
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    runs = tmp_path / "study" / "runs"
    sha = reproduce.sha256_of(previous["teacher"]["checkpoint"])
    saved = {"variant": "none", "seed": 0, "checkpoint": "x", "seconds": 1.0, "metrics": {"val/acc": 0.4},
             "teacher_sha256": sha}
    looks = []

    def finished():  # the first look comes before worker 1's save; every later one after it
        looks.append(1)
        return [] if len(looks) == 1 else [saved]

    results = reproduce.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs, [], "cmd", previous=previous,
                                  finished=finished)
    assert trained == [] and len(looks) >= 2 and results["runs"] == []


def test_two_workers_taking_over_one_dead_claim_do_not_both_get_it(tmp_path):
    """Two workers restarted together find the same dead claim; with a delay between looking at it and
    writing their own, exactly one of them holds the run."""
    import multiprocessing

    claim = tmp_path / "none-seed0.running"
    claim.write_text(json.dumps({"pid": 999_999_999, "start": "1", "boot": reproduce._boot_id()}))
    slow_alive = reproduce.claim_alive

    def claim_alive(path):
        alive = slow_alive(path)
        time.sleep(0.5)  # both workers look before either writes
        return alive

    def worker(queue):
        reproduce.claim_alive = claim_alive
        queue.put(reproduce.claim_run(claim))

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
        code = reproduce.main([str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "2", "--variants", "none"])
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

    monkeypatch.setattr(reproduce, "run_step", run_step)


def test_a_retrained_teacher_drops_the_runs_of_the_former_one(tmp_path, monkeypatch):
    """The teacher's checkpoint is gone: the teacher is trained again (a checkpoint of the same name) and
    every student is trained again for it; results.json and the run folders hold no run of the former
    teacher, even when a worker that still holds the former teacher saves afterwards."""
    trained = []
    fake_teacher_study(tmp_path, monkeypatch, trained, [b"teacher one", b"teacher two"])
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "1", "--variants", "none", "token"]
    assert reproduce.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert trained == ["teacher", "none-seed0", "token-seed0"]
    old_sha = first["teacher"]["sha256"]
    assert {r["teacher_sha256"] for r in first["runs"]} == {old_sha}

    Path(first["teacher"]["checkpoint"]).unlink()
    assert reproduce.main(args) == 0
    second = json.loads((out / "results.json").read_text())
    assert trained[3:] == ["teacher", "none-seed0", "token-seed0"]  # every student again
    new_sha = second["teacher"]["sha256"]
    assert new_sha != old_sha and second["teacher"]["checkpoint"] == first["teacher"]["checkpoint"]
    assert sorted((r["variant"], r["seed"], r["teacher_sha256"]) for r in second["runs"]) == [
        ("none", 0, new_sha), ("token", 0, new_sha)]
    # a worker that started with the former teacher saves its run now: it does not come back
    stale = {**first, "runs": [{**first["runs"][0], "seed": 5}]}
    merged = reproduce.merge(second, stale, 1.0)
    assert merged["teacher"]["sha256"] == new_sha and {r["teacher_sha256"] for r in merged["runs"]} == {new_sha}
    assert (5 not in {r["seed"] for r in merged["runs"]})


def test_folders_of_the_former_teachers_runs_are_removed(tmp_path, monkeypatch):
    trained = []
    fake_teacher_study(tmp_path, monkeypatch, trained, [b"teacher one", b"teacher two"])
    out = tmp_path / "study"
    args = [str(REPO / "recipes/digits"), "--out", str(out), "--seeds", "2", "--variants", "none"]
    assert reproduce.main(args) == 0
    marker = out / "runs" / "none-seed1" / "from-teacher-one"
    marker.write_text("x")
    results = json.loads((out / "results.json").read_text())
    Path(results["teacher"]["checkpoint"]).write_bytes(b"changed")  # changed, not gone: another teacher too
    assert reproduce.main([*args[:-1], "token"]) == 0  # resumed with another variant only
    assert not marker.exists() and not (out / "runs" / "none-seed1").exists() and trained.count("none-seed1") == 1


def test_runs_another_worker_saved_for_another_teacher_do_not_count(tmp_path, monkeypatch):
    trained = []
    previous = fake_study(tmp_path, monkeypatch, trained)
    other = [{"variant": "none", "seed": 0, "checkpoint": "x", "seconds": 1.0, "metrics": {"val/acc": 0.4},
              "teacher_sha256": "another teacher"}]
    reproduce.run_study(str(REPO / "recipes/digits"), ["none"], 1, tmp_path / "study" / "runs", [], "cmd",
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
    monkeypatch.setattr(reproduce.time, "perf_counter", lambda: float(next(ticks)))
    fake = reproduce.run_step

    def run_step(config, step_args, root, score, resume=None):
        if root.name == "none-seed0":  # worker 1's first run: worker 2 comes and goes meanwhile
            assert reproduce.main(args) == 3  # not 0: none-seed0 is still held by worker 1
        return fake(config, step_args, root, score)

    monkeypatch.setattr(reproduce, "run_step", run_step)
    assert reproduce.main(args) == 0
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
    assert reproduce.main([*args, "--score", "last"]) == 0
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
        reproduce.main([*args, "--score", "last"])
    assert trained == []  # refused before anything ran
    assert reproduce.main(args) == 0 and trained == ["none-seed0"]  # the same score resumes


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
            reproduce.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs, [], "cmd")
    finally:
        child.kill()
    assert trained == [] and claim.read_text() == held  # nothing trained, the claim left alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim.write_text(dead.stdout.strip())
    results = reproduce.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs, [], "cmd")
    assert trained == ["teacher", "none-seed0"] and not claim.exists()
    assert results["teacher"]["checkpoint"] == str(runs / "teacher" / "last.ckpt")


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
    assert reproduce.main(args) == 0 and trained == ["none-seed0"]
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"]["given"] and results["teacher"]["val/acc"] == 0.8 and results["runs"][0]["checkpoint"]
    assert reproduce.main(args) == 0 and trained == ["none-seed0"]  # unchanged: nothing to do
    marker = out / "runs" / "none-seed0" / "of-the-first-teacher"
    marker.write_text("x")
    torch.save({"distill_run": {"metrics": {"val/acc": 0.7}}}, teacher)  # another teacher in the same file
    assert reproduce.main(args) == 0 and trained == ["none-seed0", "none-seed0"] and not marker.exists()
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"]["val/acc"] == 0.7 and len(results["runs"]) == 1
    assert results["runs"][0]["teacher_sha256"] == reproduce.sha256_of(teacher)


def test_the_study_itself_drops_the_runs_of_a_changed_given_teacher(tmp_path, monkeypatch):
    """run_study, not only the merge into results.json, keeps a former teacher's runs out: resumed from the
    results of the first teacher with --teacher_ckpt now holding another one, the runs and the table it
    returns hold the new teacher's run alone. (Written against tools/reproduce.py's run_study.)"""
    trained = []
    fake_study(tmp_path, monkeypatch, trained)
    teacher = tmp_path / "given.ckpt"
    torch.save({"distill_run": {"metrics": {"val/acc": 0.8}}}, teacher)
    runs, recipe = tmp_path / "study" / "runs", str(REPO / "recipes/digits")
    first = reproduce.run_study(recipe, ["none"], 2, runs, [], "cmd", teacher_ckpt=str(teacher))
    assert [(row["variant"], row["n"]) for row in first["table"]] == [("none", 2)]
    torch.save({"distill_run": {"metrics": {"val/acc": 0.7}}}, teacher)  # another teacher in the same file
    new_sha = reproduce.sha256_of(teacher)
    second = reproduce.run_study(recipe, ["none"], 1, runs, [], "cmd", previous=first, teacher_ckpt=str(teacher))
    assert trained == ["none-seed0", "none-seed1", "none-seed0"]
    assert [(r["variant"], r["seed"], r["teacher_sha256"]) for r in second["runs"]] == [("none", 0, new_sha)]
    assert [(row["variant"], row["n"]) for row in second["table"]] == [("none", 1)]
    assert second["teacher"]["sha256"] == new_sha and second["teacher"]["val/acc"] == 0.7


def interrupted_run(tmp_path, monkeypatch, calls: list, recorded_edit=None):
    """A study whose none-seed0 was interrupted after epoch 2 (its last checkpoint, config.yaml and the
    metrics of epochs 0-3 on disk); `recorded_edit(config)` changes the config.yaml it recorded."""
    previous = fake_study(tmp_path, monkeypatch, [])
    runs = tmp_path / "study" / "runs"
    root = runs / "none-seed0"
    args = [*reproduce.VARIANTS["none"], "--seed_everything", "0", "--model.init_args.teacher",
            previous["teacher"]["checkpoint"]]
    config = reproduce.resolved_recipe(REPO / "recipes/digits/student.yaml", args, root)
    if recorded_edit:
        recorded_edit(config)
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"epoch": 2}, root / "checkpoints" / "last.ckpt")
    (root / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n0,5,1.0,\n0,5,,0.3\n1,10,0.8,\n2,15,0.7,\n"
                                      "2,15,,0.5\n3,20,0.6,\n")  # epoch 3 was under way: the checkpoint is after 2

    def run_step(config, args, root, score, resume=None):
        calls.append((root.name, resume))
        root.mkdir(parents=True, exist_ok=True)
        (root / "metrics.csv").write_text("epoch,step,lr-AdamW,train/loss,val/acc\n3,20,0.1,0.55,\n3,20,,,0.6\n")
        (root / "checkpoints").mkdir(exist_ok=True)
        torch.save({"epoch": 3}, root / "checkpoints" / "last.ckpt")  # training ends by overwriting last.ckpt
        return str(root / "checkpoints" / "last.ckpt"), {"val/acc": 0.6}, 1.0

    monkeypatch.setattr(reproduce, "run_step", run_step)
    return reproduce.run_study(str(REPO / "recipes/digits"), ["none"], 1, runs, [], "cmd", previous=previous), root


def test_an_interrupted_run_continues_from_its_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    results, root = interrupted_run(tmp_path, monkeypatch, calls)
    assert calls == [("none-seed0", str(root / "checkpoints" / "last.ckpt"))]
    assert results["runs"][0]["resumed_from_epoch"] == 3
    rows = list(csv.DictReader((root / "metrics.csv").open()))
    assert [(r["epoch"], r["val/acc"]) for r in rows] == [("0", ""), ("0", "0.3"), ("1", ""), ("2", ""), ("2", "0.5"),
                                                          ("3", ""), ("3", "0.6")]  # the lost epoch 3 once, the new one
    assert rows[-2]["lr-AdamW"] == "0.1" and rows[0]["lr-AdamW"] == ""


def test_an_interrupted_run_of_another_recipe_starts_over(tmp_path, monkeypatch):
    calls = []

    def edit(config):
        config["model"]["init_args"]["lr"] = 0.123  # the folder's run was trained with another learning rate

    results, root = interrupted_run(tmp_path, monkeypatch, calls, edit)
    assert calls == [("none-seed0", None)] and "resumed_from_epoch" not in results["runs"][0]
    assert not (root / "config.yaml").exists()  # the folder was removed before the run started over
