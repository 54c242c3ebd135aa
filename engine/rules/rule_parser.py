"""One rule mapping from a rule file → a `Rule`, or the list of what is wrong with it."""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import timedelta

from engine.errors import ConfigError, Location
from engine.events import SOURCES
from engine.lookups import LOOKUP_NAMES, ON_LOOKUP_ERROR, OnLookupError
from engine.rules.catalog import EventTypeCatalog
from engine.rules.condition import Condition, read_condition
from engine.rules.model import (
    MODES,
    Absence,
    ActionStep,
    Digest,
    MaxActions,
    Mode,
    Rule,
    Threshold,
    Throttle,
)
from engine.rules.schedule import SCHEDULE_HINT, CronCheck, check_fields, parse_timezone
from engine.rules.steps import parse_steps
from engine.rules.when import When, parse_when
from engine.section import Section, describe, did_you_mean
from engine.state import format_duration
from engine.usage import Traffic, UsageLimit, parse_limit
from engine.yamlfile import YamlList, YamlMapping, plain

RULE_KEYS = (
    "id",
    "description",
    "enabled",
    "mode",
    "when",
    "condition",
    "actions",
    "threshold",
    "throttle",
    "schedule",
    "digest",
    "max_actions",
    "on_guard_trip",
    "on_own_actions",
    "absence",
    "lookup",
    "on_lookup_error",
    "usage",
    "organisation",
)
RULE_ID = re.compile(r"[A-Za-z0-9_.-]+")
DOTTED_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def rule_id(data: YamlMapping) -> str | None:
    """The rule's id when it is a valid one (used to spot duplicates even in broken rules)."""
    value = data.get("id")
    return value if isinstance(value, str) and RULE_ID.fullmatch(value) else None


def parse_rule(
    data: object,
    where: Location,
    number: int,
    catalog: EventTypeCatalog,
    warnings: list[ConfigError] | None = None,
    cron: CronCheck | None = None,
    organisations: Collection[str] | None = None,
) -> Rule | list[ConfigError]:
    """Validate one rule; `number` counts rules in the file from 1, for messages about rules
    without a usable id. Warnings (the rule loads, but likely not as meant) go to
    `warnings`. `organisations`: the names configured under `organisations:`, which
    `organisation:` must be one of (None: not known here, e.g. `validate` without a
    config; any name is taken)."""
    errors: list[ConfigError] = []
    if not isinstance(data, YamlMapping):
        message = f"rule #{number} must be a mapping with `id`, `when`, `actions`, ..."
        return [ConfigError(f"{message}, got {describe(data)}", where)]
    ident = rule_id(data)
    label = f"rule `{ident}`" if ident else f"rule #{number}"
    section = Section(data, where.file, label, errors, warnings)
    section.check_keys(RULE_KEYS)
    _check_id(section)

    description = section.text("description", default="") or ""
    enabled = section.flag("enabled", default=True)
    mode = _mode(section)
    on_own_actions = section.flag("on_own_actions", default=False)
    when = _when(section, catalog)
    condition: Condition | None = None
    if data.get("condition") is not None:
        condition = read_condition(section, "condition", catalog)
    actions = None
    if section.require("actions", "e.g. actions: [{suspend_sim: {}}]"):
        actions = parse_steps(section, "actions", catalog)
    on_guard_trip = None
    if "on_guard_trip" in data:
        on_guard_trip = parse_steps(section, "on_guard_trip", catalog)
    threshold = _threshold(section) if "threshold" in data else None
    throttle = _throttle(section) if "throttle" in data else None
    max_actions = _max_actions(section) if "max_actions" in data else None
    schedule = _schedule(section, cron) if "schedule" in data else None
    digest = _digest(section) if "digest" in data else None
    absence = _absence(section) if "absence" in data else None
    lookup = _lookup(section) if "lookup" in data else ()
    on_lookup_error = _on_lookup_error(section)
    usage = _usage(section) if "usage" in data else None
    if "usage" in data:
        _check_usage_rule(section)
    organisation = _organisation(section, organisations) if "organisation" in data else None
    if lookup and (absence is not None or schedule is not None):
        section.error(
            "lookup",
            "`lookup` fetches facts for one event's endpoint: an absence or digest rule"
            " acts on no single event",
            "drop `lookup`, or judge the event in a rule of its own",
        )
    if "absence" in data:
        _check_absence_rule(section, actions)
    if schedule is not None and digest is not None:
        _check_digest_rule(section, actions)
    elif schedule is not None and "digest" not in data:
        section.error(
            "schedule",
            "`schedule` needs `digest`: a scheduled rule collects events and acts on the list",
            "add e.g. `digest: {max_events: 50}`",
        )
    elif digest is not None and "schedule" not in data:
        section.error(
            "digest", "`digest` needs `schedule`", f"add `schedule:` with {SCHEDULE_HINT}"
        )

    if actions is not None and schedule is None and "usage" not in data:
        _warn_missing_targets(section, when, [*actions, *(on_guard_trip or ())], catalog)
    if errors or ident is None or actions is None:
        return errors
    return Rule(
        id=ident,
        description=description,
        enabled=enabled,
        mode=mode,
        when=when,
        condition=None if lookup else condition,
        condition_source=condition.source if condition is not None else None,
        actions=actions,
        where=where,
        threshold=threshold,
        throttle=throttle,
        schedule=schedule,
        digest=digest,
        max_actions=max_actions,
        on_guard_trip=on_guard_trip or (),
        on_own_actions=on_own_actions,
        absence=absence,
        lookup=lookup,
        lookup_condition=condition if lookup else None,
        on_lookup_error=on_lookup_error,
        usage=usage,
        organisation=organisation,
        definition=plain(data),
    )


