"""State stores: SQLite, the daemon's default (`engine.store.sqlite`), PostgreSQL for a
database several instances share (`engine.store.postgres`, loaded only when the config
names one), and replay's in memory (`engine.store.memory`). The values they keep are
`engine.model`'s, the interfaces they implement `engine.ports`'.

`open_store` is the one place that turns the config's `store:` settings into a store: the
daemon and every command that reads the state go through it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.store import sqlite
from engine.store.memory import MemoryStore
from engine.store.migrations import MigrationPlan
from engine.store.settings import StoreSettings
from engine.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from engine.ports import Store

__all__ = ["MemoryStore", "SqliteStore", "StoreSettings", "open_store", "schema_plan"]


def open_store(settings: StoreSettings) -> Store:
    """The store the settings name, its schema brought up to date unless `migrate` is off
    (then a store that needs a step is refused with MigrationNeeded). StoreError when it
    cannot be opened, in one line that says what to do."""
    if settings.postgres is not None:
        from engine.store.postgres import PostgresStore, application_name

        postgres = settings.postgres
        return PostgresStore(
            postgres.url,
            password=postgres.password(),
            migrate=settings.migrate,
            pool_size=postgres.pool_size,
            dispatch_threads=postgres.dispatch_threads,
            application_name=application_name(settings.instance_id),
        )
    return SqliteStore(settings.path, migrate=settings.migrate)


def schema_plan(settings: StoreSettings) -> MigrationPlan:
    """Where the store's schema stands and the steps it lacks, without changing it."""
    if settings.postgres is not None:
        from engine.store import postgres

        return postgres.schema_plan(settings.postgres.url, settings.postgres.password())
    return sqlite.schema_plan(settings.path)
