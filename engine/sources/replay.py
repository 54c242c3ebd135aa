"""Replay: feed a file of raw events through the same pipeline as `run`, calling nothing.

The file is JSON lines (one event per line) or one JSON array. Events are judged in file
order, on a clock taken from their own timestamps, with repeated ids dropped exactly as the
daemon drops them (the same pipeline over an in-memory store). Threshold windows, throttles,
the blast-radius guard, shadow mode and follow-up cancellation therefore behave exactly as
in `run`. A line that is not JSON is reported with its line number and skipped.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from engine.echoes import DEFAULT_ECHOES, DEFAULT_LOOP_BREAKER, Echoes, LoopBreaker
from engine.errors import EngineError
from engine.jsontext import lenient_json, loads_json
from engine.lookups import LookupTable
from engine.pipeline import BatchResult, Cancelled, Judged, Pipeline, Planned
from engine.rules import MaxActions, RuleSet
from engine.silencing import MuteCheck, Quiet
from engine.sources.replay_worker import (
    READ_BUFFER,
    JudgedChunk,
    can_fork,
    judged_chunks,
    parallel_possible,
)
from engine.store.memory import MemoryStore

BATCH_SIZE = 2000
_GC_YOUNG_THRESHOLD = 50_000  # the default is 700 allocations


class ReplayInputError(EngineError):
    """The events file cannot be read at all."""


@dataclass(slots=True)
class ReplayStats:
    records: int = 0
    bad_lines: int = 0
    rejected: int = 0
    duplicates: int = 0
    matches: int = 0
    planned: int = 0
    cancelled: int = 0
    # Per rule id: a digest rule's matches, which plan nothing during a replay, show here.
    matches_by_rule: Counter[str] = field(default_factory=Counter)
    planned_by_rule: Counter[str] = field(default_factory=Counter)


def is_json_array(path: Path) -> bool:
    """Whether the file holds one JSON array (read whole) rather than JSON lines."""
    try:
        with path.open("rb") as handle:
            return _holds_array(handle)
    except OSError:
        return False  # `read_records` reports why


def _holds_array(handle: IO[bytes]) -> bool:
    """Whether the first character after any whitespace is `[`; the handle is rewound."""
    first = handle.read(1)
    while first in (b" ", b"\n", b"\r", b"\t"):
        first = handle.read(1)
    handle.seek(0)
    return first == b"["


def read_records(path: Path, on_bad_line: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    """Yield the file's records with their line numbers; bad lines go to `on_bad_line`."""
    try:
        handle: IO[bytes] = path.open("rb", buffering=READ_BUFFER)
    except OSError as error:
        raise ReplayInputError(f"cannot read {path}: {error.strerror}") from None
    with handle:
        if _holds_array(handle):
            yield from _read_array(path, handle)
            return
        loads = orjson.loads
        for number, line in enumerate(handle, start=1):
            try:
                # JSON allows the whitespace around a value: no need to strip the line first.
                value = loads(line)
            except orjson.JSONDecodeError as error:
                try:
                    value = lenient_json(line)  # 1e400, lone surrogates: as the daemon reads them
                except ValueError:
                    if line.strip():
                        on_bad_line(number, f"not valid JSON: {error}")
                    continue
            yield number, value


def _read_array(path: Path, handle: IO[bytes]) -> Iterator[tuple[int, Any]]:
    data = handle.read()
    try:
        items = loads_json(data)
    except orjson.JSONDecodeError as error:
        raise ReplayInputError(f"{path}: not a valid JSON array: {error}") from None
    if not isinstance(items, list):
        raise ReplayInputError(f"{path}: expected a JSON array of events")
    # Line numbers of array items are not tracked; report the item's position instead.
    yield from enumerate(items, start=1)


