"""Templates render exactly as Jinja renders them, whether through the direct field lookup
that templates of plain field references get, or through Jinja itself."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError

from engine.errors import ActionError, ConfigError, Location
from engine.templates import _ENVIRONMENTS, TemplateValue, _Compiled, _field_parts, _reason

NOWHERE = Location("rules.yaml", 3)

TEMPLATES = [
    "SIM {{ event.sim.iccid }} ({{ event.endpoint.name }}): {{ event.description }}",
    "{{ event.id }}",
    "{{ event['endpoint'].name }}-{{ event.endpoint['tags'] }}",
    "{{ event.detail.quota.volume }} MB left\n",
    "{{ event.detail }}",
    "{{ event.missing }}",
    "{{ event.sim.missing.deeper }}",
    "{{ event.items }}",  # the dict's method in Jinja, not the key
    "{{ event.values }}",
    "{{ rule.id }}: {{ rule.description }}",
    "{{ event.description | upper }}",  # a filter: Jinja renders it
    "{% if event.alert %}ALERT {% endif %}{{ event.id }}",
    "${NOT_A_SECRET} {{ event.description }}",
    "{{ event.secret_ref }}",
]

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**16), 10**16),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["${OPS_WEBHOOK_URL}", "vip,fleet", ""]),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["name", "iccid", "quota", "volume", "x"]), inner, max_size=3
        )
    ),
    max_leaves=8,
)
_EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(0, 10**15),
        "description": _SCALARS,
        "alert": st.booleans(),
        "sim": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"iccid": _SCALARS})),
        "endpoint": _JSON,
        "detail": _JSON,
        "items": _SCALARS,
        "values": _SCALARS,
        "secret_ref": _SCALARS,
    },
)


def _jinja(env: str, text: str, context: dict[str, Any]) -> tuple[str, str]:
    try:
        return "ok", _ENVIRONMENTS[env].from_string(text).render(context)
    except TemplateError as error:
        return "error", str(error)
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        return "error", f"{type(error).__name__}: {error}"


def _ours(env: str, text: str, context: dict[str, Any]) -> tuple[str, str]:
    try:
        return "ok", _Compiled(text, env).render(context)
    except TemplateError as error:
        return "error", str(error)
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        return "error", f"{type(error).__name__}: {error}"


@settings(max_examples=200, deadline=None)
@given(
    text=st.sampled_from(TEMPLATES),
    event=_EVENTS,
    env=st.sampled_from(sorted(_ENVIRONMENTS)),
)
def test_renders_as_jinja_renders_for_any_event(text: str, event: dict[str, Any], env: str) -> None:
    context = {"event": event, "rule": {"id": "r-1", "description": "a rule"}}
    assert _ours(env, text, context) == _jinja(env, text, context)


def test_plain_field_references_skip_jinja_and_the_rest_use_it() -> None:
    assert _field_parts("plain", "SIM {{ event.sim.iccid }}!") == (
        "SIM ",
        ("event", "sim", "iccid"),
        "!",
    )
    assert _field_parts("plain", "{{ event['sim'].iccid }}") == (("event", "sim", "iccid"),)
    assert _field_parts("plain", "{{ event.items }}") is None
    assert _field_parts("plain", "{{ event.id | string }}") is None
    assert _field_parts("plain", "{% if event.alert %}x{% endif %}") is None


def test_a_missing_field_fails_the_action_with_jinjas_message() -> None:
    value = TemplateValue({"text": "SIM {{ event.sim.iccid }}"}, NOWHERE, "webhook.body")
    with pytest.raises(ActionError, match="'dict object' has no attribute 'sim'"):
        value.render({"event": {}, "rule": {}})


def test_syntax_errors_and_unknown_filters_are_load_errors() -> None:
    with pytest.raises(ConfigError, match="template syntax error"):
        TemplateValue("{{ event.id ", NOWHERE, "log.message")
    with pytest.raises(ConfigError, match="No filter named 'nosuchfilter'"):
        TemplateValue("{{ event.id | nosuchfilter }}", NOWHERE, "log.message")


def test_event_text_cannot_become_a_secret_reference_in_secret_fields() -> None:
    value = TemplateValue(
        "https://x/{{ event.description }}", NOWHERE, "webhook.url", secret_refs=True
    )
    assert value.render({"event": {"description": "${TOKEN}"}}) == "https://x/%24{TOKEN}"


SYNTAX_HINT = "(templates use Jinja2 syntax, e.g. {{ event.sim.iccid }})"
UNCLOSED = "template syntax error: unexpected end of template, expected 'end of print statement'."


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("{{ event.id ", "webhook.body"),
        ({"text": "{{ event.id "}, "webhook.body.text"),
        ({"{{ event.id ": "x"}, "webhook.body"),  # a key is a template too
        (["ok", "{{ event.id "], "webhook.body[1]"),
    ],
)
def test_a_syntax_error_names_file_line_and_the_field_within_the_parameter(
    value: Any, field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        TemplateValue(value, NOWHERE, "webhook.body")
    assert str(caught.value) == f"rules.yaml:3: `{field}`: {UNCLOSED} {SYNTAX_HINT}"


def test_a_template_python_cannot_compile_is_a_load_error_saying_why() -> None:
    deep = "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"
    with pytest.raises(ConfigError) as caught:
        TemplateValue(["ok", deep], NOWHERE, "webhook.body")
    assert str(caught.value).startswith(
        "rules.yaml:3: `webhook.body[1]`: the template cannot be compiled: RecursionError: "
    )


@pytest.mark.parametrize("head", ["{{ event.id }}", "{{ event.id | string }}"])
def test_a_template_may_be_32_kib_long_and_no_longer(head: str) -> None:
    text = head.ljust(32 << 10, ".")
    assert TemplateValue(text, NOWHERE, "log.message").render({"event": {"id": 7}}) == (
        "7" + text[len(head) :]
    )
    with pytest.raises(ConfigError) as caught:
        TemplateValue({"text": text + "."}, NOWHERE, "webhook.body")
    assert str(caught.value) == (
        "rules.yaml:3: `webhook.body.text`: a template of 32,769 characters, more than 32,768 "
        "(shorten it: a loop over the data writes long texts from a short template)"
    )


def test_keys_items_and_values_of_a_parameter_structure_are_rendered_in_place() -> None:
    value = TemplateValue(
        {"{{ event.kind }}": ["{{ event.id }}", 3, None, {"n": "{{ event.id + 1 }}"}], "x": "y"},
        NOWHERE,
        "webhook.body",
    )
    assert value.render({"event": {"kind": "quota", "id": 7}}) == {
        "quota": ["7", 3, None, {"n": "8"}],
        "x": "y",
    }


def _url(text: str, event: dict[str, Any]) -> Any:
    value = TemplateValue(text, NOWHERE, "webhook.url", secret_refs=True, url_parts=True)
    return value.render({"event": event})


@pytest.mark.parametrize(
    ("written", "sent"),
    [
        ("a/b?c#d@e:f%g h", "a%2Fb%3Fc%23d%40e%3Af%25g%20h"),
        ("x\r\nHost: evil", "x%0D%0AHost%3A%20evil"),
        ("${TOKEN}", "%24%7BTOKEN%7D"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("a.b", "a.b"),
        ("X.X", "X.X"),  # dots among other characters are no step up the path
        ("\ud800", "%3F"),  # a lone surrogate cannot be encoded: a `?`, encoded
        (None, ""),
        (12, "12"),
    ],
)
def test_event_values_in_a_webhook_url_stay_inside_the_part_they_land_in(
    written: Any, sent: str
) -> None:
    assert _url("https://h.example/x/{{ event.v }}?q={{ event.v }}", {"v": written}) == (
        f"https://h.example/x/{sent}?q={sent}"
    )
    # and the same through Jinja itself
    assert _url(
        "https://h.example/x/{{ event.v | string if false else event.v }}", {"v": written}
    ) == (f"https://h.example/x/{sent}")


@pytest.mark.parametrize("env", ["secret_refs", "plain"])
def test_a_null_field_writes_nothing_where_secrets_may_be_written_and_none_elsewhere(
    env: str,
) -> None:
    value = TemplateValue(
        "x{{ event.note }}y", NOWHERE, "webhook.headers", secret_refs=env == "secret_refs"
    )
    assert value.render({"event": {"note": None}}) == ("xy" if env == "secret_refs" else "xNoney")


@pytest.mark.parametrize(
    "value",
    [
        {"{{ event.kind }}": "x"},  # a key alone
        ["{{ event.kind }}"],
        ("plain", "{{ event.kind }}"),
    ],
)
def test_a_template_anywhere_in_a_parameter_structure_is_rendered(value: Any) -> None:
    rendered = TemplateValue(value, NOWHERE, "webhook.body").render({"event": {"kind": "quota"}})
    assert "quota" in (list(rendered) if isinstance(rendered, dict) else rendered)
    assert "{{ event.kind }}" not in str(rendered)


def test_constants_folded_while_compiling_share_one_budget() -> None:
    # Each folded filter is within its bounds; together they pass the compile's work bound,
    # so the rest are left to the render, which passes its own.
    text = "{{ " + " + ".join(["('a' | center(1000000) | length)"] * 40) + " }}"
    with pytest.raises(ActionError, match=r"^template error: the template makes more than 16,"):
        TemplateValue(text, NOWHERE, "log.message").render({"event": {}})


@pytest.mark.parametrize(("name", "shown"), [(267, 300), (268, 300)])
def test_a_render_failure_is_told_in_at_most_300_characters(name: int, shown: int) -> None:
    # Jinja's message: 'dict object' has no attribute '<name>'
    message = f"'dict object' has no attribute '{'n' * name}'"
    with pytest.raises(ActionError) as caught:
        TemplateValue(f"{{{{ event.{'n' * name} | string }}}}", NOWHERE, "log.message").render(
            {"event": {}}
        )
    told = str(caught.value).removeprefix("template error: ")
    assert told == (message if len(message) <= 300 else message[:shown] + "...")


def test_a_failure_without_a_message_is_named_by_its_kind() -> None:
    assert _reason(ValueError()) == "ValueError"
    assert _reason(ValueError("bad")) == "ValueError: bad"


LOOP = "{% for i in range(60000) %}{% endfor %}"  # 60,000 of the 100,000 steps of a render


@pytest.mark.parametrize(
    "value",
    [
        {"a": LOOP, "b": LOOP},
        [LOOP, LOOP],
        {LOOP + "a": "x", LOOP + "b": "y"},
    ],
)
def test_the_templates_of_one_parameter_share_one_budget(value: Any) -> None:
    with pytest.raises(ActionError, match=r"^template error: the template takes more than 100,000"):
        TemplateValue(value, NOWHERE, "webhook.body").render({"event": {}})
    assert TemplateValue(LOOP, NOWHERE, "webhook.body").render({"event": {}}) == ""  # one alone


@pytest.mark.parametrize(
    ("text", "event", "rendered"),
    [
        ("{{ event }}", {"id": 7}, "{'id': 7}"),
        ("{{ rule }}", {}, "{'id': 'r-1'}"),
        ("{{ event.pair }}", {"pair": (1, 2)}, "(1, 2)"),  # not JSON data: Jinja renders it
    ],
)
def test_a_whole_name_or_a_value_that_is_not_json_renders_as_jinja_renders_it(
    text: str, event: dict[str, Any], rendered: str
) -> None:
    context = {"event": event, "rule": {"id": "r-1"}}
    assert TemplateValue(text, NOWHERE, "log.message").render(context) == rendered
    assert _jinja("plain", text, context) == ("ok", rendered)