def _organisation(section: Section, known: Collection[str] | None) -> str | None:
    """`organisation:` names one of the config's `organisations:` (checked when known)."""
    value = section.data.get("organisation")
    if not isinstance(value, str) or not value:
        section.error(
            "organisation",
            f"`organisation` must be the name of an organisation, got {describe(value)}",
            "e.g. organisation: acme (a name under `organisations:` in the config)",
        )
        return None
    if known is None or value in known:
        return value
    if not known:
        hint = "the config lists no `organisations:`; drop `organisation:` or add it there"
    else:
        hint = did_you_mean(value, sorted(known)) or "configured: " + ", ".join(sorted(known))
    section.error("organisation", f"unknown organisation {value!r}", hint)
    return None


def _warn_missing_targets(
    section: Section, when: When, steps: list[ActionStep], catalog: EventTypeCatalog
) -> None:
    """Warn when `when` admits event types whose events never carry the SIM or endpoint an
    action needs (the catalog says which: an organisation's events carry neither): on each
    such event the action fails, as "Organisation blocked" fails a `suspend_sim`."""
    needs = {step.action.needs: step.kind for step in steps if step.action.needs is not None}
    if not needs:
        return
    lacking = {
        need: [t for t in _admitted_types(when, catalog) if _lacks(catalog, t, need)]
        for need in needs
    }
    for need, kind in needs.items():
        types = lacking[need]
        if not types:
            continue
        shown = ", ".join(catalog.label(t) for t in types[:4])
        more = f" and {len(types) - 4} more" if len(types) > 4 else ""
        section.warn(
            "when" if "when" in section.data else None,
            f"`{kind}` needs the event's {need}, but `when` admits {shown}{more}, whose events "
            f"carry no {need}: the action fails on every one of them",
            "narrow `when` to the types that carry it, e.g. `type: [...]`, or leave them out "
            f"with `not: {{type: [{', '.join(str(t) for t in types[:4])}]}}`",
        )


def _admitted_types(when: When, catalog: EventTypeCatalog) -> list[int]:
    """The catalog's types `when` lets through, by type and source (severities vary by
    event, so they narrow nothing here)."""
    excluded = when.exclude.type_ids if when.exclude is not None else None
    if when.type_ids is not None:
        candidates = sorted(when.type_ids)
    else:
        sources = when.source_ids
        wanted = None if sources is None else {SOURCES.get(s, "").lower() for s in sources}
        candidates = [
            t
            for t in catalog
            if wanted is None or (catalog.typical(t).source or "").lower() in wanted
        ]
    return [t for t in candidates if excluded is None or t not in excluded]


def _lacks(catalog: EventTypeCatalog, type_id: int, need: str) -> bool:
    carries = catalog.typical(type_id).carries
    return carries is not None and need not in carries


def _check_id(section: Section) -> None:
    if not section.require("id", "add e.g. `id: block-sim-on-quota-exhausted`"):
        return
    value = section.data["id"]
    if not isinstance(value, str):
        section.error("id", f"`id` must be a string, got {describe(value)}", "quote it")
    elif not RULE_ID.fullmatch(value):
        section.error(
            "id",
            f"`id` {value!r} may only use letters, digits, `_`, `.` and `-`",
            "e.g. block-sim-on-quota-exhausted",
        )


