"""What an install ships: the recipes at the top of the repository travel inside the wheel as
distill/recipes, and `distill pipeline NAME` finds them there (not only in a checkout); `distill study`
runs from the wheel alone."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distill.commands.pipeline import resolve_recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").glob("*/*.yaml"))


def test_checkout_resolves_shipped_recipes_by_name():
    assert resolve_recipe("digits") == REPO / "recipes" / "digits"


@pytest.mark.slow
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

    # `distill study` from the wheel alone, away from any checkout: a shipped recipe by name, tiny settings
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--teacher.model.init_args.model", "cifar_resnet10",
            "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32"]
    argv = ["digits", "--variants", "none", "--seeds", "1", "--out", "study", *tiny]
    res = subprocess.run([sys.executable, "-m", "distill.cli", "study", *argv], cwd=elsewhere, capture_output=True,
                         text=True, timeout=600, env={**env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    study = elsewhere / "study"
    results = json.loads((study / "results.json").read_text())
    assert results["recipe"] == "digits" and results["command"] == "distill study " + shlex.join(argv)
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [("none", 0)]
    assert (study / results["runs"][0]["checkpoint"]).is_file() and (study / results["teacher"]["checkpoint"]).is_file()
    assert "| no distillation |" in (study / "results.md").read_text()
    for name in ("results.json", "results.md"):
        assert str(tmp_path) not in (study / name).read_text(), name


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
