"""Rule tests: YAML files that feed events to rules on a virtual clock and state which
actions must (or must not) come out. `event-engine test PATH` runs them; see
docs/rule-tests.md for the file format.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigError
from engine.rules.loader import RULE_FILE_SUFFIXES
from engine.ruletests.runner import CaseResult, Failure, FileResult, Outcome, run_test_file
from engine.ruletests.spec import (
    Expectation,
    RuleTestCase,
    RuleTestFile,
    TestFileError,
    is_test_file,
    load_test_file,
)

__all__ = [
    "CaseResult",
    "Expectation",
    "Failure",
    "FileResult",
    "Outcome",
    "RuleTestCase",
    "RuleTestFile",
    "TestFileError",
    "find_test_files",
    "is_test_file",
    "load_test_file",
    "run_path",
    "run_test_file",
]


def find_test_files(path: Path) -> list[Path]:
    """The rule test files at `path`: the file itself, or every `*.yaml`/`*.yml` under the
    folder (recursively, in name order) that is a test file rather than a rule file."""
    try:
        if not path.exists():
            raise ConfigError(f"{path} does not exist", hint="give a rule test file or a folder")
        if path.is_file():
            return [path]
        found = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in RULE_FILE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    except OSError as error:  # e.g. a name too long, a folder we may not list
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise ConfigError(f"{shown}: cannot read: {error.strerror}") from None
    return [p for p in found if is_test_file(p)]


def run_path(path: Path) -> list[FileResult]:
    """Run every rule test file at `path`; a file that cannot be parsed is a failed file
    whose errors name `file:line`."""
    files = find_test_files(path)
    if not files:
        raise ConfigError(
            f"no rule test files in {path}",
            hint="a rule test file has top-level `rules:` (a path) and `tests:`",
        )
    results: list[FileResult] = []
    for file in files:
        try:
            spec = load_test_file(file)
        except TestFileError as error:
            results.append(FileResult(file, errors=[str(e) for e in error.errors]))
            continue
        results.append(run_test_file(spec))
    return results
