"""`event-engine silence add|list|expire`: hold off on some SIMs, endpoints, tags or rules
for a while (a maintenance tonight) without editing a rule.

A silence lives in the state store, so every instance sharing it, and a daemon already
running, takes it up within seconds (`engine.silences`). Matches it covers are judged as
usual and recorded as "silenced by #ID (comment)", but run no action. Adding one requires
a comment: the next operator reading `status` needs to know why the engine is quiet.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import orjson

from engine.clock import system_clock
from engine.commands.parked import local_user
from engine.commands.state_file import add_store_options, open_store
from engine.commands.tables import emit, table, timestamp
from engine.durations import parse_duration
from engine.errors import EngineError
from engine.model import Silence
from engine.silencing import describe_matchers, parse_matcher


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "silence",
        help="silence matches on some SIMs, endpoints, tags or rules for a while",
        description="A silenced match is judged (its threshold windows count) and recorded as "
        "`silenced by #ID (comment)`, but runs no action, like a rule in shadow mode. "
        "Silences live in the state store: a running daemon takes a new one up within "
        "seconds, and each ends by itself.",
    )
    sub = parser.add_subparsers(dest="silence_command", metavar="SUBCOMMAND", required=True)

    add = sub.add_parser(
        "add",
        help="add a silence (a comment is required)",
        description="Silence the matches every --match holds for (repeat it to narrow down), "
        "from now for --for.",
    )
    add.add_argument(
        "--match",
        action="append",
        required=True,
        type=_matcher,
        metavar="FIELD=VALUE",
        help="iccid=ICCID, endpoint=ID or NAME, tag=TAG (an endpoint tag) or rule=RULE_ID",
    )
    add.add_argument(
        "--for",
        dest="length",
        required=True,
        type=_length,
        metavar="DURATION",
        help="how long, e.g. 30m, 2h, 1d",
    )
    add.add_argument("--comment", required=True, help="why: shown wherever the silence is")
    add.add_argument("--by", help="who adds it (default: $USER)")
    add_store_options(add)
    add.set_defaults(handler=_cmd_add)

    listing = sub.add_parser(
        "list",
        help="the silences in force (with --all, ended ones too)",
        description="Every silence in force: its id, what it matches, until when, who added "
        "it and why.",
    )
    listing.add_argument(
        "--all", action="store_true", help="also the silences that ended in the last 30 days"
    )
    add_store_options(listing)
    listing.set_defaults(handler=_cmd_list)

    expire = sub.add_parser(
        "expire",
        help="end a silence now",
        description="End the silence ID now; who ended it is kept beside who added it.",
    )
    expire.add_argument("silence_id", metavar="ID", type=_silence_id, help="the silence's id")
    expire.add_argument("--by", help="who ends it (default: $USER)")
    add_store_options(expire)
    expire.set_defaults(handler=_cmd_expire)


def _matcher(text: str) -> tuple[str, str]:
    try:
        return parse_matcher(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _length(text: str) -> Any:
    try:
        length = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if length.total_seconds() <= 0:
        raise argparse.ArgumentTypeError("a silence must last longer than zero, e.g. 2h")
    return length


def _silence_id(text: str) -> int:
    try:
        return int(text.lstrip("#"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a silence id (e.g. 3)") from None


def _who(given: str | None) -> str:
    return given or local_user()


def _cmd_add(args: argparse.Namespace) -> int:
    comment = args.comment.strip()
    if not comment:
        raise EngineError('a silence needs a comment saying why (--comment "...")')
    now = system_clock()
    store, _ = open_store(args)
    try:
        added = store.add_silence(
            Silence(
                matchers=tuple(args.match),
                comment=comment,
                created_by=_who(args.by),
                created_at=now,
                ends_at=now + args.length,
            )
        )
    finally:
        store.close()
    if args.json:
        emit(orjson.dumps(as_json(added)).decode())
    else:
        emit(
            f"silence #{added.id} added: {describe_matchers(added.matchers)} until "
            f"{timestamp(added.ends_at)} ({added.comment})"
        )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:

    now = system_clock()
    store, _ = open_store(args)
    try:
        found = store.silences(now - timedelta(days=30) if args.all else now)
    finally:
        store.close()
    if args.json:
        emit(orjson.dumps([as_json(s) for s in found], option=orjson.OPT_INDENT_2).decode())
    elif not found:
        emit("no silences in force" if not args.all else "no silences in the last 30 days")
    else:
        emit(render(found, now))
    return 0


def _cmd_expire(args: argparse.Namespace) -> int:
    now = system_clock()
    store, _ = open_store(args)
    try:
        ended = store.expire_silence(args.silence_id, _who(args.by), now)
    finally:
        store.close()
    if ended is None:
        raise EngineError(f"no silence #{args.silence_id} (see `event-engine silence list --all`)")
    if ended.expired_at != now:
        emit(f"silence #{ended.id} had already ended at {timestamp(ended.ends_at)}")
    else:
        emit(f"silence #{ended.id} expired by {ended.expired_by}: matches it covered act again")
    return 0


def as_json(silence: Silence) -> dict[str, Any]:
    return {
        "id": silence.id,
        "match": dict(silence.matchers)
        if _unique(silence)
        else [list(m) for m in silence.matchers],
        "comment": silence.comment,
        "created_by": silence.created_by,
        "created_at": timestamp(silence.created_at),
        "ends_at": timestamp(silence.ends_at),
        "expired_by": silence.expired_by,
        "expired_at": timestamp(silence.expired_at),
    }


def _unique(silence: Silence) -> bool:
    return len({name for name, _ in silence.matchers}) == len(silence.matchers)


def state(silence: Silence, now: Any) -> str:
    if silence.expired_by is not None:
        return f"expired by {silence.expired_by}"
    return "in force" if silence.active_at(now) else "ended"


def render(silences: list[Silence], now: Any) -> str:
    rows = [
        (
            f"#{s.id}",
            describe_matchers(s.matchers),
            timestamp(s.ends_at),
            state(s, now),
            f"{s.created_by} at {timestamp(s.created_at)}",
            s.comment,
        )
        for s in silences
    ]
    return table(["id", "match", "until", "state", "added by", "comment"], rows)
