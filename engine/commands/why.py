"""`event-engine why`: what the engine decided about a SIM or an event, and how it ended.

Read from the audit log: every rule that matched, every action planned, scheduled, held or
skipped (with the reason the pipeline recorded), and every attempt's outcome; then the
actions as they stand in the outbox now. Events are listed in the order they happened, and
every time is printed one way (UTC, to the second, with `Z`), in the details too. For a SIM,
the decisions that did nothing and were summarized by the store's retention (all but the
newest per rule) are counted at the end. Rules that did *not* match leave no audit row, so
`--event ID --explain` fetches that event from the emnify API again (the store keeps event
timestamps only, not payloads, for the dedup horizon of a day) and checks each current rule
against it, naming the first reason a rule does not match.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from engine.commands.state_file import DEMO_STORE, add_store_options, open_store, stored_id
from engine.commands.tables import emit, table, timestamp
from engine.errors import EngineError
from engine.model import Intent
from engine.ports import Store
from engine.usage import is_usage_event_id, record_id_of


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "why",
        help="explain what the engine did for a SIM or an event, from the audit log",
        description="Show, from the audit log, which rules matched the events of a SIM (or "
        "one event), which actions they planned, how each attempt ended, and where each "
        "action stands now. --explain (with --event) also fetches the event from the API "
        "and tells for every current rule whether it matches and, if not, why.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--sim", metavar="ICCID", help="the SIM's ICCID")
    target.add_argument("--event", type=stored_id, metavar="ID", help="an event id")
    add_store_options(parser)
    parser.add_argument(
        "--explain",
        action="store_true",
        help="with --event: fetch the event from the API and check every current rule "
        "(needs the application token and the config's rules)",
    )
    parser.add_argument(
        "--rules", type=Path, metavar="PATH", help="with --explain: rules to check instead"
    )
    parser.set_defaults(handler=_cmd_why)


def collect(store: Store, *, iccid: str | None = None, event_id: int | None = None) -> Any:
    """The audit trail grouped by event in event-time order, with each event's intents as
    they stand now."""
    rows = (
        store.audit_rows(iccid=iccid) if iccid is not None else store.audit_rows(event_id=event_id)
    )
    # By event and organisation: two organisations (`organisations:`) may reuse an id.
    events: dict[tuple[int | None, str], list[dict[str, Any]]] = {}
    event_times: dict[tuple[int | None, str], float] = {}
    for row in rows:
        key = (row["event_id"], row.get("organisation") or "")
        events.setdefault(key, []).append(_decision(row))
        if row.get("event_ts") is not None:
            event_times.setdefault(key, row["event_ts"])
    ids = list(dict.fromkeys(e for e, _ in events if e is not None))
    if event_id is not None and event_id not in ids:
        ids.append(event_id)  # no decision recorded, but intents might still exist
    intents: dict[tuple[int | None, str], list[dict[str, Any]]] = {}
    for intent in store.intents_for_events(ids):
        key = (intent.event_id, intent.target.get("organisation") or "")
        intents.setdefault(key, []).append(_intent(intent))
    timed: list[tuple[float | None, dict[str, Any]]] = []
    for key in dict.fromkeys([*events, *intents]):
        moment = event_times.get(key)
        if moment is None and key[0] is not None:
            seen = store.seen_at(key[0], key[1])
            moment = seen.timestamp() if seen is not None else None
        entry = {
            "event_id": key[0],
            **({"organisation": key[1]} if key[1] else {}),
            "seen_at": timestamp(moment),
            "decisions": events.get(key, []),
            "actions": intents.get(key, []),
        }
        timed.append((moment, entry))
    # In the order the events happened (the audit log holds them in the order they were
    # judged: a late event, or one the Data Streamer delivered first, comes out of turn);
    # events of unknown time last, in the order judged.
    timed.sort(key=lambda item: (item[0] is None, item[0] or 0.0))
    out = [entry for _, entry in timed]
    subject: dict[str, Any] = {"sim": iccid} if iccid is not None else {"event_id": event_id}
    result = {**subject, "events": out}
    if iccid is not None:
        result["summarized"] = [
            {
                "rule": row["rule_id"],
                "outcome": row["outcome"],
                "count": row["count"],
                "first_event_at": timestamp(row["first_ts"]),
                "last_event_at": timestamp(row["last_ts"]),
            }
            for row in store.decision_summaries(iccid)
        ]
        silences = _silences_naming(store, iccid)
        if silences:
            result["silences"] = silences
    return result


def _silences_naming(store: Store, iccid: str) -> list[dict[str, Any]]:
    """The silences in force that name this SIM (those by tag, endpoint or rule show in the
    decisions they silenced: "silenced by #ID (comment)")."""
    from engine.clock import system_clock
    from engine.commands.silence_cmd import as_json

    return [
        as_json(silence)
        for silence in store.silences(system_clock())
        if ("iccid", iccid) in silence.matchers
    ]


def _decision(row: dict[str, Any]) -> dict[str, Any]:
    decision = {
        "at": timestamp(row["at"]),
        "rule": row["rule_id"],
        "action": row["action"],
        "outcome": row["outcome"],
        "detail": one_time_format(row["detail"]),
        "intent_id": row["intent_id"],
    }
    if row.get("steps"):
        decision["steps"] = orjson.loads(row["steps"])
    return decision


def step_lines(steps: dict[str, Any]) -> list[tuple[str, str]]:
    """A rule's trace (`AuditRow.steps`) as (step, what it read or counted), in the order
    the pipeline judged them; what the console's trace page and `why` show."""
    lines: list[tuple[str, str]] = []
    when = steps.get("when")
    if when is not None:
        lines.append(("when", _pairs(when) or "any event"))
    if "condition" in steps:
        lines.append(("condition read", _pairs(steps["condition"]) or "no values"))
    threshold = steps.get("threshold")
    if threshold is not None:
        lines.append(("threshold", _threshold(threshold)))
    throttle = steps.get("throttle")
    if throttle is not None:
        lines.append(("throttle", _throttle(throttle)))
    for scope, guard in (steps.get("guard") or {}).items():
        counted = (
            f"{guard['count']} destructive actions within {guard['within']}, at most {guard['max']}"
        )
        lines.append((f"guard ({scope})", counted + ("; held" if guard["held"] else "")))
    if "silence" in steps:
        lines.append(("silence", steps["silence"]))
    if "shadow" in steps:
        lines.append(("shadow", steps["shadow"]))
    return lines


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(
        f"not ({_pairs(value)})" if name == "not" else f"{name}={_value(value)}"
        for name, value in values.items()
    )


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _threshold(threshold: dict[str, Any]) -> str:
    if threshold.get("key") is None:
        return f"{threshold['per']} is missing: not counted (needs {threshold['needed']})"
    return (
        f"{threshold['count']} of {threshold['needed']} within {threshold['within']}"
        f" for {threshold['per']}={threshold['key']}"
    )