def replay(
    path: Path,
    rules: RuleSet,
    *,
    on_planned: Callable[[Planned | Cancelled], None],
    on_problem: Callable[[int, str], None],
    on_progress: Callable[[int], None] | None = None,
    dry_run: bool = False,
    max_actions: MaxActions | None = None,
    parallel: bool | None = None,
    echoes: Echoes = DEFAULT_ECHOES,
    loop_breaker: LoopBreaker | None = DEFAULT_LOOP_BREAKER,
    until: datetime | None = None,
    mute_windows: Sequence[MuteCheck] = (),
    lookups: LookupTable | None = None,
) -> ReplayStats:
    """Run every event of `path` through the pipeline; report each planned action, and each
    waiting follow-up a later event cancelled, in the order the events caused them.

    `parallel` reads, parses and matches in a second process (see `replay_worker`); the
    outcome is the same. None: when the machine has a second core and the file is large.

    The file is complete up to its newest event so far: absence rules judge silences as
    the events' clock moves, and, with `until`, up to `until` after the last event.
    `mute_windows` silence matches by the events' own time (the config's, as `run` has them).
    `lookups`: the facts rules with `lookup` read (a lookup file, `engine.lookup_fixture`);
    None: every lookup is unavailable, as the rules' `on_lookup_error` then decides."""
    stats = ReplayStats()
    # Thrown away at the end: it keeps only what the pipeline reads back, compactly.
    store = MemoryStore()
    windows = tuple(mute_windows)
    # Nothing runs a replay's actions: a status action counts as done when planned, so the
    # file's later events it would have caused are recognized as its echoes.
    pipeline = Pipeline(
        rules,
        store,
        dry_run=dry_run,
        max_actions=max_actions,
        audit=False,
        echoes=echoes,
        loop_breaker=loop_breaker,
        planned_is_done=True,
        quiet=(lambda _now: Quiet((), None, windows)) if windows else None,
    )

    def bad_line(line: int, reason: str) -> None:
        stats.bad_lines += 1
        on_problem(line, reason)

    def flush(lines: list[int], records: list[Any]) -> None:
        stats.records += len(records)
        batch = pipeline.process(
            records,
            source="replay",
            in_given_order=True,
            complete_to_newest=True,
            lookups=lookups,
        )
        report(batch, lines, records)

    def flush_judged(chunk: JudgedChunk) -> None:
        stats.records += len(chunk.judged) + len(chunk.malformed)
        for line, reason in chunk.malformed:
            stats.rejected += 1
            on_problem(line, f"malformed event: {reason}")
        report(pipeline.process_judged(chunk.judged, lookups=lookups), chunk.lines, chunk.judged)

    def report(result: BatchResult, lines: list[int], records: Sequence[object]) -> None:
        for index, reason in result.rejected:
            on_problem(lines[index], f"malformed event: {reason}")
        for event_id, reason in result.poisoned:
            on_problem(_line_of(event_id, lines, records), f"event quarantined: {reason}")
        stats.rejected += len(result.rejected) + len(result.poisoned)
        stats.duplicates += result.duplicates
        stats.matches += result.matches
        stats.planned += len(result.planned)
        stats.matches_by_rule.update(result.matched_rules)
        stats.planned_by_rule.update(planned.rule.id for planned in result.planned)
        stats.cancelled += len(result.cancelled)
        for line in result.in_order():
            on_planned(line)
        if on_progress:
            on_progress(stats.records)

    # A batch holds thousands of freshly parsed dicts that outlive many young-generation
    # collections, none of them in a reference cycle: collecting less often saves a tenth
    # of replay's time. The thresholds are put back afterwards.
    thresholds = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *thresholds[1:])
    if parallel is None:
        parallel = parallel_possible(path)
    if rules.usage_rules:
        parallel = False  # usage records are read by the pipeline (`engine.usage`), here only
    try:
        if parallel and can_fork() and not is_json_array(path):
            for chunk in judged_chunks(path, rules, BATCH_SIZE, _GC_YOUNG_THRESHOLD):
                for line, reason in chunk.bad_lines:
                    bad_line(line, reason)
                flush_judged(chunk)
        else:
            lines: list[int] = []
            records: list[Any] = []
            for line, value in read_records(path, bad_line):
                lines.append(line)
                records.append(value)
                if len(records) >= BATCH_SIZE:
                    flush(lines, records)
                    lines, records = [], []
            if records:
                flush(lines, records)
        if until is not None and rules.has_absence:
            report(pipeline.judge_absences(until), [], [])
    finally:
        gc.set_threshold(*thresholds)
    return stats


def _line_of(event_id: int, lines: list[int], records: Sequence[object]) -> int:
    """The line of the record holding `event_id` (a rare question: no index is kept)."""
    for line, record in zip(lines, records, strict=True):
        if isinstance(record, Judged):
            found: object = record.event.id
        elif isinstance(record, dict):
            found = record.get("id")
        else:
            continue
        if str(found).strip() == str(event_id):
            return line
    return 0
