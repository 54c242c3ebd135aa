"""Event-type names and ids: what `when: {type: "Quota used up"}` resolves through.

Names differ between emnify's sources ("Organisation blocked" / "Organization blocked"),
so lookups fold case, spacing, `_`/`-` and that spelling. Rules match on ids; names are a
convenience resolved once at load time. A name that does not resolve gets suggestions that
ignore word order too ("Location update" → "Update location").

The bundled list also says, for the types whose events are documented, which source and
severity such events usually carry (`event-engine types` shows it); the API's list has
names only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson

from engine.engine_events import catalog_records

_SPACES = re.compile(r"[\s_-]+")

# For a numeric type id the catalog does not know: a warning, since the API may know it.
UNKNOWN_TYPE_HINT = (
    "`event-engine types` lists the known ones; an id the API added since is fine, and "
    "`event-engine types --config FILE` shows the API's own list"
)


def _fold(name: str) -> str:
    return _SPACES.sub(" ", name.strip().lower()).replace("organization", "organisation")


@dataclass(frozen=True, slots=True)
class TypicalOrigin:
    """The source and severity events of one type usually carry (names as the API sends
    them, e.g. "Policy Control", "Warn"); None where the bundled list does not say."""

    source: str | None = None
    severity: str | None = None
    # What its events carry of `sim` and `endpoint` (an organisation's events carry
    # neither: `frozenset()`); None where the bundled list does not say.
    carries: frozenset[str] | None = None


class EventTypeCatalog:
    """Event-type id ↔ name, with case- and spelling-tolerant name lookup."""

    __slots__ = ("_ids", "_names", "_typical")

    def __init__(
        self, names: Mapping[int, str], typical: Mapping[int, TypicalOrigin] | None = None
    ):
        self._names: dict[int, str] = dict(sorted(names.items()))
        self._typical: dict[int, TypicalOrigin] = dict(typical or {})
        self._ids: dict[str, int] = {}
        for type_id, name in self._names.items():
            self._ids.setdefault(_fold(name), type_id)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> EventTypeCatalog:
        """Build from `{"id", "name"}` or `{"id", "description"}` records (the API's
        `/api/v1/event/type` list uses `description` for the name)."""
        names: dict[int, str] = {}
        typical: dict[int, TypicalOrigin] = {}
        for record in records:
            type_id = record.get("id")
            name = record.get("name") or record.get("description")
            if isinstance(type_id, bool) or not isinstance(type_id, int):
                raise ValueError(f"event type record without an integer id: {record!r:.80}")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"event type {type_id} has no name")
            names[type_id] = name.strip()
            source, severity = record.get("source"), record.get("severity")
            listed = record.get("carries")
            carries = frozenset(str(c) for c in listed) if isinstance(listed, list) else None
            if isinstance(source, str) or isinstance(severity, str) or carries is not None:
                typical[type_id] = TypicalOrigin(
                    source if isinstance(source, str) else None,
                    severity if isinstance(severity, str) else None,
                    carries,
                )
        return cls(names, typical)

    @classmethod
    def bundled(cls) -> EventTypeCatalog:
        """The event types shipped with the engine (`engine/data/event-types.json`)."""
        return _bundled()

    def merged(self, newer: EventTypeCatalog) -> EventTypeCatalog:
        """A catalog with `newer`'s entries added, and winning where both name an id."""
        return EventTypeCatalog(
            {**self._names, **newer._names}, {**self._typical, **newer._typical}
        )

    def id_of(self, name: str) -> int | None:
        return self._ids.get(_fold(name))

    def name_of(self, type_id: int) -> str | None:
        return self._names.get(type_id)

    def typical(self, type_id: int) -> TypicalOrigin:
        """The source and severity events of the type usually carry, where known."""
        return self._typical.get(type_id, _UNKNOWN_ORIGIN)

    def label(self, type_id: int) -> str:
        """`19 (Quota used up)`, or just the id when the catalog does not know it."""
        name = self._names.get(type_id)
        return f"{type_id} ({name})" if name else str(type_id)

    def suggest(self, name: str) -> list[str]:
        """Known names close to `name`, best first, for a did-you-mean hint: the same words
        in another order first, then names spelt alike, then names alike once each one's
        words are sorted ("location update" and "update location" are one set of words)."""
        wanted = _fold(name)
        folded = {_fold(n): n for n in self._names.values()}
        by_words: dict[str, str] = {}
        for key, known in folded.items():
            by_words.setdefault(_sorted_words(key), known)
        same_words = [n for key, n in folded.items() if _sorted_words(key) == _sorted_words(wanted)]
        close = difflib.get_close_matches(wanted, list(folded), n=3, cutoff=0.6)
        reordered = difflib.get_close_matches(
            _sorted_words(wanted), list(by_words), n=3, cutoff=0.6
        )
        found = [*same_words, *(folded[c] for c in close), *(by_words[c] for c in reordered)]
        return list(dict.fromkeys(found))[:3]

    def __contains__(self, type_id: object) -> bool:
        return type_id in self._names

    def __iter__(self) -> Iterator[int]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_UNKNOWN_ORIGIN = TypicalOrigin()


def _sorted_words(folded: str) -> str:
    return " ".join(sorted(folded.split()))


@cache
def _bundled() -> EventTypeCatalog:
    # The engine's own event types (`engine.engine_events`) are always known.
    text = resources.files("engine").joinpath("data", "event-types.json").read_bytes()
    return EventTypeCatalog.from_records([*orjson.loads(text), *catalog_records()])