def _lookup(section: Section) -> tuple[str, ...]:
    """`lookup: [quota.data, stats.month]`: known names, each once."""
    value = section.data.get("lookup")
    hint = "known lookups: " + ", ".join(f"`{name}`" for name in LOOKUP_NAMES)
    if not isinstance(value, YamlList) or not value:
        section.error("lookup", f"`lookup` must be a list of names, got {describe(value)}", hint)
        return ()
    names: list[str] = []
    for index, name in enumerate(value):
        where = Location(section.file, value.line_of(index))
        if name not in LOOKUP_NAMES:
            better = did_you_mean(name, LOOKUP_NAMES) or hint
            shown = f"`{name}`" if isinstance(name, str) else describe(name)
            section.error_at(where, f"unknown lookup {shown}", better)
        elif name in names:
            section.error_at(where, f"lookup `{name}` is listed twice")
        else:
            names.append(name)
    return tuple(names)


def _on_lookup_error(section: Section) -> OnLookupError:
    """What the rule does when a fact cannot be had: `skip` (the default) or `act`."""
    if "on_lookup_error" not in section.data:
        return "skip"
    value = section.data.get("on_lookup_error")
    if "lookup" not in section.data:
        section.error("on_lookup_error", "`on_lookup_error` needs `lookup`")
    for choice in ON_LOOKUP_ERROR:
        if value == choice:
            return choice
    section.error(
        "on_lookup_error",
        f"`on_lookup_error` must be `skip` or `act`, got {describe(value)}",
        "`skip`: record `lookup unavailable` and do not act; `act`: act as if it held",
    )
    return "skip"


def _mode(section: Section) -> Mode:
    value = section.data.get("mode", "live")
    for mode in MODES:
        if value == mode:
            return mode
    section.error("mode", f"`mode` must be `live` or `shadow`, got {describe(value)}")
    return "live"


def _when(section: Section, catalog: EventTypeCatalog) -> When:
    if section.data.get("when") is None:
        return When()
    sub = section.sub("when", "when")
    return parse_when(sub, catalog) if sub is not None else When()


def _threshold(section: Section) -> Threshold | None:
    sub = section.sub("threshold", "threshold")
    if sub is None:
        return None
    sub.check_keys(("count", "within", "per"))
    count = sub.count("count") if sub.require("count", "e.g. count: 3") else None
    within = sub.duration("within") if sub.require("within", "e.g. within: 10m") else None
    per = _event_path(sub, "per")
    return Threshold(count, within, per) if count and within else None


# `per:` of a usage limit: a short name for the usual keys, or any dotted path.
USAGE_PER = {"endpoint": "endpoint.id", "sim": "sim.id", "iccid": "sim.iccid"}
DEFAULT_USAGE_PER = "endpoint"
# A usage rule is fed by usage records, not events: settings that pick, count or collect
# events have nothing to work on.
_NOT_WITH_USAGE = ("when", "threshold", "absence", "schedule", "digest", "lookup")


def _usage(section: Section) -> UsageLimit | None:
    """`usage: {data: ">200MB", within: 24h, per: endpoint}` (or `sms: ">100"`)."""
    sub = section.sub("usage", "usage")
    if sub is None:
        return None
    errors_before = len(sub.errors)
    sub.check_keys(("data", "sms", "within", "per"))
    given: list[Traffic] = [t for t in ("data", "sms") if t in sub.data]
    limit = None
    if len(given) != 1:
        sub.error(
            None,
            "`usage` needs one of `data` or `sms`" + (", not both" if len(given) > 1 else ""),
            'e.g. data: ">200MB" or sms: ">100"; a rule of its own for the other',
        )
    else:
        try:
            limit = parse_limit(given[0], sub.data.get(given[0]))
        except ValueError as error:
            sub.error(given[0], f"`{given[0]}` {error}")
    within = sub.duration("within") if sub.require("within", "e.g. within: 24h") else None
    per = _usage_per(sub)
    if len(sub.errors) > errors_before or limit is None or not within or per is None:
        return None
    above, inclusive, unit = limit
    return UsageLimit(given[0], above, inclusive, unit, within, per)


def _usage_per(section: Section) -> str | None:
    value = section.data.get("per")
    if value is None:
        return USAGE_PER[DEFAULT_USAGE_PER]
    if isinstance(value, str) and value in USAGE_PER:
        return USAGE_PER[value]
    return section.get("per", _usage_path, None)


