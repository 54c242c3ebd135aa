"""The lenient reading of JSON that orjson refuses (engine.jsontext)."""

import math

import orjson
import pytest

from engine.jsontext import lenient_json, loads_json


def test_what_orjson_refuses_is_read_and_made_writable_again():
    text = b'[{"big": 1e400, "lone": "a\\ud800b", "pair": "\\ud83d\\ude00", "\\udfff": 1}]'
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)
    (value,) = lenient_json(text)
    assert math.isinf(value["big"])
    assert value["lone"] == "a\ufffdb" and value["pair"] == "\U0001f600"
    assert value["\ufffd"] == 1  # keys too
    orjson.dumps(value)  # nothing left that cannot be written back


@pytest.mark.parametrize("text", [b'[{"id": 1,', b"[" * 100_000, b"\xff\xfe[", b""])
def test_what_no_parser_reads_is_a_value_error(text):
    with pytest.raises(ValueError):
        lenient_json(text)


def test_loads_json_reads_leniently_only_where_orjson_refuses():
    assert loads_json(b'{"a": 1}') == {"a": 1}
    assert math.isinf(loads_json(b"[1e400]")[0])
    with pytest.raises(orjson.JSONDecodeError, match="line 1"):  # orjson's own message
        loads_json(b'[{"id": 1,')