def _throttle(throttle: dict[str, Any]) -> str:
    key = f"{throttle['per']}={throttle['key'] or '(missing)'}"
    if throttle["throttled"]:
        return f"throttled for {key} until {throttle['until']}"
    return f"not throttled; quiet for {key} until {throttle['until']}"


# An ISO 8601 time as the pipeline and the dispatcher write them into details: with or
# without fractions of a second, with `Z` or an offset.
_ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")


def one_time_format(text: str | None) -> str | None:
    """`text` with every ISO time in it written as the rest of `why` writes times."""
    if not text:
        return text

    def rewrite(found: re.Match[str]) -> str:
        try:
            return timestamp(datetime.fromisoformat(found.group(0))) or found.group(0)
        except ValueError:
            return found.group(0)

    return _ISO_TIME.sub(rewrite, text)


def _intent(intent: Intent) -> dict[str, Any]:
    return {
        "id": intent.id,
        "rule": intent.rule_id,
        "action": intent.kind,
        "status": intent.status.value,
        "attempts": intent.attempts,
        "due_at": timestamp(intent.due_at),
        "last_error": intent.last_error,
    }


def render(data: dict[str, Any]) -> str:
    subject = f"SIM {data['sim']}" if "sim" in data else f"event {data['event_id']}"
    events = data["events"]
    summarized = data.get("summarized") or []
    if not events and not summarized and not data.get("silences"):
        return f"{subject}: nothing in the audit log (no rule matched it, or it was never seen)"
    decisions = sum(len(e["decisions"]) for e in events)
    lines = [f"{subject}: {len(events)} event(s), {decisions} decision(s)"]
    for event in events:
        lines.append("")
        seen = f"  (event time {event['seen_at']})" if event["seen_at"] else ""
        whose = f" of organisation {event['organisation']}" if event.get("organisation") else ""
        lines.append(f"{_event_label(event['event_id'])}{whose}{seen}")
        if event["decisions"]:
            rows: list[tuple[object, ...]] = [
                (d["at"], d["rule"], d["action"], d["outcome"], d["detail"])
                for d in event["decisions"]
            ]
            lines.append(table(["time", "rule", "action", "outcome", "detail"], rows, "  "))
            lines.extend(_steps_text(event["decisions"]))
        if event["actions"]:
            lines.append("  actions now:")
            rows = [
                (
                    f"#{a['id']}",
                    a["rule"],
                    a["action"],
                    a["status"],
                    a["attempts"],
                    _now_detail(a),
                )
                for a in event["actions"]
            ]
            lines.append(table(["id", "rule", "action", "status", "tries", "detail"], rows, "    "))
    if summarized:
        lines.append("")
        lines.append("earlier decisions that did nothing, counted instead of kept one by one:")
        rows = [
            (s["rule"], s["outcome"], s["count"], s["first_event_at"], s["last_event_at"])
            for s in summarized
        ]
        lines.append(table(["rule", "outcome", "count", "first event", "last event"], rows, "  "))
    for silence in data.get("silences") or []:
        lines.append("")
        lines.append(
            f"silenced now by #{silence['id']} until {silence['ends_at']} "
            f"({silence['comment']}, by {silence['created_by']}): its matches run no action"
        )
    if "rules" in data:
        lines.append("")
        lines.append("current rules against this event:")
        rows = [
            (r["rule"], "matches" if r["matches"] else "no", r["reason"]) for r in data["rules"]
        ]
        lines.append(table(["rule", "match", "why not"], rows, "  "))
    return "\n".join(lines)