def _usage_path(value: object, name: str) -> str:
    if isinstance(value, str) and DOTTED_PATH.fullmatch(value):
        return value
    raise ConfigError(
        f"`{name}` must be endpoint, sim, iccid or a dotted path into the usage record, got"
        f" {describe(value)}",
        hint="e.g. per: endpoint",
    )


def _check_usage_rule(section: Section) -> None:
    for key in _NOT_WITH_USAGE:
        if key in section.data:
            section.error(
                key,
                f"`{key}` cannot be combined with `usage`",
                "a usage rule is fed by the Data Streamer's usage records, not by events;"
                " use `condition` to pick records, or a separate rule for events",
            )


def _throttle(section: Section) -> Throttle | None:
    sub = section.sub("throttle", "throttle")
    if sub is None:
        return None
    sub.check_keys(("for", "per"))
    period = sub.duration("for") if sub.require("for", "e.g. for: 1h") else None
    per = _event_path(sub, "per")
    return Throttle(period, per) if period else None


def _event_path(section: Section, key: str) -> str | None:
    """A field of the event such as `sim.iccid` (what windows and throttles group by); an
    empty `per` groups nothing, as if it were left out."""
    if section.data.get(key) is None:
        return None
    return section.get(key, _dotted_path, None)


def _dotted_path(value: object, name: str) -> str:
    if isinstance(value, str) and DOTTED_PATH.fullmatch(value):
        return value
    raise ConfigError(
        f"`{name}` must be a dotted path into the event, got {describe(value)}",
        hint="e.g. sim.iccid or endpoint.id",
    )


def _max_actions(section: Section) -> MaxActions | None:
    sub = section.sub("max_actions", "max_actions")
    if sub is None:
        return None
    sub.check_keys(("count", "within"))
    count = sub.count("count") if sub.require("count", "e.g. count: 100") else None
    within = sub.duration("within") if sub.require("within", "e.g. within: 1h") else None
    return MaxActions(count, within) if count and within else None


# An absence is kept long enough, by default, to see a device through the Event API's
# 30-day retention.
DEFAULT_FORGET_AFTER = timedelta(days=30)
# A static list of keys is held in memory and in the store, one row a key.
MAX_ABSENCE_KEYS = 100_000
# An absence rule fires for a silence, not for an event: settings that count, throttle or
# collect events have nothing to act on.
_NOT_WITH_ABSENCE = ("threshold", "throttle", "schedule", "digest", "max_actions", "on_guard_trip")


def _absence(section: Section) -> Absence | None:
    sub = section.sub("absence", "absence")
    if sub is None:
        return None
    errors_before = len(sub.errors)
    sub.check_keys(("for", "per", "forget_after", "keys"))
    period = sub.duration("for") if sub.require("for", "e.g. for: 6h") else None
    # Unlike a threshold's, an absence's `per` may not be left empty: it is what is watched.
    per = (
        sub.get("per", _dotted_path, None) if sub.require("per", "e.g. per: endpoint.id") else None
    )
    forget_after = (
        sub.duration("forget_after") if "forget_after" in sub.data else DEFAULT_FORGET_AFTER
    )
    keys = _absence_keys(sub) if "keys" in sub.data else ()
    if period is not None and forget_after is not None and forget_after <= period:
        sub.error(
            "forget_after",
            f"`forget_after` ({format_duration(forget_after)}) must be longer than `for` "
            f"({format_duration(period)}): a key would be forgotten before it could fire",
            f"e.g. forget_after: {format_duration(period * 7)}",
        )
    if len(sub.errors) > errors_before or not period or not per or not forget_after:
        return None
    return Absence(period, per, forget_after, keys or ())


def _absence_keys(section: Section) -> tuple[str, ...] | None:
    """The keys watched from the start: a list of the `per` field's values (ICCIDs, ids)."""
    value = section.data.get("keys")
    if not isinstance(value, YamlList) or not value:
        section.error(
            "keys",
            f"`keys` must be a list of the `per` field's values, got {describe(value)}",
            'e.g. keys: ["8988303000000000001", "8988303000000000002"] with per: sim.iccid',
        )
        return None
    if len(value) > MAX_ABSENCE_KEYS:
        section.error(
            "keys", f"`keys` may list at most {MAX_ABSENCE_KEYS:,} keys, got {len(value):,}"
        )
        return None
    keys: list[str] = []
    for index, item in enumerate(value):
        # Written as the event's values are read (`engine.state.key_of`): 9, not 9.0.
        if isinstance(item, str) and item.strip():
            keys.append(item.strip())
        elif isinstance(item, int) and not isinstance(item, bool):
            keys.append(str(item))
        else:
            section.error_at(
                Location(section.file, value.line_of(index)),
                f"`keys` items must be text or whole numbers, got {describe(item)}",
                'quote ICCIDs: "8988303000000000001"',
            )
    if len(keys) != len(value):
        return None
    return tuple(dict.fromkeys(keys))


