"""Where events come from: the sources a daemon runs, found by name.

Every module of this package is imported the first time the registry is asked for, and a
`Source` subclass registers itself by its class line (`engine.sources.base`): adding a
source is adding a module here, with no list to keep. A source defined elsewhere (a test's,
a plugin's) is registered once its module is imported. `replay` lives here too but is a
command, not a daemon source: it registers nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from typing import Any

from engine.sources.base import Source, SourceContext, SourceError, registry

_discovered = False


def registered() -> Mapping[str, type[Source[Any]]]:
    """Every known source by name: this package's modules, then whatever else registered."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return registry()


def check(names: Sequence[str], settings: Mapping[str, object]) -> None:
    """What the listed sources need before anything starts (their secrets): `ConfigError`."""
    for name in names:
        registered()[name].check(_settings_of(name, settings))


def build(
    names: Sequence[str], settings: Mapping[str, object], context: SourceContext
) -> list[Source[Any]]:
    """The listed sources, built over `context` in the order listed (none started)."""
    kinds = registered()
    return [kinds[name](_settings_of(name, settings), context) for name in names]


def _settings_of(name: str, settings: Mapping[str, object]) -> object:
    if name not in registered():
        raise SourceError(f"no source is named {name!r}")
    if name not in settings:
        raise SourceError(f"the {name} source has no settings: the config did not read them")
    return settings[name]
