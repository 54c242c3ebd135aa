"""A pytest plugin that judges mutmut's mutants in forked children (`scripts/mutation --against`).

mutmut starts its pytest anew for every mutant, which costs the import of the engine and the
collection of the tests each time (seconds) and covers a function with every test that ever
called it. This plugin collects the named test files once, then:

1. runs them once, clean, in a forked child that records which tests reach which mutated
   function and how long each takes (a test failing here is left out, and said);
2. forks a fresh child per mutant from the parent, which has imported the tests but run none
   (so no cache is warm), activates the mutant in it and runs only the tests that reached the
   mutant's function, fastest first, stopping at the first failure;
3. writes each verdict into mutmut's own `.meta` file at once, so `scripts/mutation --scores`
   and `mutmut show` read them, and an interrupted run keeps what it judged.

A child still running after `MUTATION_FORK_TIMEOUT_FACTOR` times its tests' clean time (plus
five seconds) is killed with its process group: a timeout counts as caught, as in mutmut.

Driven by environment variables the `scripts/mutation` orchestrator sets:
`MUTATION_FORK_NAMES` (a file listing the mutant names, one a line), `MUTATION_FORK_JOBS`,
`MUTATION_FORK_TIMEOUT_FACTOR`. Only the named test files' tests can kill a mutant here, so a
score measured this way can be too low, never too high.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_STDOUT = os.dup(1)  # taken at import, before pytest captures or a child silences fd 1
_KILLED, _SURVIVED, _NO_TESTS, _TIMEOUT = 1, 0, 33, 36
_WORDS = {_KILLED: "killed", _SURVIVED: "survived", _NO_TESTS: "no tests", _TIMEOUT: "timeout"}


def _function_of(mutant: str) -> str:
    """`engine.state.x_key_of__mutmut_2` -> `engine.state.x_key_of` (mutmut's mangled name)."""
    return mutant.partition("__mutmut_")[0]


def _module_path(mutant: str) -> Path:
    module = _function_of(mutant).rpartition(".")[0]
    path = Path(*module.split(".")).with_suffix(".py.meta")
    package = Path(*module.split("."), "__init__.py.meta")  # `engine.actions.x_register`
    return package if not path.exists() and package.exists() else path


def _run_items(items: list[pytest.Item], *, stop_at_failure: bool) -> list[tuple[str, bool, float]]:
    """Run `items` in this process in order: (nodeid, failed, seconds) for each run."""
    from _pytest.runner import runtestprotocol

    results = []
    for index, item in enumerate(items):
        following = items[index + 1] if index + 1 < len(items) else None
        started = time.perf_counter()
        reports = runtestprotocol(item, nextitem=following, log=False)
        failed = any(report.failed for report in reports)
        results.append((item.nodeid, failed, time.perf_counter() - started))
        if failed and stop_at_failure:
            break
    return results


def _quiet() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def _clean_run(items: list[pytest.Item], out: Path) -> int:
    """In a forked child: every item once with mutmut's hit recording on."""
    from mutmut.mutation.trampoline import set_mutant_under_test
    from mutmut.state import state

    set_mutant_under_test("stats")
    found: dict[str, Any] = {"tests": {}}
    from _pytest.runner import runtestprotocol

    for index, item in enumerate(items):
        following = items[index + 1] if index + 1 < len(items) else None
        state()._stats.clear()
        started = time.perf_counter()
        reports = runtestprotocol(item, nextitem=following, log=False)
        found["tests"][item.nodeid] = {
            "failed": any(report.failed for report in reports),
            "seconds": time.perf_counter() - started,
            "reached": sorted(state()._stats),
        }
    out.write_text(json.dumps(found))
    return 0


def _fork(work: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setpgid(0, 0)
            _quiet()
            code = work()
        finally:
            os._exit(code)
    return pid


def _record(mutant: str, code: int) -> None:
    meta = _module_path(mutant)
    data = json.loads(meta.read_text())
    data["exit_code_by_key"][mutant] = code
    temporary = meta.with_suffix(f".meta.{os.getpid()}.tmp")  # runs side by side
    temporary.write_text(json.dumps(data, indent=4))
    temporary.replace(meta)


def _say(text: str) -> None:
    """A progress line on the real stdout, past pytest's capture."""
    os.write(_STDOUT, (text + "\n").encode())


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    names_file = os.environ.get("MUTATION_FORK_NAMES")
    if not names_file or session.config.option.collectonly:
        return None
    # No one reads a failure's report here, and pytest's long traceback of one costs more
    # than the test (seconds for a deep recursion): a killed mutant should cost its test.
    session.config.option.tbstyle = "no"
    import engine

    if "mutants" not in Path(engine.__file__).parts:
        raise pytest.UsageError(f"the tests import {engine.__file__}, not the mutated copy")
    mutants = Path(names_file).read_text().split()
    jobs = max(1, int(os.environ.get("MUTATION_FORK_JOBS", "1")))
    factor = float(os.environ.get("MUTATION_FORK_TIMEOUT_FACTOR", "3"))
    by_id = {item.nodeid: item for item in session.items}

    clean_file = Path(names_file).with_suffix(".clean.json")
    kills = Path(names_file).with_suffix(".kills")  # each killed mutant and the test that did
    started = time.monotonic()
    pid = _fork(lambda: _clean_run(session.items, clean_file))
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not clean_file.exists():
        raise pytest.UsageError("the clean run of the tests did not finish")
    clean = json.loads(clean_file.read_text())["tests"]
    failing = sorted(nodeid for nodeid, found in clean.items() if found["failed"])
    for nodeid in failing:
        _say(f"left out, fails without any mutant: {nodeid}")
    reaching: dict[str, list[str]] = defaultdict(list)
    for nodeid, found in clean.items():
        if not found["failed"]:
            for function in found["reached"]:
                reaching[function].append(nodeid)
    seconds = {nodeid: found["seconds"] for nodeid, found in clean.items()}
    _say(
        f"clean run: {len(clean)} tests in {time.monotonic() - started:.1f} s; "
        f"{len(mutants)} mutants to judge, {jobs} at a time"
    )

    queue = []
    counts: dict[int, int] = defaultdict(int)
    for mutant in mutants:
        tests = sorted(reaching.get(_function_of(mutant), []), key=lambda n: seconds[n])
        if not tests:
            _record(mutant, _NO_TESTS)
            counts[_NO_TESTS] += 1
        else:
            queue.append((mutant, tests))

    running: dict[int, tuple[str, float, float]] = {}
    judged = 0

    def start(mutant: str, tests: list[str]) -> None:
        from mutmut.mutation.trampoline import set_mutant_under_test

        items = [by_id[nodeid] for nodeid in tests]

        def work() -> int:
            set_mutant_under_test(mutant)
            left = items
            while left:
                results = _run_items(left, stop_at_failure=True)
                failing = next((nodeid for nodeid, failed, _ in results if failed), None)
                if failing is None:
                    return _SURVIVED
                # A test that failed once may only be slow under load: it kills the mutant
                # when it fails again.
                if _run_items([by_id[failing]], stop_at_failure=True)[0][1]:
                    with kills.open("a") as out:
                        out.write(f"{mutant} {failing}\n")
                    return _KILLED
                left = left[len(results) :]
            return _SURVIVED

        limit = factor * sum(seconds[n] for n in tests) + 5.0
        running[_fork(work)] = (mutant, time.monotonic(), limit)

    def finish(pid: int, code: int) -> None:
        nonlocal judged
        mutant, began, _ = running.pop(pid)
        verdict = code if code in (_KILLED, _SURVIVED, _TIMEOUT) else _KILLED
        _record(mutant, verdict)
        counts[verdict] += 1
        judged += 1
        if verdict == _SURVIVED or judged % 25 == 0 or judged == len(queue):
            caught = counts[_KILLED] + counts[_TIMEOUT]
            _say(
                f"[{judged}/{len(queue)}] {_WORDS[verdict]:<8} {mutant} "
                f"({time.monotonic() - began:.1f} s); caught {caught} of {judged}"
            )

    pending = list(reversed(queue))
    while pending or running:
        while pending and len(running) < jobs:
            start(*pending.pop())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            if pid in running:
                finish(pid, os.waitstatus_to_exitcode(status))
            continue
        now = time.monotonic()
        for pid, (_, began, limit) in list(running.items()):
            if now - began > limit:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                finish(pid, _TIMEOUT)
        select.select([], [], [], 0.02)

    caught = counts[_KILLED] + counts[_TIMEOUT]
    _say(
        f"done in {time.monotonic() - started:.0f} s: caught {caught} of {judged} judged "
        f"({100 * caught / max(judged, 1):.1f} %); "
        f"{counts[_NO_TESTS]} reached by none of these tests"
    )
    return True
