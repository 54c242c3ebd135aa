"""The stores' failure wrapper (engine/store/failures.py): a backend's own error leaves a
public method as one StoreError in the store's words, and is remembered, by method, until
that method succeeds again; `recent_failure` says the latest one for a minute.

The wrapper decorates a class here, in the test, rather than through SqliteStore: the
stores' classes are decorated once, when they are imported."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace
from typing import Any

import pytest

from engine.errors import StoreError
from engine.store import failures
from engine.store.failures import FAILURE_MEMORY, Failure, recent_failure


def _decorated() -> Any:
    @failures.failures_as_store_errors(
        (sqlite3.Error,), lambda store, error: f"{store.name} failed: {error}"
    )
    class Store:
        def __init__(self) -> None:
            self._failures: dict[str, Failure] = {}
            self.name = "the store"
            self.broken = True

        def write(self) -> str:
            if self.broken:
                raise sqlite3.OperationalError("disk I/O error")
            return "written"

        def read(self) -> str:
            raise sqlite3.DatabaseError("file is not a database")

        def refuse(self) -> None:
            raise ValueError("not a database error")

        def _private(self) -> None:
            raise sqlite3.OperationalError("private")

        def ǁvariant(self) -> None:  # a name such as mutation testing adds to a class
            raise sqlite3.OperationalError("variant")

    return Store()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The wrapper's monotonic clock, set by the test."""
    fake = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(failures, "time", SimpleNamespace(monotonic=lambda: fake.now))
    return fake


def test_a_database_error_leaves_a_public_method_as_a_store_error_in_the_stores_words(clock):
    store = _decorated()
    with pytest.raises(StoreError, match=r"^the store failed: disk I/O error$") as raised:
        store.write()
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)


def test_a_failure_is_remembered_by_the_method_that_failed_until_it_succeeds(clock):
    store = _decorated()
    with pytest.raises(StoreError):
        store.write()
    clock.now += 5
    with pytest.raises(StoreError):
        store.read()
    assert store._failures == {
        "write": Failure(1000.0, "the store failed: disk I/O error"),
        "read": Failure(1005.0, "the store failed: file is not a database"),
    }
    store.broken = False
    assert store.write() == "written"
    assert list(store._failures) == ["read"]


def test_other_errors_and_private_methods_are_left_as_they_are(clock):
    store = _decorated()
    with pytest.raises(ValueError, match="not a database error"):
        store.refuse()
    with pytest.raises(sqlite3.OperationalError, match="private"):
        store._private()
    with pytest.raises(sqlite3.OperationalError, match="variant"):
        store.ǁvariant()
    assert store._failures == {}


def test_the_wrapped_method_keeps_its_name(clock):
    store = _decorated()
    assert type(store).write.__name__ == "write"
    assert type(store).write.__wrapped__.__name__ == "write"


def test_the_latest_failure_is_said_with_its_age_while_it_is_remembered(clock):
    remembered = {
        "write": Failure(940.5, "the older failure"),
        "read": Failure(970.0, "the latest failure"),
    }
    assert recent_failure(remembered) == "failed 30s ago: the latest failure"
    assert recent_failure({"write": remembered["write"]}) == "failed 60s ago: the older failure"


def test_a_failure_a_minute_old_is_forgotten(clock):
    assert recent_failure({"write": Failure(clock.now - FAILURE_MEMORY, "old")}) is None
    assert recent_failure({}) is None
