"""State: cursor, seen ids, outbox, audit. SQLite is the embedded default."""

from engine.store.model import (
    AuditRow,
    Batch,
    FollowUpCancel,
    FollowUpKey,
    Intent,
    IntentStatus,
    RuleOverride,
    RuleStateChanges,
)
from engine.store.sqlite import (
    GLOBAL_GUARD,
    ResumeResult,
    SqliteStore,
    StaleRuleState,
    StoreCondition,
    StoreError,
)

__all__ = [
    "GLOBAL_GUARD",
    "AuditRow",
    "Batch",
    "FollowUpCancel",
    "FollowUpKey",
    "Intent",
    "IntentStatus",
    "ResumeResult",
    "RuleOverride",
    "RuleStateChanges",
    "SqliteStore",
    "StaleRuleState",
    "StoreCondition",
    "StoreError",
]
