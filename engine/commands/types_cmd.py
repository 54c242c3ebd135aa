"""`event-engine types`: the event types rules can name, with their ids.

A rule's `when: {type: ...}` takes an id or a name; writing one means knowing it. This lists
the catalog the rules resolve through: the bundled list, or with `--config` the API's own
list (`GET /api/v1/event/type`) merged over it, as `run` sees it. For the types whose events
are documented, it also says which source and severity such events usually carry.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from engine.commands.tables import emit, table
from engine.rules.catalog import EventTypeCatalog


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "types",
        help="list the event types (id, name, usual source and severity) rules can name",
        description="List the event-type catalog that `when: {type: ...}` resolves names "
        "through: id, name, and the source and severity its events usually carry (where "
        "documented). Without --config, the list bundled with the engine; with --config, the "
        "API's list fetched with the config's application token, merged over the bundled one.",
    )
    parser.add_argument(
        "search",
        nargs="*",
        metavar="WORD",
        help="show only types whose name has every WORD (any order), or whose id is WORD",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="fetch the API's list with this config's api settings and token",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(handler=_cmd_types)


def collect(catalog: EventTypeCatalog, *, fetched: EventTypeCatalog | None = None) -> Any:
    """Every type as JSON-ready data; `fetched` (the API's own list) marks where each is from."""
    bundled = EventTypeCatalog.bundled()
    rows = []
    for type_id in catalog:
        typical = catalog.typical(type_id)
        rows.append(
            {
                "id": type_id,
                "name": catalog.name_of(type_id),
                "source": typical.source,
                "severity": typical.severity,
                "from": _origin(type_id, bundled, fetched),
            }
        )
    return rows


def _origin(type_id: int, bundled: EventTypeCatalog, fetched: EventTypeCatalog | None) -> str:
    if fetched is None or type_id not in fetched:
        return "bundled"
    return "api" if type_id not in bundled else "api, bundled"


def matching(rows: list[dict[str, Any]], words: list[str]) -> list[dict[str, Any]]:
    """The rows whose name holds every word (case-insensitive), or whose id is one of them."""
    if not words:
        return rows
    folded = [word.lower() for word in words]
    return [
        row
        for row in rows
        if str(row["id"]) in folded or all(word in str(row["name"]).lower() for word in folded)
    ]


def render(rows: list[dict[str, Any]], *, fetched: bool) -> str:
    headers = ["id", "name", "usual source", "usual severity"]
    cells: list[tuple[object, ...]] = [
        (row["id"], row["name"], row["source"], row["severity"]) for row in rows
    ]
    if fetched:
        headers.append("from")
        cells = [(*cell, row["from"]) for cell, row in zip(cells, rows, strict=True)]
    lines = [table(headers, cells)]
    lines.append("")
    lines.append("In rules, prefer the id with the name as a comment: `type: 19  # Quota used up`.")
    lines.append("Usual source and severity: what documented events of the type carry (- : not")
    lines.append("documented). `event-engine types --config FILE` adds the types the API knows.")
    return "\n".join(lines)


def _fetch(config_path: Path) -> tuple[EventTypeCatalog, EventTypeCatalog | None]:
    """The catalog `run` would use with this config, and the API's own list (None when
    the fetch failed: the reason is logged on stderr, and the bundled list is shown)."""
    from engine import logging as engine_logging
    from engine.catalog_refresh import CatalogRefresh
    from engine.config import load_config
    from engine.emnify import EmnifyClient

    config = load_config(config_path)
    # stdout carries the list (maybe JSON); a failed fetch is reported on stderr.
    engine_logging.configure("warning", config.log_format)
    token = config.application_token()
    refresh = CatalogRefresh()

    async def fetch() -> EventTypeCatalog:
        async with EmnifyClient(token, config.api) as client:
            return await refresh.refresh(client)

    catalog = asyncio.run(fetch())
    return catalog, refresh.api_catalog


def _cmd_types(args: argparse.Namespace) -> int:
    if args.config is not None:
        catalog, fetched = _fetch(args.config)
        if fetched is None:
            print("note: the API's list was not fetched; showing the bundled one", file=sys.stderr)
    else:
        catalog, fetched = EventTypeCatalog.bundled(), None
    rows = matching(collect(catalog, fetched=fetched), args.search)
    if args.json:
        emit(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif not rows:
        emit(f"no event type matches {' '.join(args.search)!r}")
    else:
        emit(render(rows, fetched=fetched is not None))
    return 0
