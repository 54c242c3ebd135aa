"""Templated action parameters: Jinja2 in a sandbox, compiled once when the rules load.

A parameter value may be any JSON-shaped structure; every string in it that contains `{{` or
`{%` is a template. Templates see the raw event as `event` and the rule as `rule`, and an
undefined name is an error (StrictUndefined) rather than an empty string, so a typo in a
rule fails that action with a reason instead of sending a half-empty message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

from engine.errors import ActionError, ConfigError, Location

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def _defuse_secret_refs(value: Any) -> Any:
    # Text that came from an event must never turn into a `${NAME}` secret reference.
    text = str(value) if value is not None else ""
    return text.replace("${", "%24{")


# For fields where the rule author may write `${NAME}` secrets (webhook url and headers).
_secret_env = SandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, finalize=_defuse_secret_refs
)


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


class TemplateValue:
    """A parameter structure with its templates compiled; `render` fills them in."""

    __slots__ = ("_compiled", "_static")

    def __init__(self, value: Any, where: Location, field: str, *, secret_refs: bool = False):
        self._static = not _contains_template(value)
        env = _secret_env if secret_refs else _env
        self._compiled = value if self._static else _compile(value, where, field, env)

    @property
    def is_static(self) -> bool:
        return self._static

    def render(self, context: Mapping[str, Any]) -> Any:
        if self._static:
            return self._compiled
        try:
            return _render(self._compiled, context)
        except TemplateError as error:
            raise ActionError(f"template error: {error}") from None
        except (TypeError, ValueError, AttributeError, KeyError) as error:
            raise ActionError(f"template error: {type(error).__name__}: {error}") from None


class _Compiled:
    __slots__ = ("template",)

    def __init__(self, template: Any):
        self.template = template


def _contains_template(value: Any) -> bool:
    if isinstance(value, str):
        return _is_template(value)
    if isinstance(value, Mapping):
        return any(_contains_template(k) or _contains_template(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_contains_template(v) for v in value)
    return False


def _compile(value: Any, where: Location, field: str, env: SandboxedEnvironment) -> Any:
    if isinstance(value, str):
        if not _is_template(value):
            return value
        try:
            return _Compiled(env.from_string(value))
        except TemplateSyntaxError as error:
            raise ConfigError(
                f"`{field}`: template syntax error: {error.message}",
                where,
                "templates use Jinja2 syntax, e.g. {{ event.sim.iccid }}",
            ) from None
    if isinstance(value, Mapping):
        return {
            _compile(k, where, field, env): _compile(v, where, f"{field}.{k}", env)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_compile(v, where, f"{field}[{i}]", env) for i, v in enumerate(value)]
    return value


def _render(value: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(value, _Compiled):
        return value.template.render(context)
    if isinstance(value, dict):
        return {_render(k, context): _render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context) for v in value]
    return value
