"""`event-engine store migrate|copy`: the state store's schema, and moving a store.

`migrate` applies the schema steps the configured store lacks (what the engine does at
start unless `store.migrate: never`); `--dry-run` lists them and changes nothing. `copy`
moves a SQLite store into PostgreSQL (engine/store/copy.py says what it takes along).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine import secrets
from engine.errors import EngineError
from engine.progress import Progress

# The variable `store copy` reads the target's password from unless --password-env names another.
_DEFAULT_PASSWORD_ENV = "PGPASSWORD"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "store",
        help="migrate the state store's schema, or copy a SQLite store into PostgreSQL",
        description="The state store itself: `migrate` brings its schema up to date (the "
        "engine does it at start unless store.migrate is `never`); `copy` moves a SQLite "
        "store into PostgreSQL.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    migrate = verbs.add_parser(
        "migrate",
        help="apply the schema steps the configured store lacks",
        description="Apply the schema steps the configured store (store.path or store.url) "
        "lacks, each recorded in its schema_version table. Refuses a store written by a "
        "newer event-engine.",
    )
    migrate.add_argument(
        "-c", "--config", type=Path, metavar="FILE", help="the config file naming the store"
    )
    migrate.add_argument(
        "--dry-run", action="store_true", help="list the steps to apply, change nothing"
    )
    migrate.set_defaults(handler=_cmd_migrate)

    copy = verbs.add_parser(
        "copy",
        help="copy a SQLite store into PostgreSQL (stop the engine first)",
        description="Copy everything a running deployment needs (cursor, seen ids, rule "
        "state, follow-ups, the outbox with its attempts, the audit log, quarantine, "
        "digests) from a SQLite store into a PostgreSQL database, in one transaction, "
        "then check that every table has as many rows on both sides. Stop the engine "
        "first. The password comes from the environment, never the URL.",
    )
    copy.add_argument(
        "--from", dest="source", required=True, metavar="sqlite:PATH", help="the SQLite store"
    )
    copy.add_argument(
        "--to", dest="target", required=True, metavar="postgresql://USER@HOST:PORT/DB"
    )
    copy.add_argument(
        "--password-env",
        metavar="NAME",
        help=f"the environment variable holding the password (default: {_DEFAULT_PASSWORD_ENV})",
    )
    copy.add_argument("--force", action="store_true", help="replace what the target holds already")
    copy.set_defaults(handler=_cmd_copy)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.store import open_store, schema_plan

    settings = load_config(args.config).store
    found = schema_plan(settings)
    if args.dry_run or not found.pending:
        print("\n".join(found.lines()))
        return 0
    open_store(replace(settings, migrate=True)).close()
    steps = ", ".join(str(version) for version, _ in found.pending)
    print(
        f"{found.where}: migrated from schema version {found.current} to {found.latest} "
        f"(steps {steps})"
    )
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    from engine.store.copy import check_counts, copy_store
    from engine.store.settings import is_postgres_url, sqlite_path

    if not is_postgres_url(args.target):
        raise EngineError(f"--to {args.target!r} is not a postgresql:// URL")
    if is_postgres_url(args.source):
        raise EngineError("--from must name a SQLite store (sqlite:PATH)")
    source = sqlite_path(args.source)
    name = args.password_env or _DEFAULT_PASSWORD_ENV
    password = os.environ.get(name)
    if args.password_env and password is None:
        raise EngineError(f"--password-env {name}: the environment variable {name} is not set")
    if password is not None:
        secrets.register(password)
    bars: dict[str, Progress] = {}

    def progress(table: str, done: int, total: int) -> None:
        bar = bars.setdefault(table, Progress(f"copying {table}", total))
        bar.update(done)
        if done == total:
            bar.done(done)
            if bar.enabled:
                sys.stderr.write("\n")

    copied = copy_store(
        source, args.target, password=password, force=args.force, on_progress=progress
    )
    width = max(len(c.table) for c in copied)
    for c in copied:
        print(f"{c.table:<{width}}  {c.source:>10,} rows  ->  {c.target:>10,}")
    check_counts(copied, args.target)
    total = sum(c.target for c in copied)
    print(f"copied {source} into {args.target}: {total:,} rows, every table's count checked")
    return 0
