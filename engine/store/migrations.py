"""Versioned schema migrations, shared by the store backends.

Each backend lists its steps in order (`Migration`: a version, a line saying what it does,
and how to apply it on that backend's connection); the version a store is at is the highest
in its `schema_version` table, one row per step applied, with when it was applied. A store
made before versioning existed has no such table: it is at version 0, and every backend's
first step is written to bring any earlier shape of its tables up to date without losing a
row (it creates what is missing and leaves what is there).

A store written by a newer engine (a version this code has no step for) is refused before
anything reads or writes it: an older engine could misread rows it does not know how to
read. A store that needs steps when `store.migrate` is `never` is refused too, so an
operator who upgrades by hand (`event-engine store migrate`) decides when it happens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.errors import StoreError

_Connection = TypeVar("_Connection")


@dataclass(frozen=True, slots=True)
class Migration(Generic[_Connection]):
    """One step of a backend's schema: applied once, in version order, in the transaction
    that records it."""

    version: int
    description: str
    apply: Callable[[_Connection], None]


class SchemaTooNew(StoreError):
    """The store was written by an engine that knows more schema steps than this one."""


class MigrationNeeded(StoreError):
    """The store needs steps and `store.migrate` is `never`."""


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """Where a store's schema is and what a migration would do to it."""

    where: str  # the store, as shown to the operator
    current: int
    latest: int
    pending: tuple[tuple[int, str], ...]  # (version, description) of the steps to apply

    def lines(self) -> list[str]:
        """What `event-engine store migrate --dry-run` prints."""
        if not self.pending:
            return [f"{self.where}: schema version {self.current}, up to date"]
        head = (
            f"{self.where}: schema version {self.current}, this event-engine knows "
            f"{self.latest}; {len(self.pending)} step(s) to apply:"
        )
        return [head, *(f"  {version}: {text}" for version, text in self.pending)]


def check_steps(steps: Sequence[Migration[_Connection]]) -> None:
    """A backend's steps are numbered 1, 2, 3... with no gap (checked when the module loads:
    a step inserted out of order would be skipped by stores already past it)."""
    versions = [step.version for step in steps]
    if versions != list(range(1, len(steps) + 1)):
        raise AssertionError(f"schema steps must be numbered 1..n in order, got {versions}")


def plan(where: str, current: int, steps: Sequence[Migration[_Connection]]) -> MigrationPlan:
    """The steps a store at `current` needs; SchemaTooNew when it is past the last one."""
    latest = steps[-1].version if steps else 0
    if current > latest:
        raise SchemaTooNew(
            f"the store {where} was written by a newer event-engine (schema {current}, this "
            f"one knows {latest}): upgrade this event-engine to the version that wrote it, "
            "or restore the store from a backup made before the upgrade"
        )
    pending = tuple((s.version, s.description) for s in steps if s.version > current)
    return MigrationPlan(where, current, latest, pending)


def refuse_unless_allowed(found: MigrationPlan, migrate: bool) -> None:
    """MigrationNeeded when `found` has steps to apply and migrating at start is off."""
    if found.pending and not migrate:
        raise MigrationNeeded(
            f"the store {found.where} is at schema version {found.current} and this "
            f"event-engine needs {found.latest} (store.migrate is `never`): run "
            "`event-engine store migrate` (after a backup), then start again"
        )