def _steps_text(decisions: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for decision in decisions:
        if decision.get("steps"):
            lines.append(f"  steps of {decision['rule']}:")
            lines.extend(f"    {step}: {text}" for step, text in step_lines(decision["steps"]))
    return lines


def _now_detail(action: dict[str, Any]) -> str | None:
    if action["status"] in ("pending", "held", "shadow") and action["due_at"]:
        detail = f"due {action['due_at']}"
        return f"{detail}; last error: {action['last_error']}" if action["last_error"] else detail
    error: str | None = action["last_error"]
    return error


def explain(config: Any, rules: Any, store: Store, event_id: int) -> list[dict[str, Any]]:
    """Fetch the event from the API and check each rule of `rules` against it."""
    from engine.events import normalize

    moment = store.seen_at(event_id)
    if moment is None:
        raise EngineError(
            f"event {event_id} is not among the store's seen events (they are kept for a day "
            "past the poll overlap), so its time is unknown and it cannot be fetched"
        )
    record = asyncio.run(_fetch(config, event_id, moment))
    if record is None:
        raise EngineError(
            f"event {event_id} was not returned by {config.api.base_url} around "
            f"{timestamp(moment)} (past the API's 30-day retention?)"
        )
    event = normalize(record)
    return [
        {"rule": rule.id, "matches": reason is None, "reason": reason}
        for rule in rules.rules
        for reason in [rules.explain(event, rule)]
    ]


async def _fetch(config: Any, event_id: int, moment: Any) -> dict[str, Any] | None:
    from engine.emnify import EmnifyClient

    start = moment.replace(microsecond=0) - timedelta(seconds=1)
    async with EmnifyClient(config.application_token(), config.api) as client:
        async for page in client.iter_event_pages(start, start + timedelta(seconds=3), sort="id"):
            for record in page.events:
                if isinstance(record, dict) and record.get("id") == event_id:
                    return record
    return None


def _cmd_why(args: argparse.Namespace) -> int:
    if args.explain and args.event is None:
        raise EngineError("--explain needs --event ID (a SIM has many events)")
    store, path = open_store(args)
    try:
        data = collect(store, iccid=args.sim, event_id=args.event)
        if args.explain:
            from engine import logging as engine_logging
            from engine.config import load_config
            from engine.cron import check_crontab
            from engine.rules import load_rules

            config = load_config(args.config)
            # stdout carries the answer (maybe JSON); the client's warnings go to stderr.
            engine_logging.configure("warning", config.log_format)
            rules = load_rules(args.rules or config.rules, cron=check_crontab)
            data["rules"] = explain(config, rules, store, args.event)
    finally:
        store.close()
    emit(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else render(data))
    if not data["events"] and args.store is None and DEMO_STORE.exists() and path != DEMO_STORE:
        print(
            f"note: read {path}; after `event-engine demo` add --store {DEMO_STORE}",
            file=sys.stderr,
        )
    return 0


def _event_label(event_id: int | None) -> str:
    """`event 123`, or `usage record 45` for a usage record (judged under an id below zero)."""
    if event_id is None:
        return "event -"
    if is_usage_event_id(event_id):
        return f"usage record {record_id_of(event_id)}"
    return f"event {event_id}"
