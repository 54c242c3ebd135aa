"""The layers hold: the import contracts in pyproject.toml (run by `make lint`) pass on the
code as it is, and fail, naming the chain, as soon as a core module imports I/O or the
daemon, or two modules import each other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(project: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(project / "pyproject.toml"), "--no-cache"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    shutil.copytree(ROOT / "engine", tmp_path / "engine", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_line(path: Path, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition("from __future__ import annotations\n")
    path.write_text(f"{head}from __future__ import annotations\n{line}\n{rest}", encoding="utf-8")


def test_the_import_contracts_hold(project: Path) -> None:
    result = _lint(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("events.py", "import httpx", "the core imports no I/O"),
        ("rules/ruleset.py", "import sqlite3", "the core imports no I/O"),
        ("pipeline.py", "import engine.store.sqlite", "the core imports no I/O"),
        ("state.py", "import apscheduler.triggers.cron", "the core imports no I/O"),
        ("actions/log.py", "import engine.dispatch", "the core imports no I/O"),
        ("sources/poller.py", "import engine.daemon", "only the entry points wire the daemon"),
        ("model.py", "import engine.pipeline", "no import cycles"),
        ("console/rates.py", "import engine.daemon", "the console wires nothing"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    project: Path, module: str, line: str, broken: str
) -> None:
    _add_line(project / "engine" / module, line)
    result = _lint(project)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout
