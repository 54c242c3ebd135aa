"""`event-engine status`: where the engine stands, read from its state store.

Works whether or not the daemon is running (SQLite in WAL mode lets a reader in beside it):
the poll cursor and how far behind now it is, the last poll, how many events were seen and
quarantined, the store's size on disk and its oldest row (what retention keeps), the outbox
by status (pending and dead first), the blast-radius guards that hold actions back, and
the silences and mute windows that keep matches from acting.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from engine.clock import system_clock
from engine.commands.silence_cmd import as_json as silence_json
from engine.commands.state_file import add_store_options, open_store
from engine.commands.tables import emit, table, timestamp
from engine.leadership import LEASE
from engine.mute_windows import MuteWindow
from engine.ports import Store

_FIRST_STATUSES = ("pending", "running", "held", "dead", "failed", "done")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "status",
        help="show the cursor, the last poll, event and action counts, and held guards",
        description="Read the state store (of --config, or --store) and show the poll cursor "
        "and its lag, the last poll, the events seen and quarantined, the action intents by "
        "status (pending, dead, held, ...), and guards that tripped. Safe while `run` runs.",
    )
    add_store_options(parser)
    parser.set_defaults(handler=_cmd_status)


def collect(
    store: Store,
    path: str,
    now: datetime | None = None,
    mute_windows: tuple[MuteWindow, ...] = (),
    organisations: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything `status` shows, as JSON-ready data; with `organisations` (the config's
    `organisations:`), each one's cursor and last poll, and whether it is paused."""
    now = now or system_clock()
    cursor = store.get_cursor()
    last_poll_raw = store.get_meta("last_poll")
    counts = store.counts()
    intents = {k.removeprefix("intents_"): v for k, v in counts.items() if k.startswith("intents_")}
    ordered = {s: intents.get(s, 0) for s in _FIRST_STATUSES}
    ordered.update(sorted((s, n) for s, n in intents.items() if s not in ordered))
    # An action that could not be planned for its event (a `suspend_sim` on an event with no
    # SIM) failed as surely as one that failed when it ran: it has only its audit row.
    not_planned = counts.get("actions_not_planned", 0)
    failed_when_run = ordered["failed"]
    ordered["failed"] = failed_when_run + not_planned
    return {
        "store": path,
        "cursor": timestamp(cursor),
        "lag_seconds": round((now - cursor).total_seconds(), 1) if cursor else None,
        "last_poll": _last_poll(last_poll_raw),
        "last_successful_poll": _iso(store.get_meta("last_poll_ok")),
        "events": {"seen": counts.get("events_seen", 0), "quarantined": counts["quarantined"]},
        "intents": ordered,
        "pending": ordered["pending"],
        "dead": ordered["dead"],
        "held": ordered["held"],
        "failed": {"total": ordered["failed"], "run": failed_when_run, "not_planned": not_planned},
        "guards": _guards(store),
        "store_bytes": store.disk_bytes(),
        "oldest_kept": {kind: timestamp(at) for kind, at in store.oldest_kept().items()},
        "members": _members(store, now),
        "silences": [silence_json(s) for s in store.silences(now)],
        "mute_windows": [_window(w, now) for w in mute_windows],
        **({"organisations": _organisations(store, organisations, now)} if organisations else {}),
    }


def _organisations(store: Store, names: Sequence[str], now: datetime) -> dict[str, Any]:
    """Per organisation: its cursor and lag, its last poll, and until when it is paused
    (its application token was refused: the others poll on)."""
    found: dict[str, Any] = {}
    for name in names:
        cursor = store.get_cursor(name)
        last_poll = _last_poll(store.get_meta(f"last_poll:{name}"))
        paused = last_poll.get("paused_until") if last_poll else None
        found[name] = {
            "cursor": timestamp(cursor),
            "lag_seconds": round((now - cursor).total_seconds(), 1) if cursor else None,
            "last_poll": last_poll,
            "last_successful_poll": _iso(store.get_meta(f"last_poll_ok:{name}")),
            "paused_until": _iso(paused) if paused else None,
        }
    return found


