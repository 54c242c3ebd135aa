"""The `when:` shorthand: plain constraints on an event's typed fields, all of which must hold.

Type, source and severity are what the rule index sorts rules by; the rest (alert, iccid,
endpoint name, tags) is tested per candidate. `parse_when` turns the YAML mapping into a
`When`, resolving names to ids once so matching compares integers.

`not:` holds the same keys the other way round: the event must have none of the values it
lists (`not: {tags: vip}` leaves out endpoints tagged `vip`, `not: {tags: [vip, test]}` those
tagged either). Tags are compared whole: `vip` is not `vipersat`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from engine.errors import Location
from engine.events import ENGINE_SOURCE_ID, SEVERITIES, SOURCES, Event
from engine.rules.catalog import UNKNOWN_TYPE_HINT, EventTypeCatalog
from engine.section import Section, describe, did_you_mean
from engine.yamlfile import YamlList

WHEN_KEYS = ("type", "source", "severity", "alert", "iccid", "endpoint_name", "tags", "not")
_NOT_KEYS = WHEN_KEYS[:-1]

_T = TypeVar("_T", int, str)

_SEVERITY_NAMES = {"info": 0, "warn": 1, "warning": 1, "critical": 2}
_SOURCE_NAMES = {"network": 0, "policy control": 1, "api": 2, "engine": ENGINE_SOURCE_ID}


@dataclass(frozen=True, slots=True)
class Exclusion:
    """`when: {not: {...}}`: values the event must have none of; None means "no exclusion"."""

    type_ids: frozenset[int] | None = None
    source_ids: frozenset[int] | None = None
    severity_ids: frozenset[int] | None = None
    alert: bool | None = None
    iccids: frozenset[str] | None = None
    endpoint_names: frozenset[str] | None = None
    tags: frozenset[str] | None = None

    def allows(self, event: Event) -> bool:
        return self.excluded_by(event) is None

    def excluded_by(self, event: Event) -> str | None:
        """None when the event has none of the excluded values, else which one it has."""
        if self.type_ids is not None and event.type_id in self.type_ids:
            return f"type is {_type_label(event)}, which the rule excludes"
        if self.source_ids is not None and event.source_id in self.source_ids:
            shown = SOURCES.get(event.source_id or 0, str(event.source_id))
            return f"source is {shown}, which the rule excludes"
        if self.severity_ids is not None and event.severity_id in self.severity_ids:
            shown = SEVERITIES.get(event.severity_id or 0, str(event.severity_id))
            return f"severity is {shown}, which the rule excludes"
        if self.alert is not None and event.alert is self.alert:
            return f"alert is {str(event.alert).lower()}, which the rule excludes"
        if self.iccids is not None and event.iccid in self.iccids:
            return f"iccid is {event.iccid}, which the rule excludes"
        if self.endpoint_names is not None and event.endpoint_name in self.endpoint_names:
            return f"endpoint_name is {event.endpoint_name}, which the rule excludes"
        if self.tags is not None and not self.tags.isdisjoint(event.tags):
            found = ", ".join(sorted(self.tags & event.tags))
            return f"endpoint is tagged {found}, which the rule excludes"
        return None


@dataclass(frozen=True, slots=True)
class When:
    """Constraints on an event; None means "any". An empty `When` matches every event."""

    type_ids: frozenset[int] | None = None
    source_ids: frozenset[int] | None = None
    severity_ids: frozenset[int] | None = None
    alert: bool | None = None
    iccids: frozenset[str] | None = None
    endpoint_names: frozenset[str] | None = None
    tags: frozenset[str] | None = None
    exclude: Exclusion | None = None
    # How the wanted types read in explanations, e.g. ("19 (Quota used up)",).
    type_labels: tuple[str, ...] = field(default=(), compare=False)

    @property
    def checks_details(self) -> bool:
        """Whether anything beyond type, source and severity (the index's keys) is set."""
        return not (
            self.alert is None
            and self.iccids is None
            and self.endpoint_names is None
            and self.tags is None
            and self.exclude is None
        )

    def details_hold(self, event: Event) -> bool:
        """The non-indexed part: alert, iccid, endpoint name, tags and `not` (the hot path)."""
        if self.alert is not None and event.alert is not self.alert:
            return False
        if self.iccids is not None and event.iccid not in self.iccids:
            return False
        if self.endpoint_names is not None and event.endpoint_name not in self.endpoint_names:
            return False
        if self.tags is not None and not self.tags <= event.tags:
            return False
        return self.exclude is None or self.exclude.allows(event)

    def mismatch(self, event: Event) -> str | None:
        """None when every constraint holds, else which one failed and why."""
        if self.type_ids is not None and event.type_id not in self.type_ids:
            wanted = _either(self.type_labels or [str(t) for t in sorted(self.type_ids)])
            return f"type is {_type_label(event)}, rule wants {wanted}"
        if self.source_ids is not None and event.source_id not in self.source_ids:
            return _named("source", event.source_id, self.source_ids, SOURCES)
        if self.severity_ids is not None and event.severity_id not in self.severity_ids:
            return _named("severity", event.severity_id, self.severity_ids, SEVERITIES)
        if self.alert is not None and event.alert is not self.alert:
            return f"alert is {str(event.alert).lower()}, rule wants {str(self.alert).lower()}"
        if self.iccids is not None and event.iccid not in self.iccids:
            return f"iccid is {event.iccid or 'missing'}, rule wants {_either(sorted(self.iccids))}"
        if self.endpoint_names is not None and event.endpoint_name not in self.endpoint_names:
            shown = event.endpoint_name or "missing"
            wanted = _either(sorted(self.endpoint_names))
            return f"endpoint_name is {shown}, rule wants {wanted}"
        if self.tags is not None and not self.tags <= event.tags:
            lacking = ", ".join(sorted(self.tags - event.tags))
            return f"endpoint tags lack {lacking}"
        return None if self.exclude is None else self.exclude.excluded_by(event)


def _either(values: Iterable[str]) -> str:
    items = list(values)
    if len(items) <= 2:
        return " or ".join(items)
    return "one of " + ", ".join(items)


def _type_label(event: Event) -> str:
    if event.type_id is None:
        return "missing"
    name = event.type_name
    return f"{event.type_id} ({name})" if name else str(event.type_id)


def _named(what: str, actual: int | None, wanted: frozenset[int], names: dict[int, str]) -> str:
    shown = "missing" if actual is None else names.get(actual, str(actual))
    return f"{what} is {shown}, rule wants {_either(names.get(w, str(w)) for w in sorted(wanted))}"


# --- parsing -------------------------------------------------------------------------------


def _items(section: Section, key: str) -> list[tuple[object, Location]] | None:
    """The value under `key` as (item, where) pairs: a single value counts as a list of one."""
    value = section.data[key]
    if not isinstance(value, YamlList):
        return [(value, section.at(key))]
    if not value:
        section.error(
            key,
            f"`{key}` is an empty list, which no event matches",
            "remove the key to match any value",
        )
        return None
    return [(item, Location(section.file, value.line_of(i))) for i, item in enumerate(value)]


def _resolve(
    section: Section,
    key: str,
    resolve: Callable[[object], _T | None],
    complaint: Callable[[object], tuple[str, str | None]],
) -> frozenset[_T] | None:
    """Resolve each item (a name to an id, say); report every item that does not resolve."""
    items = _items(section, key)
    if items is None:
        return None
    resolved: set[_T] = set()
    failed = False
    for item, where in items:
        value = resolve(item)
        if value is None:
            section.error_at(where, *complaint(item))
            failed = True
        else:
            resolved.add(value)
    return None if failed else frozenset(resolved)


def _id_or_name(item: object, names: dict[str, int], top: int) -> int | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return item if 0 <= item <= top else None
    if isinstance(item, str):
        folded = " ".join(item.strip().lower().replace("_", " ").replace("-", " ").split())
        return names.get(folded)
    return None


def parse_when(section: Section, catalog: EventTypeCatalog) -> When:
    """Check a `when:` mapping (keys, types, names) and resolve it; errors go to `section`."""
    section.check_keys(WHEN_KEYS)
    when = _constraints(section, catalog)
    if "not" not in section.data:
        return when
    sub = section.sub("not", "not")
    if sub is None:
        return when
    sub.check_keys(_NOT_KEYS)
    if not sub.data:
        sub.error(None, "`not` lists nothing to exclude", "e.g. not: {tags: vip}")
        return when
    excluded = _constraints(sub, catalog)
    exclusion = Exclusion(
        type_ids=excluded.type_ids,
        source_ids=excluded.source_ids,
        severity_ids=excluded.severity_ids,
        alert=excluded.alert,
        iccids=excluded.iccids,
        endpoint_names=excluded.endpoint_names,
        tags=excluded.tags,
    )
    return replace(when, exclude=exclusion)


def _constraints(section: Section, catalog: EventTypeCatalog) -> When:
    """The constraints of one mapping (`when` itself, or its `not`), resolved."""
    data = section.data
    type_ids: frozenset[int] | None = None
    source_ids: frozenset[int] | None = None
    severity_ids: frozenset[int] | None = None
    labels: tuple[str, ...] = ()

    if "type" in data:

        def type_id(item: object) -> int | None:
            if isinstance(item, bool):
                return None
            if isinstance(item, int):
                return item if item >= 0 else None
            return catalog.id_of(item) if isinstance(item, str) else None

        def bad_type(item: object) -> tuple[str, str | None]:
            if isinstance(item, str):
                close = catalog.suggest(item)
                hint = f"did you mean `{close[0]}`?" if close else "use the numeric type id"
                return f"unknown event type `{item}`", hint
            return (
                f"`type` must be an event-type id or name, got {describe(item)}",
                'e.g. type: 19 or type: ["Quota used up"]',
            )

        type_ids = _resolve(section, "type", type_id, bad_type)
        if type_ids is not None:
            labels = tuple(catalog.label(t) for t in sorted(type_ids))
            _warn_unknown_ids(section, catalog)

    if "source" in data:
        source_ids = _resolve(
            section,
            "source",
            lambda item: (
                ENGINE_SOURCE_ID
                if item == ENGINE_SOURCE_ID and not isinstance(item, bool)
                else _id_or_name(item, _SOURCE_NAMES, 2)
            ),
            lambda item: _bad_name("source", item, _SOURCE_NAMES, SOURCES),
        )
    if "severity" in data:
        severity_ids = _resolve(
            section,
            "severity",
            lambda item: _id_or_name(item, _SEVERITY_NAMES, 2),
            lambda item: _bad_name("severity", item, _SEVERITY_NAMES, SEVERITIES),
        )

    alert = section.flag("alert", default=False) if "alert" in data else None

    return When(
        type_ids=type_ids,
        source_ids=source_ids,
        severity_ids=severity_ids,
        alert=alert,
        iccids=_texts(section, "iccid"),
        endpoint_names=_texts(section, "endpoint_name"),
        tags=_tags(section),
        type_labels=labels,
    )


def _warn_unknown_ids(section: Section, catalog: EventTypeCatalog) -> None:
    """A numeric type the catalog does not know loads (the API may know it), but is more
    often a typo: say so, where it is written."""
    for item, where in _items(section, "type") or ():
        if isinstance(item, int) and not isinstance(item, bool) and item not in catalog:
            section.warn_at(where, f"event type {item} is not in the catalog", UNKNOWN_TYPE_HINT)


def _bad_name(
    what: str, item: object, names: dict[str, int], canonical: dict[int, str]
) -> tuple[str, str | None]:
    choices = ", ".join(f"{i} {n}" for i, n in canonical.items())
    if isinstance(item, str):
        hint = did_you_mean(item.lower(), list(names))
        return f"unknown {what} `{item}`", hint or f"use one of: {choices}"
    if isinstance(item, int) and not isinstance(item, bool):
        return f"unknown {what} id {item}", f"use one of: {choices}"
    return f"`{what}` must be an id or a name, got {describe(item)}", f"use one of: {choices}"


def _texts(section: Section, key: str) -> frozenset[str] | None:
    if key not in section.data:
        return None

    def bad(item: object) -> tuple[str, str | None]:
        hint = f'quote it: {key}: "{item}"' if isinstance(item, int | float) else None
        return f"`{key}` must be a string or a list of strings, got {describe(item)}", hint

    return _resolve(section, key, _as_text, bad)


def _as_text(item: object) -> str | None:
    return item if isinstance(item, str) else None


def _tags(section: Section) -> frozenset[str] | None:
    texts = _texts(section, "tags")
    if texts is None:
        return None
    # emnify stores tags as one comma-separated string; accept that form here too.
    tags = frozenset(t.strip() for text in texts for t in text.split(",") if t.strip())
    if not tags:
        section.error("tags", "`tags` names no tag")
        return None
    return tags
