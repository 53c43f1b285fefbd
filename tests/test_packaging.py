"""What an install ships: the recipes at the top of the repository travel inside the wheel as
distill/recipes, and `distill pipeline NAME` finds them there (not only in a checkout)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from distill.commands.pipeline import resolve_recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").glob("*/*.yaml"))


def test_checkout_resolves_shipped_recipes_by_name():
    assert resolve_recipe("digits") == REPO / "recipes" / "digits"


def test_wheel_ships_the_recipes_and_resolves_them_by_name(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("distill", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    wheel = next((tmp_path / "wheel").glob("distill-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"distill/recipes/{r}" for r in SHIPPED} <= names, sorted(n for n in names if "recipes" in n)
        zf.extractall(tmp_path / "site")  # a pure-Python wheel installs by unpacking

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import distill, distill.commands.pipeline as p; from distill.cli import DistillCLI; "
            "r = p.resolve_recipe('digits'); c = DistillCLI.parse_recipe(['--config', str(r / 'student.yaml')]); "
            "print(distill.__file__); print(r); print(c.model.class_path)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    res = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    module, recipe, class_path = res.stdout.strip().splitlines()[-3:]
    assert Path(module).is_relative_to(tmp_path / "site")
    assert Path(recipe) == tmp_path / "site" / "distill" / "recipes" / "digits"
    assert class_path == "distill.DistillModule"


def test_pyproject_lists_every_recipe_folder():
    """setuptools ships an unlisted folder with a warning; listing each keeps the build quiet and explicit."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {f"distill.recipes.{p.name}" for p in (REPO / "recipes").iterdir() if any(p.glob("*.yaml"))}
    assert folders <= listed, sorted(folders - listed)


def test_pyproject_lists_every_subpackage():
    """setuptools' explicit list: a subpackage missing from it would be left out of the wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    subpackages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "distill").rglob("__init__.py")}
    assert subpackages <= listed, sorted(subpackages - listed)
