"""One rule mapping from a rule file → a `Rule`, or the list of what is wrong with it."""

from __future__ import annotations

import re

from engine.errors import ConfigError, Location
from engine.rules.catalog import EventTypeCatalog
from engine.rules.condition import Condition, read_condition
from engine.rules.fields import Section, describe
from engine.rules.model import MODES, MaxActions, Mode, Rule, Threshold, Throttle
from engine.rules.steps import parse_steps
from engine.rules.when import When, parse_when
from engine.rules.yaml_lines import YamlMapping, plain

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
)
RULE_ID = re.compile(r"[A-Za-z0-9_.-]+")


def rule_id(data: YamlMapping) -> str | None:
    """The rule's id when it is a valid one (used to spot duplicates even in broken rules)."""
    value = data.get("id")
    return value if isinstance(value, str) and RULE_ID.fullmatch(value) else None


def parse_rule(
    data: object, where: Location, number: int, catalog: EventTypeCatalog
) -> Rule | list[ConfigError]:
    """Validate one rule; `number` counts rules in the file from 1, for messages about rules
    without a usable id."""
    errors: list[ConfigError] = []
    if not isinstance(data, YamlMapping):
        message = f"rule #{number} must be a mapping with `id`, `when`, `actions`, ..."
        return [ConfigError(f"{message}, got {describe(data)}", where)]
    ident = rule_id(data)
    label = f"rule `{ident}`" if ident else f"rule #{number}"
    section = Section(data, where.file, label, errors)
    section.check_keys(RULE_KEYS)
    _check_id(section)

    description = section.text("description", default="") or ""
    enabled = section.flag("enabled", default=True)
    mode = _mode(section)
    when = _when(section, catalog)
    condition: Condition | None = None
    if data.get("condition") is not None:
        condition = read_condition(section, "condition")
    actions = None
    if section.require("actions", "e.g. actions: [{suspend_sim: {}}]"):
        actions = parse_steps(section, "actions", catalog)
    on_guard_trip = None
    if "on_guard_trip" in data:
        on_guard_trip = parse_steps(section, "on_guard_trip", catalog)
    threshold = _threshold(section) if "threshold" in data else None
    throttle = _throttle(section) if "throttle" in data else None
    max_actions = _max_actions(section) if "max_actions" in data else None
    schedule = _schedule(section) if "schedule" in data else None
    digest = None
    if "digest" in data:
        digest_section = section.sub("digest", "digest")
        digest = plain(digest_section.data) if digest_section is not None else None

    if errors or ident is None or actions is None:
        return errors
    return Rule(
        id=ident,
        description=description,
        enabled=enabled,
        mode=mode,
        when=when,
        condition=condition,
        condition_source=condition.source if condition is not None else None,
        actions=actions,
        where=where,
        threshold=threshold,
        throttle=throttle,
        schedule=schedule,
        digest=digest,
        max_actions=max_actions,
        on_guard_trip=on_guard_trip or (),
    )


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
    per = sub.dotted_path("per")
    return Threshold(count, within, per) if count and within else None


def _throttle(section: Section) -> Throttle | None:
    sub = section.sub("throttle", "throttle")
    if sub is None:
        return None
    sub.check_keys(("for", "per"))
    period = sub.duration("for") if sub.require("for", "e.g. for: 1h") else None
    per = sub.dotted_path("per")
    return Throttle(period, per) if period else None


def _max_actions(section: Section) -> MaxActions | None:
    sub = section.sub("max_actions", "max_actions")
    if sub is None:
        return None
    sub.check_keys(("count", "within"))
    count = sub.count("count") if sub.require("count", "e.g. count: 100") else None
    within = sub.duration("within") if sub.require("within", "e.g. within: 1h") else None
    return MaxActions(count, within) if count and within else None


def _schedule(section: Section) -> str | None:
    value = section.data.get("schedule")
    if isinstance(value, str) and value.strip():
        return value.strip()
    section.error(
        "schedule",
        f"`schedule` must be a cron expression, got {describe(value)}",
        'e.g. "0 8 * * *"',
    )
    return None
