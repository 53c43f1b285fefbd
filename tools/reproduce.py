"""Reproduce DeiT's distillation ablation (Touvron et al. 2021, Table 3) on any recipe, and compare the
stronger methods the toolkit offers.

Trains the teacher once, then the same student under each variant over N seeds:

    none        no distillation (a plain ViT, class token only)
    soft        usual (Hinton) distillation, no distillation token: KL at tau 3, alpha 0.1, reduced as
                DeiT's code does (kl_reduction deit)
    hard        hard distillation without token: the class token learns from the teacher's labels
    token       DeiT: distillation token with hard distillation (alpha 0.5), reported per head:
                class head, distillation head and both heads fused
    dkd         token, DKD on the distillation head (Zhao et al. 2022; tau 4, TCKD 1, NCKD 8, alpha 0.5)
    dist        token, DIST on the distillation head (Huang et al. 2022; tau 4, alpha 0.5)
    ls          token, KL on standardised logits (Sun et al. 2024; tau 2, alpha 0.9)
    lg          token (hard) plus feature guidance from the CNN (Li et al. 2022); the pairs of student
                blocks and teacher layers come from the recipe folder's `guidance.yaml`
    lg_dkd      lg with DKD instead of hard distillation on the distillation head
    token_soft  DeiT's distillation token with the soft term (KL at tau 1, alpha 0.5), per head
    cls_soft    token_soft's soft term (KL at tau 1, alpha 0.5) on the class token, no distillation token
    fm          function matching (Beyer et al., CVPR 2022: "a good teacher is patient and consistent"):
                no token, KL at tau 1 to the live teacher on the very mixed image the student sees
                (mixup 0.8 / cutmix 1.0 on top of the recipe's crops, teacher cache off), no
                ground-truth term (alpha 1); meant for long schedules
    none_mix    no distillation with the same mixup/cutmix as fm (its fair baseline)

    python tools/reproduce.py recipes/digits --seeds 3 --out results/digits
    python tools/reproduce.py RECIPE --teacher_ckpt TEACHER.ckpt ...   # students of a given teacher (no step 1)

writes OUT/results.json (every run), OUT/results.md (mean +- std and min - max per variant, teacher
accuracy, hardware, run time, the command) and OUT/results.png (a bar chart with error bars); `--report`
writes the last two again from results.json, running nothing. A study resumes: runs already
in OUT/results.json (and the teacher, while its checkpoint exists with the same sha256) are kept, so a
study can span sessions; a run that was interrupted continues from its last checkpoint when its
folder's config.yaml is this run's recipe (else it starts over). The runs are keyed on the teacher's
identity, the sha256 of its checkpoint: when the teacher is retrained (its checkpoint gone or changed),
the runs of the former teacher are dropped from results.json and their folders removed. Several processes
can share a study: the same command started twice (say one process per core, `OMP_NUM_THREADS=1`) makes
two workers. Each claims the next run no other one holds (RUN.running keeps its pid, the process's start
time and the boot id, so a claim outlives neither its process nor a restart of the machine) and saves its
runs into the shared results.json under a lock. A worker exits 0 only when the study is complete; when
runs are still held by other live workers it says which and exits 3 (the last worker to finish completes
results.json).
Extra `--section.key VALUE` overrides go to both steps (`--teacher.` / `--student.` for one), as in
`distill pipeline`.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from distill.commands.pipeline import resolve_recipe, run_step, split_overrides
from distill.models.weights import sha256_of

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/study_plot.py
from study_plot import bar_chart  # noqa: E402

TOKEN = ["--model.init_args.student.distilled", "true"]
NO_TOKEN = ["--model.init_args.student.distilled", "false"]
LOSS = "--model.init_args.loss."
MIXED = ["--data.mixup", "0.8", "--data.cutmix", "1.0"]  # DeiT's mixup and cutmix, one of them per batch
NO_CACHE = "--model.init_args.teacher_cache=null"  # a mixed image's logits are not the mix of the logits: live teacher
VARIANTS = {
    "none": [*NO_TOKEN, LOSS + "mode", "none"],
    "soft": [*NO_TOKEN, LOSS + "mode", "soft", LOSS + "tau", "3.0", LOSS + "alpha", "0.1", LOSS + "kl_reduction", "deit"],
    "hard": [*NO_TOKEN, LOSS + "mode", "hard", LOSS + "alpha", "0.5"],
    "token": [*TOKEN, LOSS + "mode", "hard", LOSS + "alpha", "0.5"],
    "dkd": [*TOKEN, LOSS + "mode", "dkd", LOSS + "tau", "4.0", LOSS + "alpha", "0.5", LOSS + "dkd_alpha", "1.0",
            LOSS + "dkd_beta", "8.0"],
    "dist": [*TOKEN, LOSS + "mode", "dist", LOSS + "tau", "4.0", LOSS + "alpha", "0.5"],
    "ls": [*TOKEN, LOSS + "mode", "soft", LOSS + "standardize", "true", LOSS + "tau", "2.0", LOSS + "alpha", "0.9"],
    "lg": [*TOKEN, LOSS + "mode", "hard", LOSS + "alpha", "0.5"],
    "lg_dkd": [*TOKEN, LOSS + "mode", "dkd", LOSS + "tau", "4.0", LOSS + "alpha", "0.5", LOSS + "dkd_alpha", "1.0",
               LOSS + "dkd_beta", "8.0"],
    "token_soft": [*TOKEN, LOSS + "mode", "soft", LOSS + "tau", "1.0", LOSS + "alpha", "0.5"],
    "cls_soft": [*NO_TOKEN, LOSS + "mode", "soft", LOSS + "tau", "1.0", LOSS + "alpha", "0.5"],
    "fm": [*NO_TOKEN, LOSS + "mode", "soft", LOSS + "tau", "1.0", LOSS + "alpha", "1.0", *MIXED, NO_CACHE],
    "none_mix": [*NO_TOKEN, LOSS + "mode", "none", *MIXED],
}
GUIDED = {"lg", "lg_dkd"}  # read RECIPE/guidance.yaml
DEIT_VARIANTS = ["none", "soft", "hard", "token"]
# What goes in the table: (row label, variant, metric)
ROWS = [
    ("no distillation", "none", "val/acc"),
    ("soft distillation (tau 3, alpha 0.1), no token", "soft", "val/acc"),
    ("hard distillation, no token", "hard", "val/acc"),
    ("distillation token: class head", "token", "val/acc_cls"),
    ("distillation token: distillation head", "token", "val/acc_dist"),
    ("distillation token: both heads fused", "token", "val/acc"),
    ("token + DKD, fused", "dkd", "val/acc"),
    ("token + DIST, fused", "dist", "val/acc"),
    ("token + KL on standardised logits, fused", "ls", "val/acc"),
    ("token + feature guidance (hard), fused", "lg", "val/acc"),
    ("token + feature guidance + DKD, fused", "lg_dkd", "val/acc"),
    ("soft distillation (tau 1, alpha 0.5), no token", "cls_soft", "val/acc"),
    ("distillation token, soft (tau 1): class head", "token_soft", "val/acc_cls"),
    ("distillation token, soft (tau 1): distillation head", "token_soft", "val/acc_dist"),
    ("distillation token, soft (tau 1): both heads fused", "token_soft", "val/acc"),
    ("no distillation, mixup/cutmix", "none_mix", "val/acc"),
    ("function matching (KL at tau 1 only, mixup/cutmix, live teacher), no token", "fm", "val/acc"),
]
SHORT = {"cls_soft": "soft (tau 1)\nno token", "none_mix": "none\n+mixup", "fm": "function\nmatching", "none": "no\ndistillation", "soft": "soft (tau 3)\nno token", "hard": "hard\nno token", "dkd": "token\n+DKD",
         "dist": "token\n+DIST", "ls": "token\n+LS", "lg": "token\n+guidance", "lg_dkd": "token+guid.\n+DKD"}


def hardware() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({torch.get_num_threads()} threads, {cpu})"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def guidance_args(recipe_dir: Path) -> list[str]:
    """The extra config of the feature-guidance variants: RECIPE/guidance.yaml (which student blocks and
    teacher layers to pair depends on the recipe's models)."""
    path = recipe_dir / "guidance.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"variant lg needs {path} (model.init_args.feature_guidance for this recipe's "
                                f"student and teacher); add it or leave the lg variants out")
    return ["--config", str(path)]


def row_stats(values: list[float]) -> dict:
    """What a results row says of its runs: mean +- std, and the range (min - max)."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def table(runs: list[dict], variants: list[str]) -> list[dict]:
    return [
        {"row": label, "variant": v, "metric": m, **row_stats([r["metrics"][m] for r in runs if r["variant"] == v])}
        for label, v, m in ROWS if v in variants and any(r["variant"] == v for r in runs)
    ]


def run_study(recipe: str, variants: list[str], seeds: int, out: Path, overrides: list[str], command: str,
              save=None, previous: dict | None = None, score: str = "best", finished=None,
              teacher_ckpt: str | None = None) -> dict:
    """Runs what `previous` (an earlier results.json of the same study) does not hold yet; `save(results)`
    is called after the teacher and after every student run, so an interrupted study loses one run.
    `finished()`, when given, returns the runs saved by other processes sharing the study; they are
    skipped. Runs of another teacher (another sha256 of its checkpoint) never count. `teacher_ckpt`: the
    students learn from this step-1 checkpoint (e.g. the teacher of another study) and no teacher is trained."""
    recipe_dir = resolve_recipe(recipe)
    steps = split_overrides(overrides)
    previous = previous or {}
    if previous and previous.get("score", "best") != score:
        raise ValueError(f"--score {score}: the study being resumed scored its runs by their {previous.get('score', 'best')} "
                         f"checkpoint; use the same --score or another --out")
    results = {"recipe": str(recipe_dir), "command": command, "hardware": hardware(), "score": score,
               "teacher": previous.get("teacher"), "runs": list(previous.get("runs") or []),
               "seconds": float(previous.get("seconds") or 0.0)}
    start = time.perf_counter()

    def checkpoint() -> None:
        results["table"] = table(results["runs"], variants)
        results["seconds"] = round(float(previous.get("seconds") or 0.0) + time.perf_counter() - start, 1)
        if save is not None:
            save(results)

    if teacher_ckpt is not None:
        given = given_teacher(teacher_ckpt, results["teacher"])
        if (results["teacher"] or {}).get("sha256") not in (None, given["sha256"]):
            drop_runs_of_another_teacher(out)  # the study's runs were of another teacher
        results["teacher"] = given
    teacher_sha = current_sha(results["teacher"])
    if teacher_sha is None and teacher_ckpt is not None:
        raise FileNotFoundError(f"--teacher_ckpt {teacher_ckpt!r} does not exist")
    if teacher_sha is None:
        claim = out / "teacher.running"
        if not claim_run(claim):
            raise RuntimeError(f"process {claim_owner(claim)} is training this study's teacher; start this "
                               f"worker again once it has finished")
        try:
            drop_runs_of_another_teacher(out)
            shutil.rmtree(out / "teacher", ignore_errors=True)  # a former teacher's checkpoints are not this one's
            ckpt, metrics, seconds = run_step(recipe_dir / "teacher.yaml", steps["teacher"], out / "teacher", score)
        finally:
            release(claim)
        teacher_sha = sha256_of(ckpt)
        results["teacher"] = {"checkpoint": ckpt, "sha256": teacher_sha, "val/acc": metrics.get("val/acc"),
                              "seconds": round(seconds, 1), "metrics": metrics}
        results["runs"] = []  # students of another teacher do not belong to this study
        checkpoint()
    else:
        results["teacher"]["sha256"] = teacher_sha  # a study from before runs were keyed on it: adopt its runs
        results["runs"] = [{**r, "teacher_sha256": r.get("teacher_sha256") or teacher_sha} for r in results["runs"]
                           if (r.get("teacher_sha256") or teacher_sha) == teacher_sha]
    teacher_ckpt = results["teacher"]["checkpoint"]

    def done() -> set[tuple[str, int]]:
        others = finished() if finished else []
        return {(r["variant"], r["seed"]) for r in [*results["runs"], *others] if r.get("teacher_sha256") == teacher_sha}

    held: list[str] = []
    for variant in variants:
        extra = guidance_args(recipe_dir) if variant in GUIDED else []
        for seed in range(seeds):
            if (variant, seed) in done():
                continue
            root = out / f"{variant}-seed{seed}"
            claim = root.with_name(root.name + ".running")
            if not claim_run(claim):
                print(f"skipping {root.name}: process {claim_owner(claim)} is running it", file=sys.stderr)
                held.append(f"{root.name} (process {claim_owner(claim)})")
                continue
            try:
                if (variant, seed) in done():  # saved by another worker between the look and the claim
                    continue
                args = [*extra, *steps["student"], *VARIANTS[variant], "--seed_everything", str(seed),
                        "--model.init_args.teacher", teacher_ckpt]
                resume, earlier = None, None
                if root.exists():  # an interrupted run's folder: continue it, or its checkpoints would be mistaken for this run's
                    resume = resumable(root, recipe_dir / "student.yaml", args)
                    if resume is None:
                        print(f"removing {root}: a run that did not finish (no last checkpoint of this recipe)", file=sys.stderr)
                        shutil.rmtree(root)
                    else:
                        resumed_from = checkpoint_epoch(resume)  # before the run overwrites last.ckpt
                        print(f"resuming {root.name} from {resume} (epoch {resumed_from})", file=sys.stderr)
                        earlier = (root / "metrics.csv").read_text() if (root / "metrics.csv").is_file() else None
                ckpt, metrics, seconds = run_step(recipe_dir / "student.yaml", args, root, score, resume=resume)
                run = {"variant": variant, "seed": seed, "checkpoint": ckpt, "teacher_sha256": teacher_sha,
                       "seconds": round(seconds, 1), "metrics": metrics}
                if resume is not None:
                    run["resumed_from_epoch"] = resumed_from  # `seconds` is then the resumed part only
                    join_metrics(earlier, root / "metrics.csv")
                results["runs"].append(run)
                checkpoint()
            finally:
                release(claim)
    checkpoint()
    results["held"] = [h for h in held if not any(h.startswith(f"{v}-seed{s} ") for v, s in done())]
    return results


def resolved_recipe(config: Path, args: list[str], root: Path) -> dict:
    """The recipe a run of `config` with `args` in `root` resolves to, as its config.yaml records it."""
    from distill.commands.recipe_cli import DistillCLI

    return DistillCLI.recorded_recipe(["--config", str(config), *args, "--trainer.default_root_dir", str(root)])


def resumable(root: Path, config: Path, args: list[str]) -> str | None:
    """The last checkpoint of an interrupted run in `root`, when that run was this very one (its recorded
    config.yaml equals what `config` with `args` resolves to); None when it cannot be continued."""
    import yaml

    last, recorded = root / "checkpoints" / "last.ckpt", root / "config.yaml"
    if not (last.is_file() and recorded.is_file()):
        return None
    try:
        same = yaml.safe_load(recorded.read_text()) == resolved_recipe(config, args, root)
    except Exception:  # noqa: BLE001 - a recipe that no longer parses: start over
        return None
    return str(last) if same else None


def checkpoint_epoch(path: str) -> int:
    """The number of epochs a checkpoint has completed."""
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"]) + 1


def join_metrics(earlier: str | None, path: Path) -> None:
    """A resumed run's metrics.csv holds the resumed epochs only (Lightning's CSV logger starts it anew):
    put the interrupted part's rows (the epochs before the resumed checkpoint's) in front again."""
    import csv
    import io

    if not earlier or not path.is_file():
        return
    new_rows = list(csv.DictReader(io.StringIO(path.read_text())))
    first = min((int(r["epoch"]) for r in new_rows if r.get("epoch")), default=None)
    old = csv.DictReader(io.StringIO(earlier))
    old_rows = [r for r in old if first is None or (r.get("epoch") and int(r["epoch"]) < first)]
    fields = list(dict.fromkeys([*(old.fieldnames or []), *(new_rows[0].keys() if new_rows else [])]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows([*old_rows, *new_rows])
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(out.getvalue())
    tmp.replace(path)


def given_teacher(path: str, recorded: dict | None) -> dict:
    """The study's teacher entry for a step-1 checkpoint given with --teacher_ckpt: its accuracy is the
    last validation its checkpoint records; a resumed study whose teacher file changed since starts over."""
    path = str(Path(path).resolve())
    if not Path(path).is_file():
        raise FileNotFoundError(f"--teacher_ckpt {path!r} does not exist; train step 1 first or fix the path")
    sha = sha256_of(path)
    if recorded and recorded.get("checkpoint") == path and recorded.get("sha256") == sha:
        return recorded
    run = torch.load(path, map_location="cpu", weights_only=True).get("distill_run") or {}
    metrics = dict(run.get("metrics") or {})
    return {"checkpoint": path, "sha256": sha, "val/acc": metrics.get("val/acc"), "seconds": 0.0, "metrics": metrics,
            "given": True}


def current_sha(teacher: dict | None) -> str | None:
    """sha256 of the study's teacher checkpoint when it is still there and unchanged (a study from before
    the teacher's sha256 was recorded: whatever the file holds), else None: it must be trained again."""
    path = Path((teacher or {}).get("checkpoint") or "")
    if not path.is_file():
        return None
    digest = sha256_of(path)
    recorded = teacher.get("sha256")
    return digest if recorded in (None, digest) else None