def _check_absence_rule(section: Section, actions: tuple[ActionStep, ...] | None) -> None:
    for key in _NOT_WITH_ABSENCE:
        if key in section.data:
            section.error(
                key,
                f"`{key}` cannot be combined with `absence`",
                "an absence rule fires once per silence; use a separate rule",
            )
    for step in actions or ():
        if step.cancel_if is not None:
            section.error_at(
                step.where,
                "`cancel_if` is not used on an absence rule's follow-ups",
                "the key being seen again re-arms the rule; it does not cancel follow-ups",
            )


def _schedule(section: Section, cron: CronCheck | None) -> str | None:
    """The schedule, its five fields checked by `cron` (None: only that there are five)."""
    value = section.data.get("schedule")
    if not isinstance(value, str) or not value.strip():
        section.error(
            "schedule",
            f"`schedule` must be a cron expression, got {describe(value)}",
            'e.g. "0 8 * * *"',
        )
        return None
    try:
        check_fields(value)
        if cron is not None:
            cron(value)
    except ValueError as error:
        section.error("schedule", f"`schedule` {value!r} is not valid: {error}", SCHEDULE_HINT)
        return None
    return " ".join(value.split())


DEFAULT_MAX_EVENTS = 100
MAX_DIGEST_EVENTS = 10_000
DIGEST_KEYS = ("max_events", "include", "send_empty", "timezone")
# A digest acts once for many events, so it cannot aim at one event's SIM or endpoint, and
# rate and window settings (which are per event) have nothing to act on.
_NOT_WITH_DIGEST = ("threshold", "throttle", "max_actions", "on_guard_trip")


def _digest(section: Section) -> Digest | None:
    sub = section.sub("digest", "digest")
    if sub is None:
        return None
    errors_before = len(sub.errors)
    sub.check_keys(DIGEST_KEYS)
    max_events = sub.count("max_events") if "max_events" in sub.data else DEFAULT_MAX_EVENTS
    if max_events is not None and max_events > MAX_DIGEST_EVENTS:
        # The events are read into memory for one message (and the number into SQL).
        sub.error(
            "max_events",
            f"`max_events` must be at most {MAX_DIGEST_EVENTS:,}, got {max_events:,}",
            "the digest's `count` still tells how many events there were",
        )
    include = _include(sub) if "include" in sub.data else None
    send_empty = sub.flag("send_empty", default=False)
    timezone = sub.text("timezone", default="UTC") or "UTC"
    try:
        parse_timezone(timezone)
    except ValueError as error:
        sub.error("timezone", f"`timezone`: {error}", "use an IANA name, e.g. Europe/Berlin")
    if len(sub.errors) > errors_before or max_events is None:
        return None
    return Digest(max_events, include, send_empty, timezone)


def _include(section: Section) -> tuple[str, ...] | None:
    value = section.data.get("include")
    if not isinstance(value, YamlList) or not value:
        section.error(
            "include",
            f"`include` must be a list of event fields, got {describe(value)}",
            "e.g. include: [id, timestamp, sim.iccid, endpoint.name]",
        )
        return None
    paths: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, str) and DOTTED_PATH.fullmatch(item):
            paths.append(item)
        else:
            section.error_at(
                Location(section.file, value.line_of(index)),
                f"`include` items must be dotted paths into the event, got {describe(item)}",
                "e.g. sim.iccid",
            )
    return tuple(paths) if len(paths) == len(value) else None


def _check_digest_rule(section: Section, actions: tuple[ActionStep, ...] | None) -> None:
    for key in _NOT_WITH_DIGEST:
        if key in section.data:
            section.error(
                key,
                f"`{key}` cannot be combined with `digest`",
                "a digest acts once per schedule, not per event; use a separate rule",
            )
    for step in actions or ():
        if step.after is not None:
            section.error_at(
                step.where,
                "a digest rule cannot have follow-up actions (`after:`)",
                "digest actions run at the scheduled time",
            )
        elif step.action.needs is not None:
            section.error_at(
                step.where,
                f"`{step.kind}` needs one event's {step.action.needs}, but a digest acts on a "
                "list of events",
                "use `webhook` or `log` in a digest rule",
            )
