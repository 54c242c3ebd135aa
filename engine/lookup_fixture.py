"""Lookups from a file, for `replay` and `event-engine test`: rules that look facts up stay
testable offline, on facts the file fixes.

The file maps endpoint ids to the facts a rule may look up (`engine.lookups.LOOKUP_NAMES`),
each the value the API call would give (see `engine.lookup_fetch` for the shapes), or
`{unavailable: "why"}` to play a failed call:

```yaml
501:
  stats.month: {data: {volume: 812.5}, sms: {volume: 3}}
  quota.data: {volume: 20, status: {id: 1}}
  connectivity: {status: {description: ONLINE}}
502:
  connectivity: {unavailable: "HTTP 429 from the API"}
```

A fact the file does not give for an endpoint is unavailable too ("not in the lookup
file"), so a rule's `on_lookup_error` can be tested as well.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigError, Location
from engine.lookups import LOOKUP_NAMES, Fact, LookupTable
from engine.section import describe, did_you_mean
from engine.yamlfile import YamlMapping, load_yaml, plain, read_yaml_file


def load_lookup_fixture(path: Path) -> LookupTable:
    """The facts of a lookup file; ConfigError naming `file:line` for what is wrong."""
    name = str(path)
    data, _duplicates = load_yaml(read_yaml_file(path), name)
    if not isinstance(data, YamlMapping):
        raise ConfigError(
            f"a lookup file maps endpoint ids to facts, got {describe(data)}",
            Location(name, 1),
            "e.g. `501: {stats.month: {data: {volume: 812}}}`",
        )
    table: dict[int, dict[str, Fact]] = {}
    for key, facts in data.items():
        where = Location(name, data.line_of(key))
        endpoint = _endpoint_id(key, where)
        if not isinstance(facts, YamlMapping):
            raise ConfigError(f"endpoint {endpoint}: facts must be a mapping", where)
        table[endpoint] = {}
        for fact_name, value in facts.items():
            at = Location(name, facts.line_of(fact_name))
            if fact_name not in LOOKUP_NAMES:
                hint = did_you_mean(fact_name, LOOKUP_NAMES) or "known: " + ", ".join(LOOKUP_NAMES)
                raise ConfigError(f"endpoint {endpoint}: unknown lookup {fact_name!r}", at, hint)
            table[endpoint][fact_name] = _fact(value)
    return table


def _endpoint_id(key: object, where: Location) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    raise ConfigError(f"an endpoint id must be a number, got {describe(key)}", where)


def _fact(value: object) -> Fact:
    if isinstance(value, YamlMapping) and set(value) == {"unavailable"}:
        return Fact(error=str(value["unavailable"]))
    return Fact(plain(value))
