"""Paths of the machine that trained a model, made fit to publish: a Hub folder (`recipe.yaml`, the
card's command line) must not carry the checkout's, the home folder's or a temporary folder's
absolute path, which name the user and mean nothing elsewhere.

An absolute path becomes relative where it still means something: to the toolkit's checkout when it
lies inside it (as the shipped recipes' `data/...` and `runs/...`, which run from the checkout), else
to the run folder when it lies inside or beside it (`./checkpoints/last.ckpt`,
`../teacher/checkpoints/best.ckpt`, the layout of `distill pipeline`). Any other absolute path, and
the run folder itself outside the checkout, is dropped.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

SOURCE_PREFIX = "local-dir:"  # a model name holding a path (`distill.models.sources`)


def checkout() -> Path | None:
    """The toolkit's source checkout, when it runs from one (not from an installed wheel)."""
    root = Path(os.path.abspath(__file__)).parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def _forms(path: Path) -> list[Path]:
    """A path as written and with its links resolved (a checkout's `data` may be a link elsewhere)."""
    return list(dict.fromkeys([Path(os.path.normpath(path)), path.resolve()]))


def _relative(path: Path, run_dir: Path | None) -> str | None:
    repo = checkout()
    for p in _forms(path):
        for base in _forms(repo) if repo is not None else []:
            if p.is_relative_to(base):
                return p.relative_to(base).as_posix()
        for run in _forms(run_dir) if run_dir is not None else []:
            if p.is_relative_to(run) and p != run:
                return f"./{p.relative_to(run).as_posix()}"
            if p.is_relative_to(run.parent) and p != run and len(run.parent.parts) > 1:  # beside it, not all of /
                return Path(os.path.relpath(p, run)).as_posix()
    return None


def portable_path(text: str, run_dir: str | os.PathLike | None) -> str | None:
    """`text` with its absolute path made relative (module docstring); unchanged when it holds none;
    None when the path means nothing off this machine."""
    prefix = SOURCE_PREFIX if text.startswith(SOURCE_PREFIX) else ""
    rest = text[len(prefix):]
    if not rest.startswith("/") or rest.startswith("//"):  # relative, a name, a URL: nothing of this machine
        return text
    relative = _relative(Path(rest), Path(os.path.abspath(run_dir)) if run_dir else None)
    return None if relative is None else prefix + relative


def portable_recipe(recipe: Any, run_dir: str | os.PathLike | None, where: str = "") -> tuple[Any, list[str]]:
    """(the recipe with every path made portable, the dotted fields dropped because theirs was not)."""
    dropped: list[str] = []
    if isinstance(recipe, dict):
        out = {}
        for key, value in recipe.items():
            field = f"{where}.{key}" if where else str(key)
            new, gone = portable_recipe(value, run_dir, field)
            dropped += gone
            if not (isinstance(value, str) and new is None):
                out[key] = new
        return out, dropped
    if isinstance(recipe, list):
        out_list = []
        for i, value in enumerate(recipe):
            new, gone = portable_recipe(value, run_dir, f"{where}[{i}]")
            dropped += gone
            if not (isinstance(value, str) and new is None):
                out_list.append(new)
        return out_list, dropped
    if isinstance(recipe, str):
        new = portable_path(recipe, run_dir)
        return new, [where] if new is None else []
    return recipe, []


def portable_recipe_text(text: str, run_dir: str | os.PathLike | None) -> str:
    """A run's `config.yaml` as a published `recipe.yaml`: unchanged when it holds no absolute path,
    else rewritten with a header saying how its paths read and which fields were dropped."""
    import yaml

    recipe = yaml.safe_load(text) or {}
    portable, dropped = portable_recipe(recipe, run_dir)
    if portable == recipe:
        return text
    header = ["# The resolved recipe of the run that trained this model, written by `distill export`. Paths are",
              "# relative to the toolkit's checkout, or, starting with ./ or ../, to the run's folder."]
    if dropped:
        header.append(f"# Paths elsewhere on the training machine were dropped (set them to train again): "
                      f"{', '.join(dropped)}")
    return "\n".join(header) + "\n" + yaml.safe_dump(portable, sort_keys=False)


def portable_command(command: str, run_dir: str | os.PathLike | None) -> str:
    """A command line whose absolute paths are made portable, or cut to their last part."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    out = []
    for word in words:
        option, eq, value = word.partition("=") if word.startswith("-") else ("", "", word)
        new = portable_path(value, run_dir)
        out.append(option + eq + (new if new is not None else Path(value.removeprefix(SOURCE_PREFIX)).name))
    return shlex.join(out)
