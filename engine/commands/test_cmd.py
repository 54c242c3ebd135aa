"""`event-engine test PATH`: run rule test files and report each test as passed or failed.

A failed test lists each expectation that did not hold, with where it is written and why:
which part of the rule (`when`, `condition`, `threshold`, `throttle`, ...) stopped an
expected action, how the closest planned action differs, or which event caused an action
the test says must not come. Exit 0 when every test passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import structlog

from engine import logging as engine_logging

if TYPE_CHECKING:  # loaded by the command itself, not by every start of the CLI
    from engine.ruletests import FileResult

_T = TypeVar("_T")

EXIT_OK = 0
EXIT_FAILED = 1


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "test",
        help="run rule test files: events in, expected actions out (exit 1 on a failure)",
        description="Run rule test files (YAML naming the rules, the events and the "
        "expected actions; see docs/rule-tests.md). PATH is a test file or a folder, searched "
        "recursively for test files (YAML with top-level `tests:`); rule files beside them "
        "are skipped. Events go through the same pipeline as `run`, on a virtual clock taken "
        "from their timestamps, and nothing is called.",
    )
    parser.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=Path("rules"),
        metavar="PATH",
        help="rule test file or folder (default: rules/)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as one JSON document"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also list the actions each test planned",
    )
    parser.set_defaults(handler=_cmd_test)


def _cmd_test(args: argparse.Namespace) -> int:
    from engine.ruletests import run_path

    results = _quietly(lambda: run_path(args.path))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(as_json(results), option=orjson.OPT_INDENT_2))
        sys.stdout.write("\n")
    else:
        print_report(results, verbose=args.verbose)
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAILED


def _quietly(run: Callable[[], _T]) -> _T:
    """Run with only errors logged: the report explains every failure, and the pipeline's
    warnings (an action a test expects to fail, say) would only bury it."""
    saved = structlog.get_config()
    engine_logging.configure("error", "console")
    try:
        return run()
    finally:
        structlog.configure(**saved)


def print_report(results: list[FileResult], *, verbose: bool = False) -> None:
    out = sys.stdout
    passed = failed = 0
    for file in results:
        for problem in file.errors:
            # Problems in the test file already start with its `file:line`.
            shown = problem if problem.startswith(str(file.path)) else f"{file.path}: {problem}"
            out.write(f"ERROR {shown}\n")
        for case in file.cases:
            mark = "PASS" if case.passed else "FAIL"
            out.write(f"{mark} {case.where} {case.name}\n")
            if case.passed:
                passed += 1
            else:
                failed += 1
            for failure in case.failures:
                out.write(f"    ✗ {failure.message}")
                out.write(f" ({failure.where})\n" if failure.where else "\n")
                for detail in failure.details:
                    out.write(f"        {detail}\n")
            if verbose:
                for outcome in case.outcomes:
                    out.write(f"    · {outcome.describe()}\n")
    untested = _untested(results)
    if untested:
        out.write(
            "note: no passing `expect` names these rules: " + ", ".join(sorted(untested)) + "\n"
        )
    broken = sum(1 for file in results if file.errors)
    summary = f"rule tests: {passed} passed, {failed} failed"
    if broken:
        summary += f", {broken} test files unusable"
    out.write(summary + f" ({len(results)} files)\n")


def as_json(results: list[FileResult]) -> dict[str, Any]:
    files = []
    for file in results:
        files.append(
            {
                "file": str(file.path),
                "errors": file.errors,
                "rules": list(file.rule_ids),
                "tests": [
                    {
                        "name": case.name,
                        "where": case.where,
                        "passed": case.passed,
                        "failures": [f.as_json() for f in case.failures],
                        "actions": [o.as_json() for o in case.outcomes],
                    }
                    for case in file.cases
                ],
            }
        )
    cases = [case for file in results for case in file.cases]
    return {
        "passed": sum(1 for c in cases if c.passed),
        "failed": sum(1 for c in cases if not c.passed),
        "unusable_files": sum(1 for file in results if file.errors),
        "untested_rules": sorted(_untested(results)),
        "files": files,
    }


def _untested(results: list[FileResult]) -> set[str]:
    """Rules under test that no passing `expect` entry names (a hint, not a failure)."""
    under_test = {rule_id for file in results for rule_id in file.rule_ids}
    tested = {rule_id for file in results for rule_id in file.tested_rule_ids}
    return under_test - tested
