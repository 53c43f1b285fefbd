"""The project's mutation test: break one feature at a time on purpose and check that its tests notice.

Each entry of `tools/mutations.py` (`MUTATIONS`) names a feature, one exact piece of code in one file
(`pattern`, which must occur there exactly once), the bug a refactor could make of it (`replacement`) and
the tests that must fail with it. The tool copies the repository once to a scratch folder (the working
tree is never touched: tracked and untracked-but-not-ignored files, plus a link to `data/`), and for each
entry puts the replacement in, runs the named tests there and puts the original back. The tests run with
the scratch copy first on PYTHONPATH (and as the working directory), so they and every process they start
import the mutated code; the tool checks that `import distill` resolves into the copy before it starts.

    caught           the tests failed: the feature is guarded
    SURVIVED         the tests passed with the feature broken: a test is missing or too weak
    pattern-missing  the pattern is not in the file exactly once: the code moved on; update the entry
    error            the tests could not tell (nothing collected, a usage error, a time-out): fix the entry

Before the mutants, the named tests run once on the unmutated copy (`--no-baseline` skips it): a test that
fails anyway would make every mutant look caught.

    python tools/mutate.py                  # every entry (slow: ~10 s to minutes per entry)
    python tools/mutate.py ID [ID ...]      # some entries, by id
    python tools/mutate.py --list           # ids, files, features
    python tools/mutate.py --check          # only that every entry applies (pattern exactly once, tests exist)
    python tools/mutate.py --log-dir DIR    # each run's pytest output in DIR/ID.log

Exit status: 0 when every entry run was caught (with --check: every entry applies), 1 when one survived,
is missing its pattern or could not run, 2 when the baseline fails. `tests/test_mutations.py` runs
`--check` in the suite, so the list cannot silently rot. Run the whole list (`nice -n 15`, it takes an
hour or so on a 2-core machine) before resolving an issue that adds a feature.

Adding an entry (with every feature or fix): append to `MUTATIONS` in tools/mutations.py

    Mutation(
        id="short-unique-name",
        feature="one line: what the feature is",
        file="distill/some/module.py",
        pattern='''exact code copied from the file, whitespace included (several lines allowed)''',
        replacement='''the same code with the bug''',
        tests=["tests/test_x.py::test_y", "tests/test_x.py::test_z[param]"],  # pytest node ids
    ),

then run `python tools/mutate.py short-unique-name`. It must say `caught`; when it says SURVIVED, write
the test that fails with the bug, and run it again. Make the pattern long enough to be unique (the tool
refuses one that occurs twice) and the replacement a realistic slip (a wrong constant, a dropped guard,
two lines swapped), not a crash any test would notice. Optional fields: `k` (a pytest -k expression added
to the node ids) and `timeout` (seconds, default 600).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation  # noqa: E402

PYTEST_ARGS = ["-q", "-x", "--no-header", "-p", "no:cacheprovider", "-p", "no:randomly"]


# ------------------------------------------------------------------------------------------ checking
def problems_of(entry: Mutation, root: Path = REPO) -> list[str]:
    """Why `entry` cannot be applied to the code under `root` (empty when it can)."""
    out = []
    path = root / entry.file
    if not path.is_file():
        return [f"{entry.id}: {entry.file} does not exist"]
    count = path.read_text(encoding="utf-8").count(entry.pattern)
    if count != 1:
        out.append(f"{entry.id}: the pattern occurs {count} times in {entry.file} (must be exactly once)")
    if entry.pattern == entry.replacement:
        out.append(f"{entry.id}: the replacement equals the pattern")
    if not entry.tests:
        out.append(f"{entry.id}: no tests named")
    for node in entry.tests:
        out += [f"{entry.id}: {p}" for p in _test_problems(node, root)]
    return out


def _test_problems(node: str, root: Path) -> list[str]:
    """A node id `tests/file.py[::Class]::test[params]` whose file or function does not exist."""
    file, *names = node.split("::")
    path = root / file
    if not path.is_file():
        return [f"test file {file} does not exist"]
    text = path.read_text(encoding="utf-8")
    missing = []
    for i, name in enumerate(names):
        name = name.split("[", 1)[0]
        kind = "def" if i == len(names) - 1 else "class"
        if not re.search(rf"^\s*{kind} {re.escape(name)}\b", text, re.MULTILINE):
            missing.append(f"{node}: no `{kind} {name}` in {file}")
    return missing


def _parameters_problems(nodes: dict[str, str], root: Path = REPO) -> list[str]:
    """Node ids with a parameter (`test[id]`, entry id given) that pytest does not collect: a parameter can be
    renamed or dropped while its function stays (their files are collected in one run, a few seconds)."""
    if not nodes:
        return []
    files = sorted({node.split("::", 1)[0] for node in nodes})
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *PYTEST_ARGS[2:], *files],
                         cwd=root, capture_output=True, text=True, timeout=600)
    collected = set(res.stdout.split())
    return [f"{entry}: {node}: pytest collects no such parameter" for node, entry in nodes.items()
            if node not in collected]


def check(entries: list[Mutation]) -> list[str]:
    problems = []
    seen: set[str] = set()
    parametrized: dict[str, str] = {}
    for entry in entries:
        if entry.id in seen:
            problems.append(f"{entry.id}: the id is used twice")
        seen.add(entry.id)
        found = problems_of(entry)
        problems += found
        parametrized.update({n: entry.id for n in entry.tests if "[" in n and not any(n in f for f in found)})
    return problems + _parameters_problems(parametrized)


# --------------------------------------------------------------------------------------- running
def scratch_copy(dest: Path) -> None:
    """The working tree's files (tracked, and untracked but not ignored) under `dest`, and `data/` linked."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
        files = [f for f in listed if f and (REPO / f).is_file() and not (REPO / f).is_symlink()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but caches and outputs
        skip = {".git", ".venv", ".venv-ci", "__pycache__", ".pytest_cache", "runs", "wandb", "lightning_logs", "data"}
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)
    if (REPO / "data").exists() and not (dest / "data").exists():
        (dest / "data").symlink_to((REPO / "data").resolve())


