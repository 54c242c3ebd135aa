"""A rule's `actions:` list (and `on_guard_trip:`), checked through the action registry.

Each item is `{kind: params}`, or the delayed follow-up `{after: 24h, do: {kind: params}}`
with an optional `cancel_if`. The action modules own their parameters: this module finds
the kind in `ACTIONS` and lets the class's `from_params` judge the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.actions import ACTIONS, Action
from engine.errors import ConfigError, Location
from engine.rules.catalog import EventTypeCatalog
from engine.rules.condition import read_condition
from engine.rules.model import ActionStep, CancelIf
from engine.rules.when import When, parse_when
from engine.section import Section, describe, did_you_mean
from engine.yamlfile import YamlList, YamlMapping, plain, shown_key

FOLLOW_UP_KEYS = ("after", "do", "cancel_if")
CANCEL_IF_KEYS = ("when", "condition")


def _known_actions() -> str:
    return "known actions: " + ", ".join(f"`{kind}`" for kind in sorted(ACTIONS))


def parse_steps(
    section: Section, key: str, catalog: EventTypeCatalog
) -> tuple[ActionStep, ...] | None:
    """The list under `section[key]` as ActionSteps; None (errors recorded) if any is bad."""
    items = section.data.get(key)
    if not isinstance(items, YamlList):
        section.error(
            key,
            f"`{key}` must be a list of actions, got {describe(items)}",
            "e.g. - suspend_sim: {}",
        )
        return None
    if not items:
        section.error(key, f"`{key}` is empty", "add at least one action, e.g. - log: {}")
        return None
    steps: list[ActionStep] = []
    for index, item in enumerate(items):
        where = Location(section.file, items.line_of(index))
        step = _step(section, item, index, where, catalog)
        if step is not None:
            steps.append(step)
    return tuple(steps) if len(steps) == len(items) else None


def _step(
    section: Section, item: object, index: int, where: Location, catalog: EventTypeCatalog
) -> ActionStep | None:
    if not isinstance(item, YamlMapping):
        section.error_at(
            where,
            f"an action must be a mapping like `suspend_sim: {{}}`, got {describe(item)}",
        )
        return None
    if "after" in item or "do" in item:
        return _follow_up(
            Section(item, section.file, section.label, section.errors, section.warnings),
            index,
            catalog,
        )
    found = _action(section, item, where)
    if found is None:
        return None
    kind, action = found
    return ActionStep(kind, action, index, after=None, cancel_if=None, where=where)


def _action(section: Section, item: YamlMapping, where: Location) -> tuple[str, Action] | None:
    """`{kind: params}` → the registry's action object."""
    if len(item) != 1:
        _not_one_key(section, item, where)
        return None
    kind, params = next(iter(item.items()))
    at_kind = Location(section.file, item.line_of(kind))
    action_class = ACTIONS.get(kind) if isinstance(kind, str) else None
    if action_class is None:
        hint = did_you_mean(kind, list(ACTIONS)) or _known_actions()
        section.error_at(at_kind, f"unknown action `{shown_key(kind)}`", hint)
        return None
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        section.error_at(
            at_kind,
            f"`{kind}` takes a mapping of parameters, got {describe(params)}",
            f"write `{kind}: {{}}` when there is nothing to set",
        )
        return None
    try:
        return kind, action_class.from_params(plain(params), at_kind)
    except ConfigError as error:
        section.error_at(error.where or at_kind, error.message, error.hint)
        return None


def _not_one_key(section: Section, item: YamlMapping, where: Location) -> None:
    if not item:
        section.error_at(where, "an empty action", "write e.g. - suspend_sim: {}")
        return
    kinds = [key for key in item if key in ACTIONS]
    names = ", ".join(f"`{key}`" for key in item)
    if len(kinds) == 1 and item[kinds[0]] is None:
        hint = f"indent the parameters under `{kinds[0]}:`"
    else:
        hint = "write one action per list item"
    section.error_at(
        where, f"an action item takes exactly one key, the action kind; found {names}", hint
    )


def _follow_up(section: Section, index: int, catalog: EventTypeCatalog) -> ActionStep | None:
    item = section.data
    errors_before = len(section.errors)
    for key in item:
        if key in FOLLOW_UP_KEYS:
            continue
        if key in ACTIONS:
            hint = f"put the action under `do:`, e.g. do: {{{key}: {{}}}}"
        else:
            hint = (
                did_you_mean(key, FOLLOW_UP_KEYS) or "a follow-up takes `after`, `do`, `cancel_if`"
            )
        section.error(key, f"unknown key `{shown_key(key)}` in a follow-up action", hint)
    after = section.duration("after") if section.require("after", "e.g. after: 24h") else None
    action = None
    if section.require("do", "e.g. do: {activate_sim: {}}"):
        do = item["do"]
        if isinstance(do, YamlMapping):
            action = _action(section, do, section.at("do"))
        else:
            section.error(
                "do", f"`do` must be one action like {{activate_sim: {{}}}}, got {describe(do)}"
            )
    cancel_if = _cancel_if(section, catalog) if "cancel_if" in item else None
    if len(section.errors) > errors_before or action is None or after is None:
        return None
    kind, built = action
    return ActionStep(kind, built, index, after, cancel_if, section.at())


def _cancel_if(section: Section, catalog: EventTypeCatalog) -> CancelIf | None:
    sub = section.sub("cancel_if", "cancel_if")
    if sub is None:
        return None
    errors_before = len(sub.errors)
    sub.check_keys(CANCEL_IF_KEYS)
    if not any(key in sub.data for key in CANCEL_IF_KEYS):
        if len(sub.errors) == errors_before:  # else the misspelt key says it already
            sub.error(None, "`cancel_if` needs `when`, `condition` or both")
        return None
    when = When()
    if sub.data.get("when") is not None:
        when_section = sub.sub("when", "when")
        if when_section is not None:
            when = parse_when(when_section, catalog)
    condition = None
    if sub.data.get("condition") is not None:
        condition = read_condition(sub, "condition", catalog)
    if len(sub.errors) > errors_before:
        return None
    if condition is None and when == When():
        # Written `cancel_if: {when: }` or `{when: {}}`: an operator who meant "cancel on
        # anything" would not write a follow-up; most likely the filter was lost.
        sub.error(
            None,
            "`cancel_if` has an empty `when` and no `condition`, so any event would cancel "
            "the follow-up: give `when` or `condition` what to wait for",
        )
        return None
    return CancelIf(when, condition, sub.at())
