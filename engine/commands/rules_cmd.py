"""`event-engine rules list` and `event-engine rules resume RULE_ID|TARGET`: the rules as the
engine runs them right now, and the way back for a rule the blast-radius guard switched to
shadow, or for a SIM or endpoint the loop breaker holds (`sim:ID`, `endpoint:ID`).

Both read (and `resume` writes) the state store beside a running daemon: SQLite in WAL mode
lets them in, and the daemon notices a resume at its next batch.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import orjson

from engine.clock import system_clock
from engine.commands.state_file import add_store_options, open_store
from engine.commands.tables import emit, table, timestamp
from engine.errors import EngineError
from engine.model import GLOBAL_GUARD, HOLD
from engine.ports import Store
from engine.rules import MaxActions, Rule
from engine.state import format_duration


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "rules",
        help="list the rules with their mode and guard state; resume a rule the guard stopped "
        "or a SIM/endpoint the loop breaker holds",
        description="`rules list` shows every rule with the mode it runs in now (live, shadow, "
        "or shadow because its blast-radius guard tripped), its destructive actions in the "
        "guard's window, and its held actions, then the SIMs and endpoints the loop breaker "
        "holds. `rules resume RULE_ID` switches a tripped rule back to live; `rules resume "
        "sim:ID` (or `endpoint:ID`) lets status actions on a held target run again.",
    )
    sub = parser.add_subparsers(dest="rules_command", metavar="SUBCOMMAND", required=True)

    listing = sub.add_parser(
        "list",
        help="every rule with its mode, guard window and held actions",
        description="Load the rules (of the config, or --rules) and show for each its mode now, "
        "its destructive actions within its guard's window (by the wall clock), and how many "
        "of its actions the guard holds. Safe while `run` runs.",
    )
    add_store_options(listing)
    listing.add_argument(
        "--rules", type=Path, metavar="PATH", help="rule file or folder instead of the config's"
    )
    listing.set_defaults(handler=_cmd_list)

    resume = sub.add_parser(
        "resume",
        help="switch a rule the blast-radius guard stopped back to live, or release a SIM or "
        "endpoint the loop breaker holds",
        description="Undo a guard trip: the rule acts again, with an empty guard window. Or, "
        "given `sim:ID` or `endpoint:ID`, lift the loop breaker's hold on that target: its "
        "status actions run again, with an empty window of status changes. The actions held "
        "stay held (status `held`, never run) unless --release-held puts them back in the "
        "queue. A running daemon picks the change up at its next batch.",
    )
    resume.add_argument(
        "rule_id",
        metavar="RULE_ID|TARGET",
        help="the id of the rule to resume, or the held target (`sim:ID`, `endpoint:ID`)",
    )
    add_store_options(resume)
    resume.add_argument(
        "--release-held",
        action="store_true",
        help="also run the actions the guard held for this rule (review them first: "
        "`event-engine status`)",
    )
    resume.set_defaults(handler=_cmd_resume)


def collect(
    rules: list[Rule],
    store: Store | None,
    global_limit: MaxActions | None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """One entry per rule (and per guard override of a rule no longer in the files)."""
    now = system_clock().timestamp() if now is None else now
    overrides = store.rule_overrides() if store else {}
    guards = store.guard_summary() if store else {}
    listed: list[dict[str, Any]] = []
    if global_limit is not None:
        entries = guards.get(GLOBAL_GUARD, ([], 0))[0]
        listed.append(
            {
                "rule": GLOBAL_GUARD,
                "mode": "-",
                "guard": _window(entries, global_limit, now),
                "held": None,
                "note": "global guard (config guard.max_actions)",
            }
        )
    for rule in rules:
        override = overrides.pop(rule.id, None)
        entries, held = guards.get(rule.id, ([], 0))
        mode: str = rule.mode
        note = "" if rule.enabled else "disabled"
        if override is not None and rule.mode == "live":
            mode = f"{override.mode} (guard)"
            note = f"since {timestamp(override.since)}: {override.reason}"
        listed.append(
            {
                "rule": rule.id,
                "mode": mode,
                "guard": _window(entries, rule.max_actions, now) if rule.max_actions else None,
                "held": held,
                "note": note,
            }
        )
    for target, hold in sorted(overrides.items()):
        if hold.mode != HOLD:
            continue
        del overrides[target]
        listed.append(
            {
                "rule": target,
                "mode": "held (loop breaker)",
                "guard": None,
                "held": None,
                "note": f"since {timestamp(hold.since)}: {hold.reason}",
            }
        )
    for rule_id, override in overrides.items():
        listed.append(
            {
                "rule": rule_id,
                "mode": f"{override.mode} (guard)",
                "guard": None,
                "held": guards.get(rule_id, ([], 0))[1],
                "note": "not in the rule files any more; `rules resume` clears it",
            }
        )
    return listed


def _window(entries: list[float], limit: MaxActions, now: float) -> dict[str, Any]:
    within = limit.within.total_seconds()
    reference = max([now, *entries])
    recent = sum(1 for moment in entries if moment >= reference - within)
    return {"count": recent, "limit": limit.count, "within": format_duration(limit.within)}


def render(listed: list[dict[str, Any]]) -> str:
    rows = []
    for entry in listed:
        guard = entry["guard"]
        shown = f"{guard['count']}/{guard['limit']} per {guard['within']}" if guard else None
        rows.append((entry["rule"], entry["mode"], shown, entry["held"], entry["note"] or ""))
    return table(["rule", "mode", "guard", "held", "note"], rows)


def _cmd_list(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.cron import check_crontab
    from engine.rules import load_rules

    config = load_config(args.config)
    rules = load_rules(args.rules or config.rules, cron=check_crontab)
    store: Store | None
    try:
        store, _ = open_store(args)
    except EngineError:
        store = None  # the engine has not run yet: every rule is as written
    try:
        listed = collect(list(rules), store, config.guard_max_actions)
    finally:
        if store is not None:
            store.close()
    emit(orjson.dumps(listed, option=orjson.OPT_INDENT_2).decode() if args.json else render(listed))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    store, _ = open_store(args)
    try:
        tripped = sorted(store.rule_overrides())
        result = store.resume_rule(args.rule_id, now=system_clock(), release_held=args.release_held)
    finally:
        store.close()
    if result is None:
        close = difflib.get_close_matches(args.rule_id, tripped, n=1)
        if close:
            hint = f"did you mean `{close[0]}`?"
        elif tripped:
            hint = "tripped rules and held targets: " + ", ".join(tripped)
        else:
            hint = "no rule is switched to shadow by the guard, no target held"
        what = "target" if ":" in args.rule_id else "rule"
        raise EngineError(
            f"{what} `{args.rule_id}` was not stopped by the blast-radius guard or the loop "
            f"breaker ({hint})"
        )
    override = result.override
    if override.mode == HOLD:
        lines = [
            f"{args.rule_id} resumed: its status actions run again (held at "
            f"{timestamp(override.since)} by event {override.event_id}: {override.reason})"
        ]
    else:
        lines = [
            f"rule {args.rule_id} resumed: it acts again (switched to {override.mode} at "
            f"{timestamp(override.since)} by event {override.event_id})"
        ]
    if result.released:
        lines.append(f"{result.released} held actions put back in the queue")
    if result.still_held:
        lines.append(f"{result.still_held} held actions stay held; `--release-held` would run them")
    emit("\n".join(lines))
    return 0
