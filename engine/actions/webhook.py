"""`webhook`: call an HTTP endpoint with a templated JSON body.

Every call carries an `Idempotency-Key` header that stays the same across retries and
restarts, so a receiver can drop the duplicates an at-least-once delivery may produce.
Secrets go into `url` and `headers` as `${NAME}` and are filled in only when the call is
made: the outbox, the audit log and the logs see the reference, never the value. A literal
credential in a rule file (an `Authorization` header, a `?token=` in the URL, a password in
the URL) is refused at load time.

Event data never chooses where a call goes: the scheme, host and port come from the rule's
literal text (or a `${NAME}` secret), a template in them is refused at load time unless the
rule opts in with `dynamic_host: true`, every value rendered into the path or query is
percent-encoded, and before the call the rendered URL is checked to lead where the literal
does. A receiver cannot hold the engine either: `timeout` bounds the whole exchange, and of
its answer only the status is used (`engine.outbound` reads no more than a small part).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from engine import secrets
from engine.actions.base import Action, ActionContext, ActionParams, Parameter, require_str
from engine.errors import ActionError, ConfigError, Location
from engine.ports import ReceiverError, Receivers
from engine.templates import TemplateValue

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Header and query-parameter names whose values are credentials: they must be `${NAME}`.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "apikey"}
)
_SECRET_WORDS = ("token", "secret", "password", "passwd", "signature", "api-key", "api_key")
_SECRET_PARAMS = frozenset(
    {"token", "access_token", "auth", "key", "apikey", "api_key", "secret", "sig", "signature"}
)
_TEMPLATE_START = re.compile(r"\{[{%]")  # as `engine.templates` tells a template
_DYNAMIC_HINT = (
    "write the scheme and host literally (https://hooks.example.com/emnify/{{ event.id }}) or"
    " take the whole URL from a secret (${OPS_WEBHOOK_URL}); if the host truly must come from"
    " the event, set `dynamic_host: true` on the action (values are then inserted unencoded)"
)
_SECRET_HINT = (
    "secrets never go into rule files: write ${NAME} and set the environment variable NAME"
    " (or NAME_FILE, a file holding it)"
)


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class WebhookCall(ActionParams):
    """One call as planned: `${NAME}` references unexpanded, templates filled in."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    # The literal start of a templated URL that fixes scheme, host and port; None when
    # the URL has no template or the rule chose `dynamic_host`.
    url_origin: str | None = None
    body: Any = None  # JSON; None: no body