def test_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(scratch), env.get("PYTHONPATH")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must never be read from a mutant's .pyc
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    return env


def check_imports_the_copy(scratch: Path, env: dict[str, str]) -> None:
    """`import distill` must resolve into the scratch copy, also from another working directory (as the
    processes that the tests start see it), not into the editable install of the working tree."""
    res = subprocess.run([sys.executable, "-c", "import distill; print(distill.__file__)"], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, timeout=300)
    where = Path(res.stdout.strip() or "?").resolve()
    if res.returncode != 0 or scratch.resolve() not in where.parents:
        raise SystemExit(f"mutate.py: the tests would import distill from {where}, not from the scratch copy "
                         f"{scratch}: {res.stderr.strip()[-300:]}")


def run_tests(entry: Mutation, scratch: Path, env: dict[str, str]) -> tuple[int | None, str, float]:
    """(pytest's exit code or None on time-out, its output, seconds)."""
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *entry.tests, *(["-k", entry.k] if entry.k else [])]
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=entry.timeout)
        return res.returncode, res.stdout + res.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, time.perf_counter() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:200]
    return ""


def verdict(code: int | None) -> str:
    # pytest: 0 all passed, 1 some failed, 2 interrupted (e.g. a collection error: an import broke), 3
    # internal error, 4 usage error, 5 nothing collected
    if code == 0:
        return "SURVIVED"
    if code in (1, 2):
        return "caught"
    return "error"


def run_entry(entry: Mutation, scratch: Path, env: dict[str, str], log_dir: Path | None) -> str:
    if problems_of(entry, scratch):
        result, detail, seconds = "pattern-missing", "; ".join(problems_of(entry, scratch)), 0.0
    else:
        path = scratch / entry.file
        original = path.read_text(encoding="utf-8")
        try:
            path.write_text(original.replace(entry.pattern, entry.replacement), encoding="utf-8")
            code, output, seconds = run_tests(entry, scratch, env)
        finally:
            path.write_text(original, encoding="utf-8")
        result = verdict(code)
        if code is None:
            detail = f"timed out after {entry.timeout} s"
        elif result == "caught":
            detail = first_failure(output) or f"pytest exit {code}"
        elif result == "error":
            detail = f"pytest exit {code}: " + " | ".join(output.strip().splitlines()[-3:])
        else:
            detail = (output.strip().splitlines() or [""])[-1]
        if log_dir is not None:
            (log_dir / f"{entry.id}.log").write_text(output)
    print(f"{result:<16} {entry.id:<40} {seconds:6.1f} s  {entry.feature}", flush=True)
    if detail:
        print(f"{'':<17}{detail}", flush=True)
    return result


def baseline(entries: list[Mutation], scratch: Path, env: dict[str, str]) -> bool:
    """The entries' tests on the unmutated copy: one pytest run for every node id, one per `-k` entry."""
    groups = [Mutation(id="baseline", feature="", file="", pattern="", replacement="",
                       tests=sorted({t for e in entries if not e.k for t in e.tests}),
                       timeout=sum(e.timeout for e in entries if not e.k))]
    groups += [Mutation(id=f"baseline {e.id}", feature="", file="", pattern="", replacement="", tests=e.tests, k=e.k,
                        timeout=e.timeout) for e in entries if e.k]
    ok = True
    for group in groups:
        if not group.tests:
            continue
        code, output, seconds = run_tests(group, scratch, env)
        print(f"{group.id}: {len(group.tests)} test id(s), pytest exit {code} in {seconds:.0f} s", flush=True)
        if code != 0:
            ok = False
            print("\n".join(output.strip().splitlines()[-15:]), flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="entries to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--check", action="store_true", help="only check that every entry applies (fast)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on unmutated code")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each entry's pytest output there")
    args = parser.parse_args(argv)

    entries = list(MUTATIONS)
    if args.ids:
        known = {e.id for e in entries}
        unknown = [i for i in args.ids if i not in known]
        if unknown:
            parser.error(f"unknown id(s): {', '.join(unknown)}; see --list")
        entries = [e for e in entries if e.id in args.ids]
    if args.list:
        for e in entries:
            print(f"{e.id:<40} {e.file:<40} {e.feature}")
        print(f"{len(entries)} entries")
        return 0
    if args.check:
        problems = check(entries)
        print("\n".join(problems) if problems else f"all {len(entries)} entries apply")
        return 1 if problems else 0

    scratch = Path(tempfile.mkdtemp(prefix="distill-mutate-"))
    try:
        scratch_copy(scratch)
        env = test_env(scratch)
        check_imports_the_copy(scratch, env)
        print(f"scratch copy: {scratch} (distill imported from there)", flush=True)
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
        if not args.no_baseline and not baseline([e for e in entries if not problems_of(e, scratch)], scratch, env):
            print("mutate.py: the tests fail without any mutation; fix them first", file=sys.stderr)
            return 2
        start = time.perf_counter()
        results = {e.id: run_entry(e, scratch, env, args.log_dir) for e in entries}
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    counts = {r: sum(v == r for v in results.values()) for r in ("caught", "SURVIVED", "pattern-missing", "error")}
    print(f"\n{len(results)} mutations in {(time.perf_counter() - start) / 60:.1f} min: "
          + ", ".join(f"{n} {r}" for r, n in counts.items()))
    bad = [i for i, r in results.items() if r != "caught"]
    if bad:
        print("not caught: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