def _render_poll(data: dict[str, Any]) -> list[str]:
    """The single organisation's cursor and last poll."""
    lines = []
    if data["cursor"]:
        lines.append(f"cursor        {data['cursor']}  (lag {_duration(data['lag_seconds'])})")
    else:
        lines.append("cursor        - (no poll has committed yet)")
    poll = data["last_poll"]
    if poll:
        outcome = f"ok, {poll.get('fetched', 0)} events fetched" if poll.get("ok") else "FAILED"
        lines.append(f"last poll     {poll.get('at', '-')}  {outcome}")
        if poll.get("error"):
            lines.append(f"              {poll['error']}")
        if not poll.get("ok"):
            lines.append(f"last success  {data['last_successful_poll'] or 'never'}")
    else:
        lines.append("last poll     - (none recorded)")
    return lines


def _render_organisations(organisations: dict[str, Any]) -> list[str]:
    """Each organisation's cursor and last poll, a paused one saying so."""
    lines = ["organisations"]
    rows = []
    for name, state in organisations.items():
        poll = state["last_poll"] or {}
        if state["paused_until"]:
            condition = f"PAUSED until {state['paused_until']}: {poll.get('error') or ''}"
        elif not poll:
            condition = "no poll recorded"
        else:
            condition = "ok" if poll.get("ok") else f"FAILED: {poll.get('error') or ''}"
        lag = _duration(state["lag_seconds"]) if state["cursor"] else "-"
        rows.append((name, state["cursor"] or "-", lag, condition))
    lines.append(table(["organisation", "cursor", "lag", "last poll"], rows, indent="  "))
    return lines


def _window(window: MuteWindow, now: datetime) -> dict[str, Any]:
    return {
        "name": window.name,
        "schedule": window.summary(),
        "open": window.open_at(now),
        "next_opening": timestamp(window.next_opening(now)),
        "comment": window.comment,
    }


# A member whose last heartbeat is older than this is shown as gone (3 leases of 10 s).
_MEMBER_GONE_AFTER = 30.0


def _members(store: Store, now: datetime) -> list[dict[str, Any]]:
    """The instances sharing the store, the leader first."""
    lease = store.lease(LEASE)
    leader = lease.holder if lease is not None and lease.expires_at >= now else None
    members = sorted(store.members(), key=lambda m: (m.instance_id != leader, m.instance_id))
    return [
        {
            "instance": m.instance_id,
            "host": m.host,
            "version": m.version,
            "rules": m.rules_hash,
            "heartbeat": timestamp(m.heartbeat_at),
            "alive": (now - m.heartbeat_at).total_seconds() <= _MEMBER_GONE_AFTER,
            "leader": m.instance_id == leader,
        }
        for m in members
    ]


