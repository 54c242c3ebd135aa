"""Templates render exactly as Jinja renders them, whether through the direct field lookup
that templates of plain field references get, or through Jinja itself."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError

from engine.errors import ActionError, ConfigError, Location
from engine.templates import _ENVIRONMENTS, TemplateValue, _Compiled, _field_parts

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