def drop_runs_of_another_teacher(out: Path) -> None:
    """Before a (new) teacher is trained: the folders of every run not held by a live worker are of the
    former teacher; remove them (results.json drops their entries when the new teacher is saved)."""
    if not out.is_dir():
        return
    for folder in out.iterdir():
        if folder.is_dir() and folder.name != "teacher" and not claim_alive(folder.with_name(folder.name + ".running")):
            print(f"removing {folder}: a run of another teacher", file=sys.stderr)
            shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------- claims
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); None when no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""  # alive, start time unknown (no /proc)
    return stat.rsplit(")", 1)[1].split()[19]


def _me() -> dict:
    return {"pid": os.getpid(), "start": _start_time(os.getpid()), "boot": _boot_id()}


def claim_owner(claim: Path) -> str:
    try:
        text = claim.read_text().strip()
        return str(json.loads(text)["pid"]) if text.startswith("{") else text
    except (OSError, ValueError, KeyError):
        return "?"


def claim_alive(claim: Path) -> bool:
    """True while the process that wrote CLAIM runs: same boot, same pid, same start time (a pid reused
    after its process died, or a claim from before a restart, is dead; so is a claim in this process's
    name written by an earlier process with the same pid)."""
    try:
        text = claim.read_text().strip()
    except OSError:
        return False
    try:
        owner = json.loads(text) if text.startswith("{") else {"pid": int(text or 0)}
        pid = int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if "boot" in owner and owner["boot"] != _boot_id():
        return False
    start = _start_time(pid)
    if start is None:
        return False
    if "start" in owner:
        return owner["start"] == start or start == ""
    return pid != os.getpid()  # an old plain-pid claim: alive unless it names this very process


