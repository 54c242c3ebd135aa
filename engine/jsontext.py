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
import re
from typing import Any, NamedTuple

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


class Unreadable(NamedTuple):
    """One record of a JSON array that could not be read on its own (nested deeper than any
    parser here goes), in place of its value: the pipeline quarantines it, and the records
    around it are read as usual."""

    text: str
    reason: str

    def __str__(self) -> str:
        return self.text


# A JSON string (with its escapes) or one bracket: what finding an item's end needs to see.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_TEXT_SHOWN = 64 * 1024
_SEPARATORS = ", \t\r\n"


def loads_records(data: bytes) -> Any:
    """Like `loads_json`, for a body of event records: when the whole cannot be read only
    because some record in it is nested too deeply, each record is read on its own and
    the unreadable ones come back as `Unreadable`, so one such record cannot make a whole
    delivery or page unreadable (and be refused again at every retry)."""
    try:
        return loads_json(data)
    except orjson.JSONDecodeError as error:
        if "depth" not in str(error):
            raise
        items = _split_items(data)
        if items is None:
            raise
        try:
            return [_item(text) for text in items]
        except orjson.JSONDecodeError:
            raise error from None  # not valid JSON after all: say where in the whole


def _item(text: bytes) -> Any:
    try:
        return loads_json(text)
    except orjson.JSONDecodeError as error:
        if "depth" not in str(error):
            raise
        shown = text[:_TEXT_SHOWN].decode("utf-8", "replace")
        return Unreadable(shown, "nested too deeply to read as JSON")


def _split_items(data: bytes) -> list[bytes] | None:
    """The texts of the items of a top-level JSON array, or of one object (as a list of
    one); None when `data` is neither or its structure does not add up. Objects and arrays
    are delimited, not read; the scalars between them are."""
    body = data.strip()
    if body[:1] == b"{":
        return [body]
    if body[:1] != b"[" or body[-1:] != b"]":
        return None
    items: list[bytes] = []
    depth = 0
    item_start = gap_start = 1
    for token in _TOKEN.finditer(body, 1, len(body) - 1):
        bracket = token.group()
        if bracket in (b"[", b"{"):
            if depth == 0:
                item_start = token.start()
                if not _scalars(body[gap_start:item_start], items):
                    return None
            depth += 1
        elif bracket in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                items.append(body[item_start : token.end()])
                gap_start = token.end()
            elif depth < 0:
                return None
    if depth != 0 or not _scalars(body[gap_start : len(body) - 1], items):
        return None
    return items


_DECODER = json.JSONDecoder()


def _scalars(gap: bytes, items: list[bytes]) -> bool:
    """Add the texts of the scalars (`null`, numbers, strings) between two separators of a
    top-level array to `items`; False when the gap is not such a list."""
    text = gap.decode("utf-8", "surrogateescape")
    position = 0
    while True:
        while position < len(text) and text[position] in _SEPARATORS:
            position += 1
        if position == len(text):
            return True
        try:
            _, end = _DECODER.raw_decode(text, position)
        except ValueError:
            return False
        items.append(text[position:end].encode("utf-8", "surrogateescape"))
        position = end
