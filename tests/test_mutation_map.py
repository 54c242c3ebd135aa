"""`make mutation` judges each core module against the test files pyproject.toml names for
it ([tool.mutation.against]): every module mutmut mutates has some, and each exists."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(
        "mutation_script", str(ROOT / "scripts" / "mutation")
    )
    spec = importlib.util.spec_from_loader("mutation_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_every_core_module_has_test_files_to_be_judged_against():
    script = _script()
    modules = script.core_modules()
    assert "engine/store/sqlite.py" in modules
    assert "engine/actions/_docs.py" not in modules  # not mutated: it writes documentation
    tests_of = script.against_map()
    missing = [m for m in modules if not script.tests_for(m, tests_of)]
    assert missing == []


def test_every_test_file_named_for_mutation_exists():
    named = {t for tests in _script().against_map().values() for t in tests}
    assert sorted(t for t in named if not (ROOT / t).is_file()) == []


def test_a_modules_own_entry_comes_before_the_glob_of_its_folder():
    script = _script()
    tests_of = script.against_map()
    assert script.tests_for("engine/rules/when.py", tests_of) == tests_of["engine/rules/when.py"]
    assert script.tests_for("engine/rules/loader.py", tests_of) == tests_of["engine/rules/*"]
    assert script.tests_for("engine/cli.py", tests_of) is None