@contextmanager
def _claims_lock(folder: Path):
    """One lock for every claim of a study: look, take over and write happen as one step."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "claims.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def release(claim: Path) -> None:
    with _claims_lock(claim.parent):
        if claim_owner(claim) == str(os.getpid()):
            claim.unlink(missing_ok=True)


def claim_run(claim: Path) -> bool:
    """Marks a run as taken by this process (CLAIM holds its pid, start time and boot id), so that two
    processes sharing a study (the same command started once per core) never run, or delete, the same
    run. A claim whose process has died is taken over. Look and write happen under the study's claims
    lock, so two workers restarted together cannot both take over one dead claim."""
    with _claims_lock(claim.parent):
        if claim.exists() and claim_alive(claim):
            return False
        tmp = claim.with_name(f".{claim.name}.{os.getpid()}")
        tmp.write_text(json.dumps(_me()))
        os.replace(tmp, claim)
        return True


def merge(on_disk: dict | None, results: dict, seconds_since_last_save: float) -> dict:
    """What results.json holds after this process saves: its own runs added to those other processes
    sharing the study saved meanwhile, and its time added to theirs. Only runs of the study's teacher
    count, the one whose checkpoint is there with its recorded sha256: a worker still holding a former
    teacher never brings its runs back, and a retrained teacher starts over."""
    if not on_disk:
        return results
    valid = lambda t: current_sha(t) if (t or {}).get("sha256") else None  # noqa: E731 - recorded and still there
    ours, theirs = valid(results.get("teacher")), valid(on_disk.get("teacher"))
    sha, base = (ours, results) if ours else (theirs, on_disk)
    if sha is None:
        return results
    kept = [r for r in on_disk.get("runs", []) if r.get("teacher_sha256") == sha] if theirs == sha else []
    keys = {(r["variant"], r["seed"]) for r in kept}
    runs = [*kept, *(r for r in results["runs"] if r.get("teacher_sha256") == sha and (r["variant"], r["seed"]) not in keys)]
    return {**base, "command": results["command"], "runs": runs,
            "seconds": round(float(on_disk.get("seconds") or 0.0) + seconds_since_last_save, 1),
            "table": table(runs, list(VARIANTS))}


def teacher_in_step2(runs: list[dict]) -> str:
    """The teacher's accuracy as the students' runs measured it (its step-2 input), when they did."""
    seen = sorted({round(r["metrics"]["val/acc_teacher"], 6) for r in runs if "val/acc_teacher" in r.get("metrics", {})})
    if not seen:
        return ""
    return f" (in step 2, on the students' input: {seen[0]:.4f})" if len(seen) == 1 else \
        f" (in step 2, on the students' input: {seen[0]:.4f}-{seen[-1]:.4f})"


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        f"<!-- regenerate: {results['command']} -->",
        f"Command: `{results['command']}`",
        "",
        f"Hardware: {results['hardware']}; run time {results['seconds'] / 60:.1f} min for the whole study, summed "
        f"over the processes that shared it "
        + (f"(the teacher was given with --teacher_ckpt: {results['teacher']['checkpoint']}). "
           if results["teacher"].get("given") else f"(teacher {results['teacher']['seconds']:.0f} s). ")
        + f"Teacher val accuracy: {results['teacher']['val/acc']:.4f}{teacher_in_step2(results['runs'])}.",
        "",
        "| variant | val top-1 (mean +- std) | min - max | seeds |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["table"]:
        lines.append(f"| {row['row']} | {100 * row['mean']:.2f} +- {100 * row['std']:.2f} "
                     f"| {100 * row['min']:.2f} - {100 * row['max']:.2f} | {row['n']} |")
    if results.get("score") == "last":
        lines += ["", "Each run is scored with its last checkpoint (the end of training): no checkpoint is chosen "
                  "on the images it is scored on."]
    else:
        lines += ["", "Each run is scored with its best checkpoint by fused `val/acc`, chosen on the same validation "
                  "split it is scored on (as the pipeline does); the class- and distillation-head rows read that "
                  "checkpoint's heads."]
    lines += ["", "Every run (and its checkpoint) is in results.json next to this file."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    palette = {"none": "#999999", "soft": "#6baed6", "hard": "#3182bd", "token": "#fd8d3c", "dkd": "#74c476",
               "dist": "#31a354", "ls": "#9e9ac8", "lg": "#e6550d", "lg_dkd": "#a63603", "token_soft": "#fdae6b", "cls_soft": "#9ecae1", "fm": "#756bb1",
               "none_mix": "#636363"}
    rows = results["table"]
    labels = [("token:\n" if r["variant"] == "token" else "soft token:\n") + r["row"].split(": ")[1]
              if r["variant"] in ("token", "token_soft") else SHORT[r["variant"]] for r in rows]
    bar_chart(path, rows, labels, [palette[r["variant"]] for r in rows],
              f"Distillation variants, {Path(results['recipe']).name} ({results['hardware'].split(' (')[0]})",
              teacher=results["teacher"]["val/acc"])


def write_study(results: dict, path: Path) -> None:
    """results.json (replaced whole, never half-written) and, once a row exists, results.md and results.png
    beside it. The caller holds the study's lock."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    if results["table"]:
        write_markdown(results, path.with_name("results.md"))
        write_plot(results, path.with_name("results.png"))


