"""Replay on two cores: a worker process reads, parses, normalizes and matches; the replaying
process judges what matched.

Reading a line, parsing it, normalizing the event and finding the rules it matches depend on
nothing but the line and the rules, so they can run ahead in another process. What depends
on the events before (dedup, threshold windows, throttles, the blast-radius guard, follow-up
cancellation) and the store stay in the replaying process, in file order, exactly as in a
replay on one core.

The worker is forked, so it holds the very rule set the replay was given. It sends one
message per chunk of lines, flat arrays rather than objects, since passing a parsed event
between processes costs as much as parsing it again:
- an event that no rule and no `cancel_if` matches travels as its id and timestamp only
  (it is judged as a `Judged` event with no rules and an empty `raw`);
- a matched event travels as where its line lies in the file (the replaying process reads
  and parses it again) and the positions of the rules it matched;
- a line that is not an event travels as where it lies too, so the pipeline rejects it with
  its usual message;
- a line that is not JSON travels as its number and the parser's complaint.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import multiprocessing
import os
import signal
import traceback
from array import array
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from engine.errors import EngineError
from engine.events import Event, normalize
from engine.jsontext import lenient_json
from engine.pipeline import Judged
from engine.pipeline import malformed as reason_malformed
from engine.rules import Rule, RuleSet
from engine.rules.model import CancelIf

_BARE, _MATCHED, _RAW = 0, 1, 2
_NO_TAGS: frozenset[str] = frozenset()
# What an unmatched event leaves unknown: type, source, severity, alert, description, sim id,
# iccid, endpoint id and name (no rule reads them).
_UNKNOWN = (None, None, None, False, "", None, None, None, None)
_NOTHING: dict[str, Any] = {}  # the raw of every unmatched event; nothing reads it
_UNMATCHED_TAIL = (*_UNKNOWN, _NO_TAGS, _NOTHING)  # an unmatched Event after its id and time
# Event(...) and Judged(...) without the keyword handling of a named tuple's __new__: the
# unmatched events, most of a file's, are built here by the replaying process.
_new_tuple = tuple.__new__

# Below this size one core is quicker: starting the worker costs more than it saves.
MIN_PARALLEL_BYTES = 4 << 20
# Events files are read through a 1 MB buffer: with the default 8 KB, lines of about 1 KB
# refill it every few lines, which doubled the time to iterate a file's lines.
READ_BUFFER = 1 << 20
_PIPE_BYTES = 1 << 20
_FIRST_CHUNK = 250  # lines


class ReplayWorkerError(EngineError):
    """The worker process failed or died."""


class _Chunk(NamedTuple):
    kinds: bytearray  # _BARE, _MATCHED or _RAW per record
    lines: array[int]
    ids: array[int]
    stamps: array[float]
    # Where the lines to parse again lie in the file: (start, end) pairs, end excluded.
    spans: array[int]
    rule_counts: array[int]
    rule_positions: array[int]
    bad_lines: list[tuple[int, str]]


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def parallel_possible(path: Path) -> bool:
    """Whether a second core and a file big enough make the worker worth starting."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return cores >= 2 and size >= MIN_PARALLEL_BYTES


def judged_chunks(
    path: Path, rules: RuleSet, chunk_size: int, gc_threshold: int
) -> Iterator[JudgedChunk]:
    """Per chunk of the file, from a worker process: the `Judged` events with their line
    numbers, the lines that are not JSON, and the records that are not events."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    _widen(sender)
    worker = context.Process(
        target=_work,
        args=(path, rules, chunk_size, gc_threshold, sender),
        name="event-engine-replay-reader",
        daemon=True,
    )
    worker.start()
    sender.close()
    by_position = rules.rules
    file = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                message = receiver.recv()
            except EOFError:
                worker.join(5)
                raise ReplayWorkerError(
                    f"the replay's reader process ended unexpectedly (exit code {worker.exitcode})"
                ) from None
            if message is None:
                break
            if isinstance(message, str):
                raise ReplayWorkerError(f"the replay's reader process failed: {message}")
            yield _records(message, by_position, file, rules.reads_tag_list)
    finally:
        os.close(file)
        receiver.close()
        if worker.is_alive():
            worker.terminate()
        worker.join(5)


def _widen(connection: Connection) -> None:
    """Let the worker run several chunks ahead (a chunk is about 80 KB; a pipe holds 64 KB
    unless told otherwise), so a slow batch in the replaying process does not stall it."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    with contextlib.suppress(OSError):  # above the system's limit: the default will do
        fcntl.fcntl(connection.fileno(), set_size, _PIPE_BYTES)


class JudgedChunk(NamedTuple):
    """What `judged_chunks` yields for a chunk of the file."""

    lines: list[int]  # the line of each judged event
    judged: list[Judged]
    bad_lines: list[tuple[int, str]]  # lines that are not JSON, and why
    malformed: list[tuple[int, str]]  # records that are not events, and why


