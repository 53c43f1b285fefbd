"""Running a study: the teacher once (or one given), then the student of each variant over the seeds,
each run in OUT/runs/<variant>-seed<k>/, saved into OUT/results.json as it finishes.

A study resumes. A finished run is kept while it is of the study's teacher (the sha256 of its
checkpoint) and its folder's config.yaml is the recipe this command resolves to; when the recipe changed
(other overrides, another recipe file) the run is trained again, with one line saying what changed. An
interrupted run continues from its last checkpoint under the same test, else starts over. Fields the
toolkit or Lightning added since a run was trained stand at their defaults, which is what the run did:
they count as a change only where this command's recipe or overrides set them.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import one_line
from ..models.weights import load_weights_file, sha256_of
from .pipeline import resolve_recipe, run_step, split_overrides
from .study_claims import claim_alive, claim_owner, claim_run, release, results_lock
from .study_paths import locate, portable_argv, recipe_label, relative_to
from .study_report import hardware, split_command, study_command, table, write_study
from .study_variants import GUIDED, VARIANTS, own_args

# Where a run is, not how it trains: its folder, and the teacher's path (the teacher is keyed on its sha256).
LOCATION_KEYS = {"trainer.default_root_dir", "model.init_args.teacher"}


class StudyBusy(RuntimeError):
    """Another live worker trains the study's teacher, which every student needs."""


def guidance_args(recipe_dir: Path) -> list[str]:
    """The extra config of the feature-guidance variants: RECIPE/guidance.yaml (which student blocks and
    teacher layers to pair depends on the recipe's models)."""
    path = recipe_dir / "guidance.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"variant lg needs {path} (model.init_args.feature_guidance for this recipe's "
                                f"student and teacher); add it or leave the lg variants out")
    return ["--config", str(path)]


def student_args(variant: str, recipe_dir: Path, overrides: list[str], own: dict[str, str]) -> list[str]:
    """The student step's arguments of a variant (before its seed and teacher): for a built-in one
    [guidance config,] the study's overrides, then the variant's; for an own one the study's, then its own."""
    if variant in own:
        return [*overrides, *own_args(variant, own[variant])]
    extra = guidance_args(recipe_dir) if variant in GUIDED else []
    return [*extra, *overrides, *VARIANTS[variant]]


# ------------------------------------------------------------------------------ is it the same recipe?
def resolved_recipe(config: Path, args: list[str], root: Path) -> dict:
    """The recipe a run of `config` with `args` in `root` resolves to, as its config.yaml records it."""
    import logging

    from .recipe_cli import DistillCLI

    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # parsing seeds the RNGs and says so on stdout; nothing runs here
    try:
        return DistillCLI.recorded_recipe(["--config", str(config), *args, "--trainer.default_root_dir", str(root)])
    finally:
        seed_log.setLevel(level)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _plain(key: str) -> str:
    """A field's key without `init_args` (`--model.loss.alpha` and `--model.init_args.loss.alpha` are one)."""
    return ".".join(part for part in key.split(".") if part != "init_args")


def explicit_keys(config: Path, args: list[str]) -> set[str]:
    """The fields a run's recipe sets itself: in its recipe file, in each `--config` file of `args`, and
    each `--key` of `args`."""
    import yaml

    keys = set(_flatten(yaml.safe_load(config.read_text()) or {}))
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            keys |= set(_flatten(yaml.safe_load(Path(args[i + 1]).read_text()) or {}))
        elif arg.startswith("--") and arg != "--config":
            keys.add(arg[2:].split("=", 1)[0])
    return {_plain(k) for k in keys}


