"""The README's Python API example runs as written (fewer epochs)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def api_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch):
    code = api_example()
    assert code.count("max_epochs=") == 2
    code = re.sub(r"max_epochs=\d+", "max_epochs=1", code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    student = namespace["student"]
    assert student.num_classes == 10 and student.dist_token is not None
    assert (tmp_path / "runs/api/student").is_dir()
