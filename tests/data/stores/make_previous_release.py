"""Writes `previous-release.sqlite3`: a store made by the release before schema steps were
counted (commit dbf81b2), with a row of every kind, for the migration tests.

Run with that release's package first on the path, e.g.:
    git archive dbf81b2 | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/data/stores/make_previous_release.py
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.store.model import (  # type: ignore[import-not-found]
    AuditRow,
    Batch,
    FollowUpKey,
    Intent,
    IntentStatus,
    RuleOverride,
    RuleStateChanges,
)
from engine.store.sqlite import SqliteStore  # type: ignore[import-not-found]

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
LATER = datetime(2099, 1, 1, tzinfo=UTC)  # a follow-up that waits for good
TARGET = {"sim_id": 9, "endpoint_id": 5, "iccid": "8988"}


def main() -> None:
    path = Path(__file__).with_name("previous-release.sqlite3")
    path.unlink(missing_ok=True)
    store = SqliteStore(path)
    follow_up = FollowUpKey("1-r-1", "r", 1, 1, "sim.id", "9", T0, LATER)
    store.commit_batch(
        Batch(
            seen=[(1, T0), (2, T0 + timedelta(seconds=1))],
            intents=[
                Intent("1-r-0", 1, "r", 0, "suspend_sim", {}, TARGET),
                Intent("1-r-1", 1, "r", 1, "activate_sim", {}, TARGET, due_at=LATER),
                Intent("2-w-0", 2, "w", 0, "webhook", {"body": {"b": 1, "a": 2}}, TARGET),
            ],
            audit=[
                AuditRow(1, "r", None, "matched", iccid="8988", sim_id=9, endpoint_id=5),
                AuditRow(1, "r", "suspend_sim", "planned", iccid="8988"),
                AuditRow(2, "w", None, "below_threshold", iccid="8988"),
            ],
            quarantine=[("poller", "not JSON", "{oops")],
            cursor=T0 + timedelta(minutes=5),
            state=RuleStateChanges(
                windows={("w", "9"): ([T0.timestamp(), T0.timestamp() + 1], T0.timestamp() + 600)},
                throttles={("r", "9"): T0.timestamp() + 3600},
                guards={"r": [T0.timestamp()], "*": [T0.timestamp()]},
                overrides=[RuleOverride("g", "shadow", "5 actions in 1h", T0, 1)],
                follow_ups=[follow_up],
            ),
        )
    )
    store.collect_digest_event("d", 2, T0, {"id": 2, "text": "digest me"})
    store.start_digest("d", T0)
    suspend, _, webhook = store.intents()
    store.start_attempt(suspend.id)
    store.finish_intent(suspend, IntentStatus.DONE)
    store.start_attempt(webhook.id)
    store.finish_intent(webhook, IntentStatus.DEAD, error="503 from the receiver")
    store.set_meta("marker", "kept")
    store.close()
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
