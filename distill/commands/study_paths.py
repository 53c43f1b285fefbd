"""Paths in a study's files, written so that they name no folder of the machine they ran on.

results.json records the teacher's and each run's checkpoint relative to the study folder (OUT, the
folder of results.json), so the folder can be moved or published; the command and the recipe are
recorded as given, with absolute paths under the current directory made relative to it (the directory
the command is run from again). Files written before (tools/reproduce.py) hold absolute paths, or
paths relative to the directory the study ran in: they are still read, and `--report` rewrites them.
"""
from __future__ import annotations

import os
from pathlib import Path


def _within(path: str | Path, folder: str | Path) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def relative_to(path: str | Path, start: str | Path) -> str:
    """`path` relative to the folder `start` (".." where it lies outside), with forward slashes."""
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return str(path)


def locate(recorded: str, study: Path) -> Path:
    """The file a path in results.json names: an absolute path as it is; a relative one from the study
    folder, or, in files written before paths were relative to it, from the current directory."""
    path = Path(recorded)
    if path.is_absolute():
        return path
    if not (study / path).exists() and path.exists():
        return path
    return Path(os.path.normpath(study / path))


def study_relative(recorded: str, study: Path, own: bool = False, given_as: str | None = None) -> str:
    """`recorded` (any form `locate` reads) as a path relative to the study folder. An absolute path
    outside the current directory (a file from another machine or checkout) is placed by what is known
    of it: `own` files of the study sit in its runs/ folder, and a file given on the command line as
    `given_as` (relative) ends with that; otherwise it is left as it is."""
    path = Path(recorded)
    if not path.is_absolute():
        if (study / path).exists() or (not path.exists() and not _within(path, study)):
            return path.as_posix()  # already relative to the study folder
        return relative_to(path, study)  # relative to the current directory (older files)
    if _within(path, Path.cwd()):
        return relative_to(path, study)
    parts = path.parts
    if own and "runs" in parts:
        return Path(*parts[len(parts) - 1 - parts[::-1].index("runs"):]).as_posix()
    if given_as and not Path(given_as).is_absolute():
        tail = Path(os.path.normpath(given_as)).parts
        if len(tail) < len(parts) and parts[-len(tail):] == tail:
            return relative_to(Path(*tail), study)
    return recorded


def portable(arg: str) -> str:
    """An absolute path under the current directory made relative to it; anything else as it is."""
    return relative_to(arg, Path.cwd()) if os.path.isabs(arg) and _within(arg, Path.cwd()) else arg


def portable_argv(argv: list[str]) -> list[str]:
    """The command line as recorded: `portable` applied to each argument and to each `--key=VALUE`'s value."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"{key}={portable(value)}" if eq and key.startswith("--") else portable(arg))
    return out


def recipe_label(recipe_dir: str | Path) -> str:
    """How results.json names the recipe: a relative path as given; an absolute one `portable`, or by
    its name when it is a shipped recipe outside the current directory (what `distill study NAME` takes)."""
    from .pipeline import shipped_recipes

    path = Path(recipe_dir)
    if path.is_absolute() and not _within(path, Path.cwd()) and path.resolve().parent == shipped_recipes().resolve():
        return path.name
    return portable(str(path))
