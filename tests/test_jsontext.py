"""The lenient reading of JSON that orjson refuses (engine.jsontext)."""

import math

import orjson
import pytest

from engine.jsontext import Unreadable, lenient_json, loads_json, loads_records


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


def test_json_nested_past_what_python_reads_says_so() -> None:
    with pytest.raises(ValueError, match=r"^JSON nested too deeply$"):
        lenient_json(b"[" * 100_000 + b"]" * 100_000)


# -- records: one nested too deeply to read is kept as its text ----------------------------------

DEEP = b'{"id": 2, "detail": ' + b"[" * 3000 + b"]" * 3000 + b"}"


def test_a_record_nested_too_deeply_is_kept_as_its_text_with_the_reason() -> None:
    records = loads_records(b'[{"id": 1}, ' + DEEP + b"]")
    assert records == [{"id": 1}, Unreadable(DEEP.decode(), "nested too deeply to read as JSON")]


def test_the_text_kept_of_a_deep_record_is_cut_at_64_kib_even_inside_a_character() -> None:
    deep = b'{"note": "x' + "é".encode() * 40_000 + b'", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    (record,) = loads_records(b"[" + deep + b"]")
    assert isinstance(record, Unreadable)
    cut = 64 * 1024
    assert record.text == deep[: cut - 1].decode() + "\ufffd"  # half of an `é` at the cut


@pytest.mark.parametrize(
    "body",
    [
        b"[" + DEEP + b", nul]",  # not JSON between the records
        b"[" + DEEP + b", 1",  # cut short
        b"[" + DEEP + b"]]",  # one bracket too many
    ],
)
def test_a_body_that_is_not_an_array_of_records_after_all_is_refused_whole(body: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError, match="depth"):
        loads_records(body)
