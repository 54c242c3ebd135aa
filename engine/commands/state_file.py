"""Which state store a command (`status`, `why`, `rules`, `dead-letters`) works on: the
config's (`store.path` or `store.url`), or the SQLite file given by --store."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from engine.errors import EngineError
from engine.ports import Store
from engine.store import StoreSettings
from engine.store import open_store as open_store_from

DEMO_STORE = Path("state/demo.sqlite3")


def add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="the config file whose store (store.path or store.url) to read "
        "(default: state/engine.sqlite3)",
    )
    parser.add_argument(
        "--store",
        type=Path,
        metavar="PATH",
        help="read this SQLite state file instead (e.g. state/demo.sqlite3 after a demo)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def store_path(args: argparse.Namespace) -> Path:
    """--store, else the config's store.path, else the default; after `event-engine demo`
    in a directory with no engine store of its own, the demo's store."""
    from engine.config import load_config

    if args.store is not None:
        path: Path = args.store
    else:
        path = load_config(args.config).store_path
        if args.config is None and not path.exists() and DEMO_STORE.exists():
            print(f"note: no {path} here; reading the demo's store {DEMO_STORE}", file=sys.stderr)
            path = DEMO_STORE
    if not path.is_file():
        raise EngineError(
            f"no state store at {path}: the engine has not run with this config yet "
            "(use --config FILE or --store PATH to read another one)"
        )
    return path


# Seconds a command's integrity check may read the store for; the daemon allows more.
_INTEGRITY_CHECK_BUDGET = 5.0


def open_store(args: argparse.Namespace) -> tuple[Store, Path | str]:
    """The store (--store's file, else the config's store), after its integrity check: a
    damaged file is a StoreError that names it and says what to do, before the command
    reports anything from it."""
    from engine.config import load_config

    settings = load_config(args.config).store if args.store is None else StoreSettings()
    path: Path | str = settings.where
    if settings.postgres is None:
        path = store_path(args)
        settings = replace(settings, path=path)
    store = open_store_from(settings)
    try:
        store.check_integrity(_INTEGRITY_CHECK_BUDGET)
    except EngineError:
        store.close()
        raise
    return store, path


def stored_id(text: str) -> int:
    """An argparse type for event and intent ids: an integer the store can hold (64 bits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer id") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is out of range for an id (64 bits)")
    return value
