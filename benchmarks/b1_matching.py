"""B1 matching: the real replay pipeline against parsing alone and against a naive loop.

All three read the same file in the same process, one after the other:
- parse-only: each line through orjson, the engine's JSON parser, and nothing else (the limit);
- the pipeline: `engine.sources.replay.replay` (normalize, dedup, match, plan, the store's
  batch transactions), each planned action serialized as `event-engine replay` prints it;
- naive: every rule's JsonLogic for every event with panzi-json-logic (on a prefix of the
  file, since it is slow; a rate is a rate).
Targets: the pipeline at least 25% of the parse-only rate and at least 20× the naive rate,
each ratio taken from the best of the rounds of one run: every round runs the three once, one
after the other, and a ratio compares two rates of the same round, measured minutes apart at
most, never the best pipeline of one round against the best naive loop of another.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks import naive
from benchmarks.harness import (
    Figure,
    Report,
    at_least,
    event_file,
    fmt_ratio,
    rules_file,
    timed,
)
from engine.events import normalize
from engine.rules import RuleSet, load_rules
from engine.sources.replay import replay
from engine.sources.replay_worker import READ_BUFFER

PARSE_SHARE = 0.25
NAIVE_FACTOR = 20.0
ROUNDS = 3


def parse_only(path: Path) -> int:
    """Read and parse every line the way replay reads them; the count of records."""
    count = 0
    loads = orjson.loads
    with path.open("rb", buffering=READ_BUFFER) as handle:
        for line in handle:
            text = line.strip()
            if text:
                loads(text)
                count += 1
    return count


def pipeline(path: Path, rules: RuleSet) -> tuple[int, int]:
    """Replay `path` as the CLI does, output to nowhere; (records, planned actions)."""
    sink = Path("/dev/null").open("wb")  # noqa: SIM115 - closed below
    write = sink.write
    dumps = orjson.dumps

    def planned(item: Any) -> None:
        write(dumps(item.as_json()) + b"\n")

    def problem(line: int, reason: str) -> None:
        raise RuntimeError(f"{path}:{line}: {reason}")

    try:
        stats = replay(path, rules, on_planned=planned, on_problem=problem)
    finally:
        sink.close()
    return stats.records, stats.planned


def engine_matches(path: Path, rules: RuleSet, limit: int) -> int:
    """Matches of `rules` on the first `limit` events, to check the naive loop against."""
    with path.open("rb") as handle:
        return sum(
            len(rules.match(normalize(orjson.loads(line))))
            for line in itertools.islice(handle, limit)
        )


def round_rates(rounds: int, *measures: Callable[[], int]) -> list[tuple[float, ...]]:
    """The rate (count per second) of each measure in each of `rounds` rounds, each round
    running every measure once, one after the other: a machine whose speed drifts over
    minutes then weighs on each alike, which running all rounds of one measure before the
    next does not."""
    rates: list[tuple[float, ...]] = []
    for _ in range(rounds):
        row: list[float] = []
        for count_of in measures:
            gc.collect()
            seconds, count = timed(count_of)
            row.append(count / seconds)
        rates.append(tuple(row))
    return rates


def best_rates(rounds: int, *measures: Callable[[], int]) -> list[float]:
    """The best rate of each measure over `rounds` rounds (`round_rates`)."""
    return [max(column) for column in zip(*round_rates(rounds, *measures), strict=True)]


@dataclass(frozen=True, slots=True)
class BestRound:
    """The round whose ratio of `value` to `reference` was the highest, and the ratios of
    all rounds in the order they ran (to show how far the others were)."""

    number: int  # 1-based
    value: float
    reference: float
    ratios: tuple[float, ...]

    def described(self) -> str:
        """E.g. "best of 3 rounds (round 2; all: 18.1×, 21.0×, 19.4×)"."""
        if len(self.ratios) == 1:
            return "1 round"
        each = ", ".join(fmt_ratio(ratio) for ratio in self.ratios)
        return f"best of {len(self.ratios)} rounds (round {self.number}; all: {each})"


def best_round(pairs: list[tuple[float, float]]) -> BestRound:
    """Of (value, reference) rates measured side by side in each round, the round with the
    highest ratio."""
    ratios = tuple(value / reference if reference > 0 else 0.0 for value, reference in pairs)
    index = max(range(len(pairs)), key=ratios.__getitem__)
    value, reference = pairs[index]
    return BestRound(index + 1, value, reference, ratios)


def run(report: Report, *, events: int, naive_events: int, rules: int = 50) -> float:
    """Measure B1; returns the pipeline's rate (events/s) for others to compare with."""
    path = event_file(events)
    rule_set = load_rules(rules_file(rules))
    # Three rounds, in the quick run too: one run of each left the ratio to whatever else
    # the machine did during it, the engine most of all (it alone needs both cores), and
    # with two the figure still swung by a sixth from run to run.
    rates = round_rates(
        ROUNDS,
        lambda: parse_only(path),
        lambda: pipeline(path, rule_set)[0],
        lambda: naive.count_matches(path, rule_set, naive_events)[0],
    )
    against_parse = best_round([(engine, parse) for parse, engine, _ in rates])
    against_naive = best_round([(engine, slow) for _, engine, slow in rates])

    _, naive_found = naive.count_matches(path, rule_set, min(naive_events, 2000))
    engine_found = engine_matches(path, rule_set, min(naive_events, 2000))
    if naive_found != engine_found:
        report.note(
            f"B1: the naive loop found {naive_found} matches, the engine {engine_found}, "
            "on the same events: the naive reference is not doing the same work"
        )

    size = f"{events:,} events, {len(rule_set)} rules"
    report.add(
        Figure(
            "B1",
            f"pipeline vs parse-only ({size}), {against_parse.described()}",
            against_parse.value,
            "events/s",
            "parse-only",
            against_parse.reference,
            f"≥ {PARSE_SHARE:.0%} of parse-only",
            at_least(against_parse.value, against_parse.reference, PARSE_SHARE),
        )
    )
    report.add(
        Figure(
            "B1",
            f"pipeline vs naive loop (naive on {naive_events:,} events), "
            f"{against_naive.described()}",
            against_naive.value,
            "events/s",
            "naive panzi-json-logic loop",
            against_naive.reference,
            f"≥ {NAIVE_FACTOR:.0f}× the naive loop, best round",
            at_least(against_naive.value, against_naive.reference, NAIVE_FACTOR),
        )
    )
    return max(engine for _, engine, _ in rates)
