"""tools/mutate.py, the project's mutation test: every entry of tools/mutations.py still applies to the code
(its pattern occurs exactly once, its tests exist), so the list cannot silently rot; a broken entry is named;
the scratch copy the mutants run in is what the tests import. The mutants themselves run outside the suite
(`python tools/mutate.py`, slow)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_tool

REPO = Path(__file__).resolve().parent.parent
mutate = load_tool("mutate")


def test_every_mutation_applies_to_the_code(capsys):
    code = mutate.main(["--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(mutate.MUTATIONS) >= 40 and len({m.id for m in mutate.MUTATIONS}) == len(mutate.MUTATIONS)


def test_an_entry_that_no_longer_applies_is_named(tmp_path):
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "a.py").write_text("x = 1\ny = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n    pass\n")

    def entry(pattern: str, tests: list[str]):
        return mutate.Mutation(id="e", feature="f", file="distill/a.py", pattern=pattern, replacement="z = 2",
                               tests=tests)

    assert mutate.problems_of(entry("x = 1", ["tests/test_a.py::test_one"]), tmp_path) == []
    assert mutate.problems_of(entry("= 1", ["tests/test_a.py::test_one"]), tmp_path) == [
        "e: the pattern occurs 2 times in distill/a.py (must be exactly once)"]
    assert mutate.problems_of(entry("w = 1", ["tests/test_a.py::test_one"]), tmp_path) == [
        "e: the pattern occurs 0 times in distill/a.py (must be exactly once)"]
    assert mutate.problems_of(entry("x = 1", ["tests/test_a.py::test_two[p]"]), tmp_path) == [
        "e: tests/test_a.py::test_two[p]: no `def test_two` in tests/test_a.py"]
    assert mutate.problems_of(entry("x = 1", ["tests/test_b.py::test_one"]), tmp_path) == [
        "e: test file tests/test_b.py does not exist"]


@pytest.mark.parametrize("code, verdict", [(0, "SURVIVED"), (1, "caught"), (2, "caught"), (4, "error"), (5, "error"),
                                           (None, "error")])
def test_pytest_exit_codes_read_as_verdicts(code, verdict):
    assert mutate.verdict(code) == verdict


def test_the_scratch_copy_is_what_the_tests_import(tmp_path):
    """The mutants run in a copy of the working tree, which the tests (and the processes they start, from any
    folder) import instead of the editable install of the checkout; a mutation there leaves the checkout alone."""
    mutate.scratch_copy(tmp_path)
    assert (tmp_path / "tools" / "mutate.py").read_text() == (REPO / "tools" / "mutate.py").read_text()
    assert (tmp_path / "tests" / "conftest.py").is_file() and not (tmp_path / ".venv").exists()
    env = mutate.test_env(tmp_path)
    mutate.check_imports_the_copy(tmp_path, env)  # raises SystemExit otherwise
    (tmp_path / "distill" / "errors.py").write_text("MUTATED = True\n")
    res = subprocess.run([sys.executable, "-c", "import distill.errors as e; print(e.MUTATED)"], env=env, cwd="/",
                         capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "True", res.stderr
    assert "MUTATED" not in (REPO / "distill" / "errors.py").read_text()


def test_a_parameter_that_pytest_does_not_collect_is_named(tmp_path):
    """A parametrized test whose parameter was renamed or dropped (its function stays) is named by --check."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('x', [1, 2], ids=['one', 'two'])\ndef test_p(x):\n    pass\n")
    nodes = {"tests/test_a.py::test_p[one]": "kept", "tests/test_a.py::test_p[three]": "dropped"}
    assert mutate._parameters_problems(nodes, tmp_path) == [
        "dropped: tests/test_a.py::test_p[three]: pytest collects no such parameter"]
