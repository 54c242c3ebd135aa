"""State: cursor, seen ids, outbox, audit. SQLite is the embedded default."""

from engine.store.model import AuditRow, Batch, Intent, IntentStatus
from engine.store.sqlite import SqliteStore, StoreError

__all__ = ["AuditRow", "Batch", "Intent", "IntentStatus", "SqliteStore", "StoreError"]