def report(path: Path) -> int:
    """--report: the study's report written again from its runs (after a change to the report's format);
    results.json keeps its command, runs and times, only its derived table is recomputed."""
    if not path.is_file():
        print(f"reproduce.py: error: --report needs {path}; run the study first (or pass its --out)", file=sys.stderr)
        return 2
    with open(path.with_name("results.json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text())
        results["table"] = table(results["runs"], list(VARIANTS))
        write_study(results, path)
    print(path.with_name("results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe folder with teacher.yaml and student.yaml")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEIT_VARIANTS,
                        help=f"default: DeiT's ablation ({' '.join(DEIT_VARIANTS)})")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher_ckpt", default=None,
                        help="students learn from this step-1 checkpoint; no teacher is trained (e.g. a second "
                             "study of the same teacher)")
    parser.add_argument("--out", default=None, help="output folder (default results/<recipe name>)")
    parser.add_argument("--score", choices=["best", "last"], default="best",
                        help="score each run by its best checkpoint by val/acc (as the pipeline does) or by its last "
                             "one (when validation is the test set: nothing chosen on it)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: rewrite OUT/results.md and OUT/results.png (and the table in "
                             "results.json) from the runs in OUT/results.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out or f"results/{Path(args.recipe).name}")
    path = out / "results.json"
    if args.report:
        return report(path)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/reproduce.py " + shlex.join(argv)
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous and previous.get("command") != command:
        print(f"resuming {path} (written by: {previous.get('command')})", file=sys.stderr)

    saved = {"seconds": float((previous or {}).get("seconds") or 0.0)}

    def save(results: dict) -> None:
        # Under a lock and merged with what is on disk: several processes may share one study (the same
        # command started once per core), and each saves its own runs without losing the others'.
        with open(out / "results.json.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(path.read_text()) if path.is_file() else None
            merged = merge(on_disk, results, results["seconds"] - saved["seconds"])
            saved["seconds"] = results["seconds"]
            write_study(merged, path)

    def finished() -> list[dict]:
        return json.loads(path.read_text())["runs"] if path.is_file() else []

    results = run_study(args.recipe, args.variants, args.seeds, out / "runs", overrides, command, save=save,
                        previous=previous, score=args.score, finished=finished, teacher_ckpt=args.teacher_ckpt)
    print((out / "results.md").read_text())
    if results["held"]:
        print(f"study incomplete: {len(results['held'])} run(s) held by other live workers: {', '.join(results['held'])}; "
              f"results.json holds them once those workers finish", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