def _records(
    chunk: _Chunk, by_position: tuple[Rule, ...], file: int, tag_list: bool
) -> JudgedChunk:
    records: list[Judged] = []
    malformed: list[tuple[int, str]] = []
    unread: list[int] = []  # positions of the malformed records among the lines
    spans = chunk.spans
    # The lines to parse again, read in one piece and sliced without copying.
    offset = spans[0] if spans else 0
    size = spans[-1] - offset if spans else 0
    text = memoryview(os.pread(file, size, offset) if size else b"")
    if len(text) != size:
        raise ReplayWorkerError("the events file changed while it was being replayed")
    span = 0
    counts = iter(chunk.rule_counts)
    positions = chunk.rule_positions
    taken = 0
    loads = orjson.loads
    at = datetime.fromtimestamp
    append = records.append
    for kind, event_id, stamp in zip(chunk.kinds, chunk.ids, chunk.stamps, strict=True):
        if kind == _BARE:
            # Concatenated: a tuple display with *_UNMATCHED_TAIL builds a list first.
            event = _new_tuple(Event, (event_id, at(stamp, UTC)) + _UNMATCHED_TAIL)  # noqa: RUF005
            append(_new_tuple(Judged, (event, ())))
            continue
        line = text[spans[span] - offset : spans[span + 1] - offset]
        try:
            record = loads(line)
        except orjson.JSONDecodeError:
            record = lenient_json(bytes(line))  # the worker read it so already
        span += 2
        if kind == _MATCHED:
            count = next(counts)
            matched = [by_position[i] for i in positions[taken : taken + count]]
            taken += count
            append(Judged(normalize(record, tag_list=tag_list), matched))
            continue
        # Not an event the worker could read, or one a rule failed to match on there: read
        # here, and matched by the pipeline (which records which rule failed).
        try:
            append(Judged(normalize(record, tag_list=tag_list), None))
        except Exception as error:
            unread.append(len(records) + len(unread))
            malformed.append((chunk.lines[unread[-1]], reason_malformed(record, error)))
    lines = list(chunk.lines)
    if unread:
        skip = set(unread)
        lines = [line for position, line in enumerate(lines) if position not in skip]
    return JudgedChunk(lines, records, chunk.bad_lines, malformed)


def _work(
    path: Path, rules: RuleSet, chunk_size: int, gc_threshold: int, sender: Connection
) -> None:
    # Ctrl-C is for the replaying process to handle: it stops this one on its way out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.set_threshold(gc_threshold, *gc.get_threshold()[1:])
    try:
        _read(path, rules, chunk_size, sender.send)
    except BaseException:  # reported to the replaying process, which raises it
        sender.send(traceback.format_exc(limit=5).strip().splitlines()[-1])
    else:
        sender.send(None)
    finally:
        sender.close()


def _read(path: Path, rules: RuleSet, chunk_size: int, send: Callable[[Any], None]) -> None:
    position_of = {rule.id: position for position, rule in enumerate(rules.rules)}
    cancellers = [
        step.cancel_if for rule in rules for step in rule.actions if step.cancel_if is not None
    ]
    match = rules.match
    tag_list = rules.reads_tag_list
    loads = orjson.loads
    chunk = _empty_chunk()
    # Bound once per chunk: this loop runs once per line of the file.
    kinds, lines, ids, stamps = chunk.kinds, chunk.lines, chunk.ids, chunk.stamps
    # The first chunks are small and double up to `chunk_size`, so the replaying process
    # starts judging after a few milliseconds rather than after a whole chunk.
    limit = min(_FIRST_CHUNK, chunk_size)
    end = 0
    with path.open("rb", buffering=READ_BUFFER) as handle:
        for number, line in enumerate(handle, start=1):
            start, end = end, end + len(line)
            try:
                record = loads(line)
            except orjson.JSONDecodeError as error:
                try:
                    record = lenient_json(line)
                except ValueError:
                    if line.strip():
                        chunk.bad_lines.append((number, f"not valid JSON: {error}"))
                    continue
            lines.append(number)
            try:
                event = normalize(record, tag_list=tag_list)
                matched = match(event)
            except Exception:
                # Malformed, or a rule fails on it: the replaying process reads it again,
                # quarantines it or records which rule failed, as the daemon would.
                kinds.append(_RAW)
                ids.append(0)
                stamps.append(0.0)
                chunk.spans.extend((start, end))
                continue
            if matched or (cancellers and _may_cancel(event, cancellers)):
                kinds.append(_MATCHED)
                ids.append(0)
                stamps.append(0.0)
                chunk.spans.extend((start, end))
                chunk.rule_counts.append(len(matched))
                chunk.rule_positions.extend([position_of[rule.id] for rule in matched])
            else:
                kinds.append(_BARE)
                ids.append(event.id)
                stamps.append(event.timestamp.timestamp())
            if len(lines) >= limit:
                send(chunk)
                limit = min(limit * 2, chunk_size)
                chunk = _empty_chunk()
                kinds, lines, ids, stamps = chunk.kinds, chunk.lines, chunk.ids, chunk.stamps
    if chunk.lines or chunk.bad_lines:
        send(chunk)


def _may_cancel(event: Event, cancellers: list[CancelIf]) -> bool:
    """Whether the event meets any `cancel_if` (whether a follow-up waits for its key is
    for the replaying process to know)."""
    for cancel_if in cancellers:
        if cancel_if.when.mismatch(event) is not None:
            continue
        condition = cancel_if.condition
        try:
            if condition is None or condition.holds(event.raw):
                return True
        except EngineError:
            continue
        except Exception:
            return True  # the replaying process judges it, failure and all
    return False


def _empty_chunk() -> _Chunk:
    return _Chunk(
        bytearray(), array("q"), array("q"), array("d"), array("q"), array("I"), array("I"), []
    )
