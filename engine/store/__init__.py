"""State stores: SQLite, the daemon's (`engine.store.sqlite`), and replay's in memory
(`engine.store.memory`). The values they keep are `engine.model`'s, the interfaces they
implement `engine.ports`'."""

from engine.store.memory import MemoryStore
from engine.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore"]
