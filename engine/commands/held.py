"""`event-engine held list|release|discard`: the actions the blast-radius guard held.

When a rule's (or the global) guard trips, its destructive actions are recorded `held` and
never run until someone looks. `release` runs one after all (due now, or a follow-up at its
own time), `discard` gives it up; each is recorded in the audit log naming who ran the
command, like the console's Release and Discard buttons. A command of its own rather than
more verbs of `dead-letters`: those ran and failed and want a retry; these never ran and
want a review, one by one (`rules resume RULE --release-held` releases a rule's all at
once). Safe while `run` runs (SQLite in WAL mode): the daemon runs a released action at its
next look at the outbox.
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
    ("created", lambda r: r["created"]),
    ("due", lambda r: r["due"]),
]


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "held",
        help="list, release or discard the actions the blast-radius guard held",
        description="When a guard (`max_actions` of a rule, or `guard.max_actions`) trips, "
        "the destructive actions past its limit are recorded `held` and never run. `list` "
        "shows them, `release ID…` runs them after all, `discard ID…` gives them up; each "
        "change is written to the audit log with who made it. To switch the tripped rule "
        "back to live (and release all it held), use `rules resume RULE [--release-held]`.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    listing = verbs.add_parser(
        "list",
        help="show the held actions",
        description="Every held action: its id, kind, rule, event, target, when it was "
        "planned and, for a follow-up, when it is due.",
    )
    add_store_options(listing)
    listing.set_defaults(handler=_cmd_list)

    add_id_verb(
        verbs,
        "release",
        "run held actions after all",
        _cmd_release,
        description="Run the held actions named by id (from `held list`) after all: each is "
        "due now (a follow-up keeps its own time) with a fresh retry budget, and a running "
        "daemon picks it up. Review them first: the guard held them for a reason.",
    )
    add_id_verb(
        verbs,
        "discard",
        "give up held actions for good",
        _cmd_discard,
        description="Give up the held actions named by id (from `held list`): they never "
        "run, and the audit log says who discarded them.",
    )


def _cmd_list(args: argparse.Namespace) -> int:
    return list_parked(
        args,
        IntentStatus.HELD,
        _COLUMNS,
        none="no held actions",
        footer=lambda n: f"{n} held; `event-engine held release ID…` or `held discard ID…`",
    )


def _cmd_release(args: argparse.Namespace) -> int:
    return change_parked(args, IntentStatus.HELD, "released", f"released {by_the_cli()}")


def _cmd_discard(args: argparse.Namespace) -> int:
    return change_parked(args, IntentStatus.HELD, "discarded", f"discarded {by_the_cli()}")
