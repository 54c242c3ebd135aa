"""`event-engine dead-letters list|retry|discard`: the actions that ran out of retries.

An intent is dead-lettered after `actions.max_attempts` attempts or past `actions.deadline`,
with its last error. `retry` puts it back in the queue with a fresh retry budget (a running
daemon picks it up within a second; otherwise the next start does); it still knows it may
have run before, so an SMS is looked for before it is sent again. `discard` gives up on it.
Both are recorded in the audit log. Safe while `run` runs (SQLite in WAL mode).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from engine.clock import system_clock
from engine.commands.state_file import add_store_options, open_store, stored_id
from engine.commands.tables import emit, table, timestamp
from engine.model import AuditRow, Intent, IntentStatus
from engine.ports import Outbox

_LIST_LIMIT = 100_000


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "dead-letters",
        help="list, retry or discard the actions that ran out of retries",
        description="Actions that failed transiently until `actions.max_attempts` or "
        "`actions.deadline` ran out wait here with their last error. `list` shows them, "
        "`retry` queues them again with a fresh retry budget, `discard` gives up on them.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    listing = verbs.add_parser("list", help="show the dead-lettered actions and their errors")
    add_store_options(listing)
    listing.set_defaults(handler=_cmd_list)

    for verb, helptext, handler in (
        ("retry", "queue dead-lettered actions again (fresh attempts and deadline)", _cmd_retry),
        ("discard", "give up on dead-lettered actions for good", _cmd_discard),
    ):
        sub = verbs.add_parser(verb, help=helptext, description=helptext)
        sub.add_argument(
            "ids", nargs="*", type=stored_id, metavar="ID", help="intent ids from `list`"
        )
        sub.add_argument("--all", action="store_true", help="every dead-lettered action")
        add_store_options(sub)
        sub.set_defaults(handler=handler)


def _row(intent: Intent) -> dict[str, Any]:
    return {
        "id": intent.id,
        "action": intent.kind,
        "rule": intent.rule_id,
        "event_id": intent.event_id,
        "target": {k: v for k, v in intent.target.items() if v is not None},
        "attempts": intent.attempts,
        "created": timestamp(intent.created_at),
        "last_error": intent.last_error,
    }


def _target(target: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in target.items()) or "-"


def _cmd_list(args: argparse.Namespace) -> int:
    store, path = open_store(args)
    try:
        rows = [_row(i) for i in store.intents(IntentStatus.DEAD, limit=_LIST_LIMIT)]
    finally:
        store.close()
    if args.json:
        emit(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif not rows:
        emit(f"no dead-lettered actions in {path}")
    else:
        emit(
            table(
                ["id", "action", "rule", "event", "target", "attempts", "created", "last error"],
                [
                    (
                        r["id"],
                        r["action"],
                        r["rule"],
                        r["event_id"],
                        _target(r["target"]),
                        r["attempts"],
                        r["created"],
                        r["last_error"],
                    )
                    for r in rows
                ],
            )
        )
        emit(
            f"\n{len(rows)} dead-lettered; `event-engine dead-letters retry ID…|--all` or `discard`"
        )
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    return _change(args, "requeued", "queued again by an operator (dead-letters retry)")


def _cmd_discard(args: argparse.Namespace) -> int:
    return _change(args, "discarded", "discarded by an operator (dead-letters discard)")


def _change(args: argparse.Namespace, outcome: str, detail: str) -> int:
    if not args.ids and not args.all:
        print(f"error: name the intent ids to {args.verb}, or give --all", file=sys.stderr)
        return 2
    store, _ = open_store(args)
    try:
        ids = (
            [i.id for i in store.intents(IntentStatus.DEAD, limit=_LIST_LIMIT)]
            if args.all
            else args.ids
        )
        changed, refused = change_dead_letters(
            store, [i for i in ids if i is not None], outcome, detail
        )
    finally:
        store.close()
    if args.json:
        emit(orjson.dumps({outcome: changed, "not_dead": refused}).decode())
    else:
        emit(f"{outcome} {len(changed)}" + (f": {', '.join(map(str, changed))}" if changed else ""))
    for intent_id in refused:
        print(f"error: intent {intent_id} is not dead-lettered (see `list`)", file=sys.stderr)
    return 1 if refused else 0


def change_dead_letters(
    store: Outbox, ids: list[int], outcome: str, detail: str
) -> tuple[list[int], list[int]]:
    """Requeue (`outcome` "requeued") or discard the dead-lettered intents `ids`, each with
    its audit row saying `detail`: (changed, refused), the refused being not dead-lettered."""
    return change_intents(store, ids, outcome, detail, status=IntentStatus.DEAD)


def change_intents(
    store: Outbox, ids: list[int], outcome: str, detail: str, *, status: IntentStatus
) -> tuple[list[int], list[int]]:
    """Change the intents `ids` that are in `status` (dead-lettered or held): "requeued",
    "released" (held ones run after all) or "discarded", each with its audit row saying
    `detail`: (changed, refused), the refused being in another status."""
    changed: list[int] = []
    refused: list[int] = []
    for intent_id in ids:
        intent = store.get_intent(intent_id)
        if intent is None or intent.status is not status:
            refused.append(intent_id)
            continue
        audit = AuditRow(
            event_id=intent.event_id,
            rule_id=intent.rule_id,
            action=intent.kind,
            outcome=outcome,
            detail=detail,
            sim_id=intent.target.get("sim_id"),
            endpoint_id=intent.target.get("endpoint_id"),
            iccid=intent.target.get("iccid"),
            intent_id=intent.id,
        )
        now = system_clock()
        if outcome == "requeued":
            done = store.requeue(intent_id, now=now, audit=audit)
        elif outcome == "released":
            done = store.release(intent_id, now=now, audit=audit)
        else:
            done = store.discard(intent_id, now=now, audit=audit, from_status=status)
        (changed if done else refused).append(intent_id)
    return changed, refused
