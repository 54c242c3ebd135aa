"""JSON from outside that orjson refuses, read as far as the standard library can.

orjson, the engine's parser, refuses some text the JSON grammar allows: numbers beyond a
double (`1e400`) and escapes of lone UTF-16 surrogates (`"\\ud800"`). A page of the Event API
holding one would otherwise be refused at every poll, and the cursor could never move past
it. The standard library reads both (the number as infinity); lone surrogates become U+FFFD,
since neither orjson nor SQLite can write them back out. Only a refused text takes this
slower path.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads_json(data: bytes) -> Any:
    """The value of `data`, read by orjson or, where orjson refuses it, leniently; raises
    orjson's own `JSONDecodeError` (a ValueError) when neither can read it."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as refused:
        try:
            return lenient_json(data)
        except ValueError:
            raise refused from None


def lenient_json(data: bytes | str) -> Any:
    """The value of `data`; ValueError when even the standard library cannot read it."""
    try:
        return _without_lone_surrogates(json.loads(data))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        # A pair of surrogates was joined into one character by json; what is left alone
        # cannot be encoded, and "replace" turns it into U+FFFD.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {
            _without_lone_surrogates(key): _without_lone_surrogates(item)
            for key, item in value.items()
        }
    return value
