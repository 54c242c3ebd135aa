"""Action kinds, found by themselves: every public module of this package is imported and
each `Action` subclass defined in it with a `kind` is registered. Adding a kind is adding
its module (see docs/adding-an-action.md); `ACTIONS` is the one way to read the registry."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType, ModuleType

from engine.actions.base import (
    Action,
    ActionContext,
    ActionParams,
    Lane,
    NoParams,
    Parameter,
    PlannedAction,
    Target,
)

_KINDS: dict[str, type[Action]] = {}
# Every action kind by name, read-only.
ACTIONS: Mapping[str, type[Action]] = MappingProxyType(_KINDS)

_KIND_NAME = re.compile(r"[a-z][a-z0-9_]*")


def kinds_in(module: ModuleType) -> list[type[Action]]:
    """The action kinds `module` defines (not those it imports)."""
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Action)
        and value.__module__ == module.__name__
        and "kind" in vars(value)
    ]


def register(action: type[Action]) -> type[Action]:
    """Add one kind; TypeError when it breaks the contract in `engine.actions.base`."""
    kind = getattr(action, "kind", None)
    if not isinstance(kind, str) or not _KIND_NAME.fullmatch(kind):
        raise TypeError(f"{action.__qualname__}: `kind` must be a snake_case name, got {kind!r}")
    known = _KINDS.get(kind)
    if known is not None and known is not action:
        raise TypeError(
            f"action kind {kind!r} is defined twice: {known.__module__}.{known.__qualname__}"
            f" and {action.__module__}.{action.__qualname__}"
        )
    if inspect.isabstract(action):
        raise TypeError(f"action kind {kind!r} leaves methods unimplemented: `run`?")
    if not getattr(action, "summary", ""):
        raise TypeError(f"action kind {kind!r} has no `summary` for the docs")
    if not issubclass(action.params_type, ActionParams):
        raise TypeError(f"action kind {kind!r}: `params_type` must subclass ActionParams")
    if action.needs not in (None, "sim", "endpoint"):
        raise TypeError(f"action kind {kind!r}: `needs` must be None, 'sim' or 'endpoint'")
    _KINDS[kind] = action
    return action


@contextmanager
def registered(module: ModuleType) -> Iterator[list[type[Action]]]:
    """The kinds `module` defines, registered while the block runs (for tests)."""
    added: list[type[Action]] = []
    try:
        for action in kinds_in(module):
            if _KINDS.get(action.kind) is not action:
                added.append(register(action))
        yield added
    finally:
        for action in added:
            _KINDS.pop(action.kind, None)


def _discover() -> None:
    for found in pkgutil.iter_modules(__path__, f"{__name__}."):
        if found.name.rpartition(".")[2].startswith("_"):
            continue
        for action in kinds_in(importlib.import_module(found.name)):
            register(action)


def calling_out() -> tuple[str, ...]:
    """The kinds that call receivers outside emnify, sorted."""
    return tuple(sorted(kind for kind, action in _KINDS.items() if action.calls_out))


_discover()

__all__ = [
    "ACTIONS",
    "Action",
    "ActionContext",
    "ActionParams",
    "Lane",
    "NoParams",
    "Parameter",
    "PlannedAction",
    "Target",
    "calling_out",
    "kinds_in",
    "register",
    "registered",
]


def lane_of(kind: str, target: Mapping[str, object]) -> str | None:
    """The lane an intent's action says runs it after the earlier ones on it: its SIM's
    (`sim:ID`), its endpoint's (`endpoint:ID`), or None when it runs on its own. The store
    keeps it with the intent, so every instance of a cluster keeps the same order."""
    action = ACTIONS.get(kind)
    lane = action.lane if action is not None else Lane.OWN
    if lane is Lane.SIM and target.get("sim_id") is not None:
        return f"sim:{target['sim_id']}"
    if lane in (Lane.SIM, Lane.ENDPOINT) and target.get("endpoint_id") is not None:
        return f"endpoint:{target['endpoint_id']}"
    return None
