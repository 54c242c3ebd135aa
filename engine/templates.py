"""Templated action parameters: Jinja2 in a sandbox, compiled once when the rules load.

A parameter value may be any JSON-shaped structure; every string in it that contains `{{` or
`{%` is a template. Templates see the raw event as `event` and the rule as `rule`, and an
undefined name is an error (StrictUndefined) rather than an empty string, so a typo in a
rule fails that action with a reason instead of sending a half-empty message.

A template costs a bounded amount: its text is at most `MAX_TEMPLATE_CHARS`, its render
runs on a budget of steps and work, and what one parameter structure renders to is at
most `MAX_OUTPUT` characters (`engine.template_sandbox`). Whatever goes wrong while
rendering, including a bound passed, fails that action with `template error: ...`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, nodes

from engine.errors import ActionError, ConfigError, Location
from engine.template_sandbox import (
    BoundedEnvironment,
    Budget,
    active_budget,
    spending,
)

MAX_TEMPLATE_CHARS = 32 << 10
# Compiled templates are cached by their text for rules that repeat one; a long text is
# compiled for its own rule only, so reloads of edited long templates cannot pile up.
_CACHED_TEXT_CHARS = 4096

_env = BoundedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def _defuse_secret_refs(value: Any) -> Any:
    # Text that came from an event must never turn into a `${NAME}` secret reference.
    text = str(value) if value is not None else ""
    return text.replace("${", "%24{")


# For fields where the rule author may write `${NAME}` secrets (webhook url and headers).
_secret_env = BoundedEnvironment(
    undefined=StrictUndefined, autoescape=False, field_finalize=_defuse_secret_refs
)


def _encode_url_part(value: Any) -> str:
    # Text from an event that lands in a URL's path or query must stay inside the part it
    # lands in: every character that could end that part or lead elsewhere (`/ ? # @ : %`,
    # spaces, CR/LF, `${`) is percent-encoded, and so is a value made only of dots, which
    # would otherwise be read as a step up the path (`..`).
    text = str(value) if value is not None else ""
    encoded = quote(text, safe="", errors="replace")  # a lone surrogate becomes `%3F`
    return encoded.replace(".", "%2E") if text and not text.strip(".") else encoded


# For URLs whose scheme, host and port the rule writes literally (webhook url).
_url_env = BoundedEnvironment(
    undefined=StrictUndefined, autoescape=False, field_finalize=_encode_url_part
)


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


class TemplateValue:
    """A parameter structure with its templates compiled; `render` fills them in."""

    __slots__ = ("_compiled", "_jinja", "_static")

    def __init__(
        self,
        value: Any,
        where: Location,
        field: str,
        *,
        secret_refs: bool = False,
        url_parts: bool = False,
    ):
        """`secret_refs`: the rule may write `${NAME}` secrets here, and values from the
        event are kept from forming one. `url_parts`: as well, every value rendered in is
        percent-encoded for a URL path or query."""
        self._static = not _contains_template(value)
        env = "url_parts" if url_parts else "secret_refs" if secret_refs else "plain"
        self._compiled = value if self._static else _compile(value, where, field, env)
        self._jinja = _uses_jinja(self._compiled)

    def render(self, context: Mapping[str, Any]) -> Any:
        if self._static:
            return self._compiled
        budget = Budget()
        try:
            if not self._jinja:  # field references only: no budget to share with Jinja
                return _render(self._compiled, context, budget)
            with spending(budget):
                return _render(self._compiled, context, budget)
        except Exception as error:  # whatever a template does wrong fails this action only
            raise ActionError(f"template error: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    if isinstance(error, TemplateError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


# A template made only of text and field references (`{{ event.sim.iccid }}`,
# `{{ event["endpoint"].name }}`) is rendered by looking the fields up directly: Jinja's
# render costs an order of magnitude more for such a template (a fresh context, an attribute
# lookup that fails before the item lookup). Whenever a lookup meets anything
# but a plain dict holding the key, or a value that is not plain JSON data, Jinja renders
# instead, so results and errors stay exactly Jinja's.
_Part = str | tuple[str, ...]
_PLAIN_VALUES = (str, int, float, bool, type(None), dict, list)
# `{{ event.items }}` is the dict's method in Jinja, not the key: leave such names to it.
_DICT_ATTRIBUTES = frozenset(dir(dict))
_ENVIRONMENTS = {"plain": _env, "secret_refs": _secret_env, "url_parts": _url_env}


class _Compiled:
    __slots__ = ("_env_name", "_finalize", "_parts", "_template", "_text")

    def __init__(self, text: str, env_name: str):
        self._text = text
        self._env_name = env_name
        self._finalize = _ENVIRONMENTS[env_name].field_finalize
        self._parts = _field_parts(env_name, text)
        # Compiling is slow next to rendering; a template of field references cannot fail
        # to compile, so it is compiled only if it ever needs Jinja.
        self._template: Template | None = None
        if self._parts is None:
            self._template = _jinja_template(env_name, text)

    def render(self, context: Mapping[str, Any]) -> str:
        parts = self._parts
        if parts is None:
            return self._jinja_render(context)
        out: list[str] = []
        for part in parts:
            if type(part) is str:
                out.append(part)
                continue
            value: Any = context
            for name in part:
                if type(value) is not dict and value is not context:
                    return self._jinja_render(context)
                value = value.get(name, _MISSING)
                if value is _MISSING:
                    return self._jinja_render(context)
            if not isinstance(value, _PLAIN_VALUES):
                return self._jinja_render(context)
            out.append(str(self._finalize(value)) if self._finalize else str(value))
        return "".join(out)

    @property
    def uses_jinja(self) -> bool:
        return self._parts is None

    def _jinja_render(self, context: Mapping[str, Any]) -> str:
        if self._template is None:
            self._template = _jinja_template(self._env_name, self._text)
        if active_budget() is None:  # a field reference that met data Jinja must read
            with spending(Budget()):
                return self._template.render(context)
        return self._template.render(context)


_MISSING = object()


def _jinja_template(env_name: str, text: str) -> Template:
    if len(text) > _CACHED_TEXT_CHARS:
        return _compile_template(env_name, text)
    return _cached_template(env_name, text)


@lru_cache(maxsize=4096)
def _cached_template(env_name: str, text: str) -> Template:
    # Rules repeat their texts (a thousand device rules, one message): compile each once.
    return _compile_template(env_name, text)


def _compile_template(env_name: str, text: str) -> Template:
    # Filters on constants run while compiling: on a budget of their own.
    with spending(Budget()):
        return _ENVIRONMENTS[env_name].from_string(text)


def _field_parts(env_name: str, text: str) -> tuple[_Part, ...] | None:
    """The template as literal texts and field paths, or None if it does more than that.
    Raises TemplateSyntaxError for a template that does not parse."""
    if len(text) > _CACHED_TEXT_CHARS:
        return _parse_field_parts(env_name, text)
    return _cached_field_parts(env_name, text)


@lru_cache(maxsize=4096)
def _cached_field_parts(env_name: str, text: str) -> tuple[_Part, ...] | None:
    return _parse_field_parts(env_name, text)


def _parse_field_parts(env_name: str, text: str) -> tuple[_Part, ...] | None:
    tree = _ENVIRONMENTS[env_name].parse(text)
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    parts: list[_Part] = []
    for node in tree.body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            parts.append(node.data)
            continue
        path = _field_path(node)
        if path is None:
            return None
        parts.append(path)
    return tuple(parts)


def _field_path(node: nodes.Node) -> tuple[str, ...] | None:
    names: list[str] = []
    while True:
        if isinstance(node, nodes.Name):
            names.append(node.name)
            return tuple(reversed(names))
        if isinstance(node, nodes.Getattr) and node.attr not in _DICT_ATTRIBUTES:
            names.append(node.attr)
            node = node.node
        elif (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
        ):
            names.append(node.arg.value)
            node = node.node
        else:
            return None


def _contains_template(value: Any) -> bool:
    if isinstance(value, str):
        return _is_template(value)
    if isinstance(value, Mapping):
        return any(_contains_template(k) or _contains_template(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_contains_template(v) for v in value)
    return False


def _compile(value: Any, where: Location, field: str, env: str) -> Any:
    if isinstance(value, str):
        if not _is_template(value):
            return value
        if len(value) > MAX_TEMPLATE_CHARS:
            raise ConfigError(
                f"`{field}`: a template of {len(value):,} characters, more than "
                f"{MAX_TEMPLATE_CHARS:,}",
                where,
                "shorten it: a loop over the data writes long texts from a short template",
            )
        try:
            return _Compiled(value, env)
        except TemplateSyntaxError as error:
            raise ConfigError(
                f"`{field}`: template syntax error: {error.message}",
                where,
                "templates use Jinja2 syntax, e.g. {{ event.sim.iccid }}",
            ) from None
        except Exception as error:  # e.g. nesting too deep for Python to compile
            raise ConfigError(
                f"`{field}`: the template cannot be compiled: {_reason(error)}", where
            ) from None
    if isinstance(value, Mapping):
        return {
            _compile(k, where, field, env): _compile(v, where, f"{field}.{k}", env)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_compile(v, where, f"{field}[{i}]", env) for i, v in enumerate(value)]
    return value


def _uses_jinja(value: Any) -> bool:
    if isinstance(value, _Compiled):
        return value.uses_jinja
    if isinstance(value, dict):
        return any(_uses_jinja(k) or _uses_jinja(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_uses_jinja(v) for v in value)
    return False


def _render(value: Any, context: Mapping[str, Any], budget: Budget) -> Any:
    if isinstance(value, _Compiled):
        return budget.write(value.render(context))
    if isinstance(value, dict):
        return {_render(k, context, budget): _render(v, context, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context, budget) for v in value]
    return value
