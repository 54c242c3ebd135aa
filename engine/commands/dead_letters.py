"""`event-engine dead-letters list|retry|discard`: the actions that ran out of retries.

An intent is dead-lettered after `actions.max_attempts` attempts or past `actions.deadline`,
with its last error. `retry` puts it back in the queue with a fresh retry budget (a running
daemon picks it up within a second; otherwise the next start does); it still knows it may
have run before, so an SMS is looked for before it is sent again. `discard` gives up on it.
Both are recorded in the audit log, naming who ran the command. Safe while `run` runs
(SQLite in WAL mode).
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.commands.parked import (
    Column,
    add_id_verb,
    by_the_cli,
    change_parked,
    list_parked,
    target_text,
)
from engine.commands.state_file import add_store_options
from engine.model import IntentStatus

_COLUMNS: list[Column] = [
    ("id", lambda r: r["id"]),
    ("action", lambda r: r["action"]),
    ("rule", lambda r: r["rule"]),
    ("event", lambda r: r["event_id"]),
    ("target", target_text),
    ("attempts", lambda r: r["attempts"]),
    ("created", lambda r: r["created"]),
    ("last error", lambda r: r["last_error"]),
]


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

    add_id_verb(
        verbs,
        "retry",
        "queue dead-lettered actions again (fresh attempts and deadline)",
        _cmd_retry,
        every="every dead-lettered action",
    )
    add_id_verb(
        verbs,
        "discard",
        "give up on dead-lettered actions for good",
        _cmd_discard,
        every="every dead-lettered action",
    )


def _cmd_list(args: argparse.Namespace) -> int:
    return list_parked(
        args,
        IntentStatus.DEAD,
        _COLUMNS,
        none="no dead-lettered actions",
        footer=lambda n: (
            f"{n} dead-lettered; `event-engine dead-letters retry ID…|--all` or `discard`"
        ),
    )


def _cmd_retry(args: argparse.Namespace) -> int:
    return change_parked(args, IntentStatus.DEAD, "requeued", f"queued again {by_the_cli()}")


def _cmd_discard(args: argparse.Namespace) -> int:
    return change_parked(args, IntentStatus.DEAD, "discarded", f"discarded {by_the_cli()}")