@dataclass(frozen=True)
class Webhook(Action):
    kind = "webhook"
    summary = (
        "calls the URL with an `Idempotency-Key` header that is the same on every retry;"
        " see [Webhooks](#webhooks)"
    )
    parameters = (
        Parameter("url", required=True),
        Parameter("method", "POST"),
        Parameter("headers"),
        Parameter("body", "JSON, templates inside"),
        Parameter("timeout", "10 s, the whole exchange"),
        Parameter("dynamic_host", "false"),
    )
    params_type = WebhookCall
    calls_out = True

    method: str
    url: TemplateValue
    headers: TemplateValue
    body: TemplateValue | None
    timeout: float
    references: tuple[str, ...]  # the `${NAME}`s in the URL and the headers
    url_origin: str | None

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        url = require_str(cls.kind, params, "url", where) or ""
        dynamic_host = params.get("dynamic_host", False)
        if not isinstance(dynamic_host, bool):
            raise ConfigError("`webhook.dynamic_host` must be true or false", where)
        url_origin = _check_url(url, dynamic_host, where)
        method = (require_str(cls.kind, params, "method", where) or "POST").upper()
        if method not in _METHODS:
            raise ConfigError(
                f"`webhook.method` {method!r} is not one of {', '.join(_METHODS)}", where
            )
        headers = params.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) for k, v in headers.items()
        ):
            raise ConfigError("`webhook.headers` must map header names to strings", where)
        timeout = params.get("timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError("`webhook.timeout` must be a positive number of seconds", where)
        if "body" in params and method in ("GET", "DELETE"):
            raise ConfigError(f"`webhook.body` cannot be sent with {method}", where)
        references = tuple(
            name for text in [url, *map(str, headers.values())] for name in secrets.references(text)
        )
        _refuse_literal_secrets(url, {str(k): str(v) for k, v in headers.items()}, where)
        _refuse_routing_headers(headers, dynamic_host, where)
        body = params.get("body")
        return cls(
            method,
            TemplateValue(url, where, "webhook.url", secret_refs=True, url_parts=not dynamic_host),
            TemplateValue(
                {k: str(v) for k, v in headers.items()}, where, "webhook.headers", secret_refs=True
            ),
            TemplateValue(body, where, "webhook.body") if body is not None else None,
            float(timeout),
            references,
            url_origin,
        )

    def secret_names(self) -> tuple[str, ...]:
        return self.references

    def params_for(self, template_context: Mapping[str, Any]) -> WebhookCall:
        return WebhookCall(
            self.method,
            self.url.render(template_context),
            self.headers.render(template_context),
            self.timeout,
            self.url_origin,
            self.body.render(template_context) if self.body is not None else None,
        )

    @classmethod
    def destination(cls, params: WebhookCall) -> str:
        """Scheme, host and port as the rule wrote them (`${NAME}` for a URL from a secret)."""
        return _origin_text(params.url_origin or params.url)

    @classmethod
    async def run(cls, params: WebhookCall, ctx: ActionContext) -> str:
        try:
            url = secrets.expand(params.url)
            origin = params.url_origin
            literal = secrets.expand(origin) if origin is not None else None
            headers = {str(k): secrets.expand(str(v)) for k, v in params.headers.items()}
        except secrets.MissingSecretError as error:
            raise ActionError(f"webhook: {error}") from None
        headers["Idempotency-Key"] = ctx.idempotency_key
        shown = _shown_url(params.url, url)
        if literal is not None:
            _check_destination(ctx.receivers, url, literal, shown)
        try:
            answer = await ctx.receivers.call(
                params.method, url, headers=headers, body=params.body, timeout=params.timeout
            )
        except ReceiverError as error:
            raise ActionError(
                f"webhook {shown}: {error.reason}", retryable=error.retryable
            ) from None
        if 200 <= answer.status < 300:
            return f"delivered {answer.status}"
        retryable = answer.status == 429 or answer.status >= 500
        raise ActionError(f"webhook {shown}: HTTP {answer.status}", retryable=retryable)


def _check_url(url: str, dynamic_host: bool, where: Location) -> str | None:
    """Refuse a URL that is not http(s), or whose scheme, host or port a template could set
    without `dynamic_host`; the literal start to check the rendered URL against at run time
    (None: nothing to check)."""
    starts_with_template = _TEMPLATE_START.match(url) is not None
    if dynamic_host and starts_with_template:
        return None
    if not url.startswith(("http://", "https://", "${")):
        if starts_with_template:
            raise _dynamic_host_error(url, where)
        raise ConfigError(
            f"`webhook.url` must be an http(s) URL, got {url[:60]!r}",
            where,
            "write e.g. https://hooks.example.com/emnify or ${OPS_WEBHOOK_URL}",
        )
    return None if dynamic_host else _literal_origin(url, where)


def _literal_origin(url: str, where: Location) -> str | None:
    """The literal start of a templated URL, up to its first template, which must hold the
    whole scheme, host and port (or be a `${NAME}` secret, whose value holds them); None for
    a URL without templates."""
    start = _TEMPLATE_START.search(url)
    if start is None:
        return None
    literal = url[: start.start()]
    if literal.startswith("${"):
        return literal  # the host comes from the environment; checked again at run time
    authority = literal.partition("://")[2]
    if not re.search(r"[/?#]", authority):
        raise _dynamic_host_error(url, where)
    return literal


def _dynamic_host_error(url: str, where: Location) -> ConfigError:
    return ConfigError(
        f"`webhook.url` {url[:80]!r} has a template in its scheme, host or port: event data"
        " would choose where the webhook goes",
        where,
        _DYNAMIC_HINT,
    )


def _refuse_routing_headers(
    headers: Mapping[str, Any], dynamic_host: bool, where: Location
) -> None:
    """Header names are the rule's, and so is a `Host` header's value unless the rule opts
    in: a proxy in front of the receiver may route by it."""
    for name, value in headers.items():
        if _TEMPLATE_START.search(name):
            raise ConfigError(
                f"`webhook.headers`: the header name {name[:60]!r} is a template",
                where,
                "write header names literally; values may use templates",
            )
        if name.lower() == "host" and _TEMPLATE_START.search(str(value)) and not dynamic_host:
            raise ConfigError(
                "`webhook.headers.Host` has a template: event data would choose where the"
                " webhook goes",
                where,
                "write it literally, or set `dynamic_host: true` if it must come from the event",
            )


def _check_destination(receivers: Receivers, url: str, literal: str, shown: str) -> None:
    """Refuse a rendered URL that leads to another scheme, host or port than the literal
    start the rule wrote: the second line behind the encoding of rendered values."""
    try:
        wanted, rendered = receivers.origin(literal), receivers.origin(url)
    except ValueError:
        raise ActionError(f"webhook {shown}: not a valid http(s) URL") from None
    if rendered != wanted:
        raise ActionError(
            f"webhook {shown}: the URL rendered from the event leads to another scheme, host or"
            " port than the rule's; not called (set `dynamic_host: true` on the action if the"
            " host must come from the event)"
        )


def _origin_text(url: str) -> str:
    """`scheme://host:port` of a URL as text, without user-info; the leading `${NAME}` of a
    URL taken from a secret (the secret's value is never needed, nor kept)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    return f"{scheme}{separator}{authority}".lower()


def _shown_url(written: str, url: str) -> str:
    """The URL as messages show it: as written when it holds a `${NAME}` (any part of the
    value may be secret), else only scheme, host and path (query strings and user-info
    often carry tokens)."""
    if secrets.references(written):
        return written
    try:
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname}{parts.path}"
    except ValueError:
        shown = "(unparsable URL)"
    return secrets.redact(shown)


def _refuse_literal_secrets(url: str, headers: Mapping[str, str], where: Location) -> None:
    for name, value in headers.items():
        lowered = name.lower()
        sensitive = lowered in _SECRET_HEADERS or any(w in lowered for w in _SECRET_WORDS)
        if sensitive and not secrets.references(value):
            raise ConfigError(
                f"`webhook.headers.{name}` holds a credential written into the rule file",
                where,
                f"write e.g. `{name}: ${{OPS_HOOK_TOKEN}}`; {_SECRET_HINT}",
            )
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return  # checked again when the call is made
    if password and not secrets.references(password):
        raise ConfigError(
            "`webhook.url` holds a password written into the rule file", where, _SECRET_HINT
        )
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in _SECRET_PARAMS and value and not secrets.references(value):
            raise ConfigError(
                f"`webhook.url` holds a credential (`{key}=`) written into the rule file",
                where,
                _SECRET_HINT,
            )
