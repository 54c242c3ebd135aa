"""What `dead-letters` and `held` share: the intents parked in one status of the outbox
(dead-lettered: out of retries; held: stopped by the blast-radius guard), listed, and
changed one by one, each change with its audit row naming who made it.

The console's buttons change intents through `change_intents` too, so a press and a
command leave the same audit rows."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from engine.clock import system_clock
from engine.commands.state_file import add_store_options, open_store, stored_id
from engine.commands.tables import emit, table, timestamp
from engine.model import AuditRow, Intent, IntentStatus
from engine.ports import Outbox

LIST_LIMIT = 100_000

# A column of the listing: its header and how a row (`as_row`) gives its cell.
Column = tuple[str, Callable[[dict[str, Any]], object]]


def local_user() -> str:
    """The login name of who runs the command ("unknown" when the system cannot say)."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def by_the_cli() -> str:
    """How an audit row names a change made from the command line: `by the CLI (ann@box)`."""
    return f"by the CLI ({local_user()}@{socket.gethostname()})"


def add_id_verb(
    verbs: Any,
    verb: str,
    helptext: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    every: str | None = None,
    description: str | None = None,
) -> None:
    """A verb taking intent ids from `list` (and `--all` when `every` says what it covers)."""
    sub = verbs.add_parser(verb, help=helptext, description=description or helptext)
    sub.add_argument("ids", nargs="*", type=stored_id, metavar="ID", help="intent ids from `list`")
    if every is not None:
        sub.add_argument("--all", action="store_true", help=every)
    add_store_options(sub)
    sub.set_defaults(handler=handler, all=False, offers_all=every is not None)


def as_row(intent: Intent) -> dict[str, Any]:
    return {
        "id": intent.id,
        "action": intent.kind,
        "rule": intent.rule_id,
        "event_id": intent.event_id,
        "target": {k: v for k, v in intent.target.items() if v is not None},
        "attempts": intent.attempts,
        "created": timestamp(intent.created_at),
        "due": timestamp(intent.due_at),
        "last_error": intent.last_error,
    }


def target_text(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in row["target"].items()) or "-"


def list_parked(
    args: argparse.Namespace,
    status: IntentStatus,
    columns: Sequence[Column],
    *,
    none: str,
    footer: Callable[[int], str],
) -> int:
    """Print the intents in `status`: a table (`none` when there are none, `footer` under
    it), or JSON with `--json`."""
    store, path = open_store(args)
    try:
        rows = [as_row(i) for i in store.intents(status, limit=LIST_LIMIT)]
    finally:
        store.close()
    if args.json:
        emit(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif not rows:
        emit(f"{none} in {path}")
    else:
        emit(table([c[0] for c in columns], [[cell(r) for _, cell in columns] for r in rows]))
        emit("\n" + footer(len(rows)))
    return 0


def change_parked(args: argparse.Namespace, status: IntentStatus, outcome: str, detail: str) -> int:
    """Change the intents `args` names (ids, or `--all` in `status`): prints what changed,
    and an error line for each id that is not in `status`; exit 1 when there was one."""
    if not args.ids and not args.all:
        every = ", or give --all" if args.offers_all else ""
        print(f"error: name the intent ids to {args.verb}{every}", file=sys.stderr)
        return 2
    store, _ = open_store(args)
    try:
        ids = (
            [i.id for i in store.intents(status, limit=LIST_LIMIT) if i.id is not None]
            if args.all
            else [i for i in args.ids if i is not None]
        )
        changed, refused = change_intents(store, ids, outcome, detail, status=status)
        reasons = {i: _why_not(store, i, status) for i in refused}
    finally:
        store.close()
    if args.json:
        emit(orjson.dumps({outcome: changed, f"not_{status.value}": refused}).decode())
    else:
        emit(f"{outcome} {len(changed)}" + (f": {', '.join(map(str, changed))}" if changed else ""))
    for intent_id, reason in reasons.items():
        print(f"error: intent {intent_id} is not {_said(status)}: {reason}", file=sys.stderr)
    return 1 if refused else 0


def _said(status: IntentStatus) -> str:
    return "dead-lettered" if status is IntentStatus.DEAD else status.value


def _why_not(store: Outbox, intent_id: int, status: IntentStatus) -> str:
    intent = store.get_intent(intent_id)
    if intent is None:
        return "there is no such intent (see `list`)"
    return f"it is {_said(intent.status)} (see `list`)"


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