def _last_poll(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    record: dict[str, Any] = orjson.loads(raw)
    record["at"] = _iso(record.get("at"))
    return record


def _iso(value: str | None) -> str | None:
    return timestamp(datetime.fromisoformat(value)) if value else None


def _guards(store: Store) -> list[dict[str, Any]]:
    """Rules the blast-radius guard switched to shadow, and held intents per rule."""
    overrides = store.rule_overrides()
    summary = store.guard_summary()
    scopes = sorted(set(overrides) | {s for s, (_, held) in summary.items() if held})
    guards = []
    for scope in scopes:
        override = overrides.get(scope)
        guards.append(
            {
                "rule": scope,
                "held_intents": summary.get(scope, ([], 0))[1],
                "mode": override.mode if override else None,
                "since": timestamp(override.since) if override else None,
                "reason": override.reason if override else None,
                "event_id": override.event_id if override else None,
            }
        )
    return guards


def render(data: dict[str, Any]) -> str:
    lines = [f"state store   {data['store']}"]
    if "organisations" in data:
        lines.extend(_render_organisations(data["organisations"]))
    else:
        lines.extend(_render_poll(data))
    events = data["events"]
    lines.append(
        f"events        {events['seen']} seen (dedup horizon), {events['quarantined']} quarantined"
    )
    oldest = data["oldest_kept"]
    kept = [f"{oldest[kind]} ({name})" for kind, name in _KINDS if oldest.get(kind)]
    lines.append(
        f"store size    {_size(data['store_bytes'])}"
        + (f"; oldest row kept {min(kept)}" if kept else "")
    )
    lines.append("")
    lines.append("actions by status")
    failed = data["failed"]
    rows = [
        (status, count, _failed_note(failed) if status == "failed" and count else "")
        for status, count in data["intents"].items()
    ]
    lines.append(table(["status", "count", ""], rows, indent="  "))
    lines.append("")
    if data["guards"]:
        lines.append("guards holding actions back")
        guard_rows = [
            (g["rule"], g["held_intents"], g["mode"], g["since"], g["reason"])
            for g in data["guards"]
        ]
        lines.append(table(["rule", "held", "mode", "since", "reason"], guard_rows, indent="  "))
    else:
        lines.append("guards        none tripped, no actions held")
    lines.extend(_render_silences(data["silences"], data["mute_windows"]))
    lines.extend(_render_members(data["members"]))
    return "\n".join(lines)


def _render_silences(silences: list[dict[str, Any]], windows: list[dict[str, Any]]) -> list[str]:
    lines = [""]
    if silences:
        lines.append("silences in force (matches they cover run no action)")
        rows = [
            (
                f"#{s['id']}",
                " ".join(f"{k}={v}" for k, v in _pairs(s["match"])),
                s["ends_at"],
                s["created_by"],
                s["comment"],
            )
            for s in silences
        ]
        lines.append(table(["id", "match", "until", "by", "comment"], rows, indent="  "))
    else:
        lines.append("silences      none in force")
    if windows:
        lines.append("mute windows")
        rows = [
            (
                w["name"],
                "OPEN" if w["open"] else "closed",
                w["next_opening"],
                w["schedule"],
                w["comment"],
            )
            for w in windows
        ]
        lines.append(
            table(["window", "now", "next opening", "schedule", "comment"], rows, indent="  ")
        )
    return lines


def _pairs(match: dict[str, str] | list[list[str]]) -> list[tuple[str, str]]:
    return list(match.items()) if isinstance(match, dict) else [(k, v) for k, v in match]


def _failed_note(failed: dict[str, int]) -> str:
    parts = []
    if failed["run"]:
        parts.append(f"{failed['run']} failed when run")
    if failed["not_planned"]:
        parts.append(f"{failed['not_planned']} could not be planned for their event")
    return "; ".join(parts) + " (`why --sim ICCID` or `why --event ID` shows each)"


def _render_members(members: list[dict[str, Any]]) -> list[str]:
    if not members:
        return ["", "members       none running (no heartbeat in this store)"]
    rows = [
        (
            m["instance"] + (" (leader)" if m["leader"] else ""),
            m["host"],
            m["version"],
            m["rules"],
            m["heartbeat"] + ("" if m["alive"] else "  gone"),
        )
        for m in members
    ]
    lines = [
        "",
        "members",
        table(["instance", "host", "version", "rules", "heartbeat"], rows, indent="  "),
    ]
    alive = {m["rules"] for m in members if m["alive"]}
    if len(alive) > 1:
        lines.append(
            "WARNING: the running members use different rule sets"
            f" ({', '.join(sorted(alive))}): deploy the same rules to every instance"
        )
    if members and not any(m["leader"] for m in members if m["alive"]):
        lines.append("WARNING: no running member holds the leader lease: nobody polls")
    return lines


_KINDS = (("audit", "audit log"), ("intent", "action"), ("quarantine", "quarantine"))


def _size(count: int) -> str:
    size = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _cmd_status(args: argparse.Namespace) -> int:
    from engine.config import load_config

    config = load_config(args.config)
    store, path = open_store(args)
    names = [organisation.name for organisation in config.organisations]
    try:
        data = collect(store, str(path), mute_windows=config.mute_windows, organisations=names)
    finally:
        store.close()
    emit(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else render(data))
    return 0
