"""State stores: SQLite, the embedded default. The values they keep are `engine.model`'s,
the interfaces they implement `engine.ports`'."""

from engine.store.sqlite import SqliteStore

__all__ = ["SqliteStore"]