def _structure_differs(key: str, other: dict[str, Any]) -> bool:
    """`key` is a value on one side where the other holds a section there, or the reverse."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in other for i in range(1, len(parts))) or any(k.startswith(key + ".") for k in other)


def recipe_changes(recorded: dict, resolved: dict, explicit: set[str]) -> list[str]:
    """How a run's recorded recipe (its config.yaml) differs from `resolved`, as `key: old -> new`. The
    run's location is left out; a field only one side has counts only where `explicit` (the fields this
    command's recipe and overrides set) names it: a field added to the toolkit or to Lightning since the
    run was trained stands at its default, which is what the run did."""
    old, new = _flatten(recorded), _flatten(resolved)
    show = lambda v: json.dumps(v)[:60]  # noqa: E731
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in LOCATION_KEYS:
            continue
        if key in old and key in new:
            if old[key] != new[key]:
                changes.append(f"{key}: {show(old[key])} -> {show(new[key])}")
            continue
        side, other = (old, new) if key in old else (new, old)
        plain = _plain(key)
        if _structure_differs(key, other) or any(e == plain or e.startswith(plain + ".") or plain.startswith(e + ".")
                                                 for e in explicit):
            changes.append(f"{key}: {show(old[key]) if key in old else '(not set)'} -> "
                           f"{show(new[key]) if key in new else '(not set)'}")
    return changes


def folder_changes(root: Path, config: Path, args: list[str], resolved: dict | None = None) -> list[str] | None:
    """`recipe_changes` of the run in `root` against `config` with `args`; None when the folder records no
    readable recipe."""
    import yaml

    try:
        recorded = yaml.safe_load((root / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(recorded, dict):
        return None
    resolved = resolved if resolved is not None else resolved_recipe(config, args, root)
    return recipe_changes(recorded, resolved, explicit_keys(config, args))


def resumable(root: Path, config: Path, args: list[str]) -> str | None:
    """The last checkpoint of an interrupted run in `root`, when that run was this very one (its recorded
    config.yaml is what `config` with `args` resolves to); None when it cannot be continued."""
    last = root / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    try:
        changes = folder_changes(root, config, args)
    except Exception:  # noqa: BLE001 - a recipe that no longer parses: start over
        return None
    return str(last) if changes == [] else None


def checkpoint_epoch(path: str) -> int:
    """The number of epochs a checkpoint has completed, read without running pickled code (a crafted
    last.ckpt in a run folder must not run anything)."""
    try:
        epoch = load_weights_file(path).get("epoch")
    except ValueError as e:
        why = ("it holds pickled objects that could run code, refused (read with weights_only=True)"
               if "could run code" in str(e) else str(e))
        raise ValueError(f"cannot resume from {path}: {why}; remove that run's folder to train it anew") from None
    if epoch is None:
        raise ValueError(f"cannot resume from {path}: it records no epoch (not a Lightning checkpoint); "
                         f"remove that run's folder to train it anew")
    return int(epoch) + 1


EARLIER_METRICS = "metrics.earlier.csv"


def joined_metrics(earlier: str, later: str | None) -> str:
    """The rows of `earlier` (a metrics.csv) before the first epoch `later` logs, then `later`'s rows."""
    import csv
    import io

    new_rows = list(csv.DictReader(io.StringIO(later or "")))
    first = min((int(r["epoch"]) for r in new_rows if r.get("epoch")), default=None)
    old = csv.DictReader(io.StringIO(earlier))
    old_rows = [r for r in old if first is None or (r.get("epoch") and int(r["epoch"]) < first)]
    fields = list(dict.fromkeys([*(old.fieldnames or []), *(new_rows[0].keys() if new_rows else [])]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows([*old_rows, *new_rows])
    return out.getvalue()


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def metrics_so_far(root: Path) -> str | None:
    """Everything a run folder's metrics have logged so far. Lightning's CSV logger starts metrics.csv
    anew at each resume, so before a resumed part trains, the rows until then are kept in
    metrics.earlier.csv (`keep_earlier_metrics`): after a run interrupted more than once they are joined
    with the rows of the part that was interrupted."""
    log, kept = root / "metrics.csv", root / EARLIER_METRICS
    later = log.read_text() if log.is_file() else None
    return joined_metrics(kept.read_text(), later) if kept.is_file() else later


def keep_earlier_metrics(root: Path) -> str | None:
    """Before a run folder's training resumes: its metrics so far, saved to metrics.earlier.csv (a second
    interruption must not lose them) and returned for `join_metrics` when the run finishes."""
    earlier = metrics_so_far(root)
    if earlier:
        write_atomically(root / EARLIER_METRICS, earlier)
    return earlier


def join_metrics(earlier: str | None, path: Path) -> None:
    """A resumed run's metrics.csv holds the resumed epochs only (Lightning's CSV logger starts it anew):
    put the interrupted parts' rows (the epochs before the resumed checkpoint's) in front again, then
    drop metrics.earlier.csv."""
    if earlier and path.is_file():
        write_atomically(path, joined_metrics(earlier, path.read_text()))
    (path.parent / EARLIER_METRICS).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ teacher
def given_teacher(path: str, recorded: dict | None, study: Path) -> dict:
    """The study's teacher entry for a step-1 checkpoint given with --teacher_ckpt: its accuracy is the
    last validation its checkpoint records; an entry recorded for that same file, unchanged, is kept as
    it is (a resumed study whose teacher file changed since starts over)."""
    import os

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"the teacher of --teacher_ckpt {path!r} does not exist; train step 1 first or fix the path")
    sha = sha256_of(file)
    if recorded and recorded.get("sha256") == sha and recorded.get("checkpoint"):
        before = locate(recorded["checkpoint"], study)
        if before.is_file() and os.path.samefile(before, file):
            return recorded
    metrics = dict((load_weights_file(file).get("distill_run") or {}).get("metrics") or {})
    return {"checkpoint": relative_to(file, study), "sha256": sha, "val/acc": metrics.get("val/acc"), "seconds": 0.0,
            "metrics": metrics, "given": True}


def current_sha(teacher: dict | None, study: Path) -> str | None:
    """sha256 of the study's teacher checkpoint when it is still there and unchanged (a study from before
    the teacher's sha256 was recorded: whatever the file holds), else None: it must be trained again."""
    if not (teacher or {}).get("checkpoint"):
        return None
    path = locate(teacher["checkpoint"], study)
    if not path.is_file():
        return None
    digest = sha256_of(path)
    recorded = teacher.get("sha256")
    return digest if recorded in (None, digest) else None


def drop_runs_of_another_teacher(runs: Path) -> None:
    """Before a (new) teacher is trained: the folders of every run not held by a live worker are of the
    former teacher; remove them (results.json drops their entries when the new teacher is saved)."""
    if not runs.is_dir():
        return
    for folder in runs.iterdir():
        if folder.is_dir() and folder.name != "teacher" and not claim_alive(folder.with_name(folder.name + ".running")):
            print(f"removing {folder}: a run of another teacher", file=sys.stderr)
            shutil.rmtree(folder)


# --------------------------------------------------------------------------------------------- runs
def newest(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """One entry per (variant, seed): the one finished last (entries from before `finished_at` count as
    oldest; between equals, the first)."""
    kept: dict[tuple[str, int], dict] = {}
    for run in runs:
        key = (run["variant"], run["seed"])
        if key not in kept or run.get("finished_at", 0) > kept[key].get("finished_at", 0):
            kept[key] = run
    return kept


def run_study(recipe: str, variants: list[str], seeds: int, study: Path, overrides: list[str], command: str,
              save=None, previous: dict | None = None, score: str = "best", finished=None,
              teacher_ckpt: str | None = None, own: dict[str, str] | None = None) -> dict:
    """Runs what `previous` (an earlier results.json of the same study) does not hold yet, in `study`/runs;
    `save(results)` is called after the teacher and after every student run, so an interrupted study
    loses one run. `finished()`, when given, returns the runs saved by other processes sharing the study;
    they are skipped. Runs of another teacher (another sha256 of its checkpoint) never count.
    `teacher_ckpt`: the students learn from this step-1 checkpoint (e.g. the teacher of another study)
    and no teacher is trained. `own`: the variants defined with --variant (name -> overrides)."""
    recipe_dir = resolve_recipe(recipe)
    steps = split_overrides(overrides)
    own = own or {}
    previous = previous or {}
    runs_dir = study / "runs"
    student_yaml = recipe_dir / "student.yaml"
    if previous and previous.get("score", "best") != score:
        raise ValueError(f"cannot resume with --score {score}: the study being resumed scored its runs by their "
                         f"{previous.get('score', 'best')} checkpoint; use the same --score or another --out")
    for variant in variants:  # a variant that does not resolve stops the study now, not after the teacher
        args = [*student_args(variant, recipe_dir, steps["student"], own), "--model.init_args.teacher", "teacher.ckpt"]
        try:
            resolved_recipe(student_yaml, args, runs_dir / variant)
        except Exception as e:  # noqa: BLE001 - jsonargparse's errors, said as one line naming the variant
            raise ValueError(f"variant {variant}: {one_line(e)}") from None
    results = {"recipe": recipe_label(recipe_dir), "command": command, "hardware": hardware(), "score": score,
               "teacher": previous.get("teacher"), "runs": list(previous.get("runs") or []),
               "seconds": float(previous.get("seconds") or 0.0)}
    if own or previous.get("own_variants"):
        results["own_variants"] = {**(previous.get("own_variants") or {}), **own}
    start = time.perf_counter()

    def checkpoint() -> None:
        results["table"] = table(results["runs"], results.get("own_variants"))
        results["seconds"] = round(float(previous.get("seconds") or 0.0) + time.perf_counter() - start, 1)
        if save is not None:
            save(results)

    if teacher_ckpt is not None:
        given = given_teacher(teacher_ckpt, results["teacher"], study)
        if (results["teacher"] or {}).get("sha256") not in (None, given["sha256"]):
            drop_runs_of_another_teacher(runs_dir)  # the study's runs were of another teacher
        results["teacher"] = given
    teacher_sha = current_sha(results["teacher"], study)
    if teacher_sha is None:
        claim = runs_dir / "teacher.running"
        if not claim_run(claim):
            raise StudyBusy(f"process {claim_owner(claim)} is training this study's teacher; start this "
                            f"worker again once it has finished")
        try:
            drop_runs_of_another_teacher(runs_dir)
            shutil.rmtree(runs_dir / "teacher", ignore_errors=True)  # a former teacher's checkpoints are not this one's
            ckpt, metrics, seconds = run_step(recipe_dir / "teacher.yaml", steps["teacher"], runs_dir / "teacher", score)
        finally:
            release(claim)
        teacher_sha = sha256_of(ckpt)
        results["teacher"] = {"checkpoint": relative_to(ckpt, study), "sha256": teacher_sha,
                              "val/acc": metrics.get("val/acc"), "seconds": round(seconds, 1), "metrics": metrics}
        results["runs"] = []  # students of another teacher do not belong to this study
        checkpoint()
    else:
        results["teacher"]["sha256"] = teacher_sha  # a study from before runs were keyed on it: adopt its runs
        results["runs"] = [{**r, "teacher_sha256": r.get("teacher_sha256") or teacher_sha} for r in results["runs"]
                           if (r.get("teacher_sha256") or teacher_sha) == teacher_sha]
    teacher_path = str(locate(results["teacher"]["checkpoint"], study))
    expected: dict[tuple[str, int], dict] = {}

    def args_of(variant: str, seed: int) -> list[str]:
        return [*student_args(variant, recipe_dir, steps["student"], own), "--seed_everything", str(seed),
                "--model.init_args.teacher", teacher_path]

    def latest(variant: str, seed: int) -> dict | None:
        saved = [*results["runs"], *(finished() if finished else [])]
        return newest([r for r in saved if r.get("teacher_sha256") == teacher_sha]).get((variant, seed))

    def changes_of(variant: str, seed: int) -> list[str]:
        """How the finished run's recipe differs from this command's ([] when its folder no longer tells)."""
        root = runs_dir / f"{variant}-seed{seed}"
        if not (root / "config.yaml").is_file():
            return []
        if (variant, seed) not in expected:
            expected[(variant, seed)] = resolved_recipe(student_yaml, args_of(variant, seed), root)
        return folder_changes(root, student_yaml, args_of(variant, seed), expected[(variant, seed)]) or []

    held: list[tuple[str, Path]] = []
    for variant in variants:
        for seed in range(seeds):
            root = runs_dir / f"{variant}-seed{seed}"
            claim = root.with_name(root.name + ".running")
            if latest(variant, seed) is not None and not claim_alive(claim) and not changes_of(variant, seed):
                continue
            if not claim_run(claim):
                print(f"skipping {root.name}: process {claim_owner(claim)} is running it", file=sys.stderr)
                held.append((f"{root.name} (process {claim_owner(claim)})", claim))
                continue
            try:
                entry = latest(variant, seed)
                changes = changes_of(variant, seed) if entry is not None else []
                if entry is not None and not changes:  # saved by another worker between the look and the claim
                    continue
                args = args_of(variant, seed)
                resume, earlier, resumed_from = None, None, None
                if changes:
                    print(f"retraining {root.name}: its recipe changed since it was trained ({'; '.join(changes[:3])}"
                          f"{'; ...' if len(changes) > 3 else ''})", file=sys.stderr)
                    shutil.rmtree(root, ignore_errors=True)
                elif root.exists():  # an interrupted run's folder: continue it, or its checkpoints would be mistaken for this run's
                    resume = resumable(root, student_yaml, args)
                    if resume is None:
                        print(f"removing {root}: a run that did not finish (no last checkpoint of this recipe)", file=sys.stderr)
                        shutil.rmtree(root)
                    else:
                        resumed_from = checkpoint_epoch(resume)  # before the run overwrites last.ckpt
                        print(f"resuming {root.name} from {resume} (epoch {resumed_from})", file=sys.stderr)
                        earlier = keep_earlier_metrics(root)
                ckpt, metrics, seconds = run_step(student_yaml, args, root, score, resume=resume)
                run = {"variant": variant, "seed": seed, "checkpoint": relative_to(ckpt, study), "teacher_sha256": teacher_sha,
                       "seconds": round(seconds, 1), "metrics": metrics, "finished_at": round(time.time(), 3)}
                if resume is not None:
                    run["resumed_from_epoch"] = resumed_from  # `seconds` is then the resumed part only
                    join_metrics(earlier, root / "metrics.csv")
                from .study_report import read_curve

                curve = read_curve(root)
                if curve is not None:
                    run["curve"] = curve
                results["runs"] = [r for r in results["runs"] if (r["variant"], r["seed"]) != (variant, seed)] + [run]
                checkpoint()
            finally:
                release(claim)
    checkpoint()
    results["held"] = [name for name, claim in held if claim_alive(claim) or latest(*_variant_seed(claim)) is None]
    return results


def _variant_seed(claim: Path) -> tuple[str, int]:
    variant, _, seed = claim.name[: -len(".running")].rpartition("-seed")
    return variant, int(seed)


def merge(on_disk: dict | None, results: dict, seconds_since_last_save: float, study: Path) -> dict:
    """What results.json holds after this process saves: its own runs added to those other processes
    sharing the study saved meanwhile (of one run, the one finished last), and its time added to theirs.
    Only runs of the study's teacher count, the one whose checkpoint is there with its recorded sha256: a
    worker still holding a former teacher never brings its runs back, and a retrained teacher starts over."""
    if not on_disk:
        return results
    valid = lambda t: current_sha(t, study) if (t or {}).get("sha256") else None  # noqa: E731 - recorded and still there
    ours, theirs = valid(results.get("teacher")), valid(on_disk.get("teacher"))
    sha, base = (ours, results) if ours else (theirs, on_disk)
    if sha is None:
        return results
    kept = [r for r in on_disk.get("runs", []) if r.get("teacher_sha256") == sha] if theirs == sha else []
    runs = list(newest([*kept, *(r for r in results["runs"] if r.get("teacher_sha256") == sha)]).values())
    merged = {**base, "command": results["command"], "runs": runs,
              "seconds": round(float(on_disk.get("seconds") or 0.0) + seconds_since_last_save, 1)}
    own = {**(on_disk.get("own_variants") or {}), **(results.get("own_variants") or {})}
    if own:
        merged["own_variants"] = own
    merged["table"] = table(runs, own)
    return merged


def run_command(recipe: str, variants: list[str], seeds: int, study: Path, overrides: list[str], argv: list[str],
                score: str = "best", teacher_ckpt: str | None = None, own: dict[str, str] | None = None) -> int:
    """`distill study` without --report: runs (its share of) the study, saving into STUDY/results.json under
    its lock; 0 when the study is complete, 3 when runs are left to other live workers."""
    path = study / "results.json"
    command = study_command(argv)
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous and portable_argv(split_command(previous.get("command") or "")) != split_command(command):
        print(f"resuming {path} (written by: {previous.get('command')})", file=sys.stderr)
    saved = {"seconds": float((previous or {}).get("seconds") or 0.0)}

    def save(results: dict) -> None:
        # Under a lock and merged with what is on disk: several processes may share one study (the same
        # command started once per core), and each saves its own runs without losing the others'.
        with results_lock(study):
            on_disk = json.loads(path.read_text()) if path.is_file() else None
            merged = merge(on_disk, results, results["seconds"] - saved["seconds"], study)
            saved["seconds"] = results["seconds"]
            write_study(merged, path)

    def finished() -> list[dict]:
        return json.loads(path.read_text())["runs"] if path.is_file() else []

    try:
        results = run_study(recipe, variants, seeds, study, overrides, command, save=save, previous=previous,
                            score=score, finished=finished, teacher_ckpt=teacher_ckpt, own=own)
    except StudyBusy as e:
        print(f"distill study: {e}", file=sys.stderr)
        return 3
    if (study / "results.md").is_file():
        print((study / "results.md").read_text())
    if results["held"]:
        print(f"study incomplete: {len(results['held'])} run(s) held by other live workers: {', '.join(results['held'])}; "
              f"results.json holds them once those workers finish", file=sys.stderr)
        return 3
    return 0
