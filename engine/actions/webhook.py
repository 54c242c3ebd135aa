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
its answer only the status is used; at most a small part of the body is read.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qsl, urlsplit

from engine import secrets
from engine.actions.base import Action, ActionContext, PlannedAction, check_params, require_str
from engine.errors import ActionError, ConfigError, Location
from engine.templates import TemplateValue

if TYPE_CHECKING:
    import httpx

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Header and query-parameter names whose values are credentials: they must be `${NAME}`.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "apikey"}
)
_SECRET_WORDS = ("token", "secret", "password", "passwd", "signature", "api-key", "api_key")
_SECRET_PARAMS = frozenset(
    {"token", "access_token", "auth", "key", "apikey", "api_key", "secret", "sig", "signature"}
)
# Of a receiver's answer only the status counts; a small answer is read to its end (so the
# connection can serve the next call), a larger one no further than this.
_ANSWER_READ = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
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


class Webhook(Action):
    kind = "webhook"
    calls_out = True

    def __init__(
        self,
        method: str,
        url: TemplateValue,
        headers: TemplateValue,
        body: TemplateValue | None,
        timeout: float,
        secret_names: tuple[str, ...],
        url_origin: str | None,
    ):
        self._method = method
        self._url = url
        self._headers = headers
        self._body = body
        self._timeout = timeout
        self._secret_names = secret_names
        # The literal start of a templated URL that fixes scheme, host and port; None when
        # the URL has no template or the rule chose `dynamic_host`.
        self._url_origin = url_origin

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: Location) -> Self:
        check_params(
            cls.kind,
            params,
            where,
            allowed=("url", "method", "headers", "body", "timeout", "dynamic_host"),
            required=("url",),
        )
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
        names = tuple(
            name for text in [url, *map(str, headers.values())] for name in secrets.references(text)
        )
        for name in names:
            if not name.isupper():
                raise ConfigError(
                    f"`${{{name}}}`: secret names are upper-case environment variables", where
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
            TemplateValue(body, where, "webhook.body") if "body" in params else None,
            float(timeout),
            names,
            url_origin,
        )

    def secret_names(self) -> list[str]:
        """The `${NAME}` references this webhook needs at run time."""
        return list(self._secret_names)

    def render(self, template_context: Mapping[str, Any]) -> dict[str, Any]:
        planned: dict[str, Any] = {
            "method": self._method,
            "url": self._url.render(template_context),
            "headers": self._headers.render(template_context),
            "timeout": self._timeout,
        }
        if self._url_origin is not None:
            planned["url_origin"] = self._url_origin
        if self._body is not None:
            planned["body"] = self._body.render(template_context)
        return planned

    @classmethod
    def destination(cls, planned: PlannedAction) -> str:
        """Scheme, host and port as the rule wrote them (`${NAME}` for a URL from a secret)."""
        params = planned.params
        return _origin_text(str(params.get("url_origin") or params.get("url", "")))

    @classmethod
    async def run(cls, planned: PlannedAction, ctx: ActionContext) -> str:
        import httpx  # here, not on top: commands that only plan webhooks never load it

        params = planned.params
        try:
            url = secrets.expand(str(params["url"]))
            origin = params.get("url_origin")
            literal = secrets.expand(str(origin)) if origin is not None else None
            headers = {str(k): secrets.expand(str(v)) for k, v in params["headers"].items()}
        except secrets.MissingSecretError as error:
            raise ActionError(f"webhook: {error}") from None
        headers["Idempotency-Key"] = ctx.idempotency_key
        shown = _shown_url(str(params["url"]), url)
        if literal is not None:
            _check_destination(url, literal, shown)
        timeout = float(params.get("timeout", 10))
        # No exception text goes into a message: httpx quotes hosts, ports and header values,
        # and any of them may be (part of) a secret.
        try:
            # httpx's timeouts bound each step (a read waits at most `timeout` for the next
            # bytes); this bounds the whole exchange, however slowly the answer trickles in.
            async with asyncio.timeout(timeout):
                status = await _exchange(
                    ctx.http, params["method"], url, headers, params.get("body"), timeout
                )
        except (TimeoutError, httpx.TimeoutException):
            raise ActionError(f"webhook {shown}: timed out", retryable=True) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            raise ActionError(f"webhook {shown}: not a valid http(s) URL") from None
        except (httpx.LocalProtocolError, UnicodeError):
            raise ActionError(
                f"webhook {shown}: the request cannot be sent (a header value is not plain"
                " ASCII text?)"
            ) from None
        except httpx.TransportError as error:
            raise ActionError(f"webhook {shown}: {type(error).__name__}", retryable=True) from None
        if 200 <= status < 300:
            return f"delivered {status}"
        retryable = status == 429 or status >= 500
        raise ActionError(f"webhook {shown}: HTTP {status}", retryable=retryable)


async def _exchange(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any,
    timeout: float,
) -> int:
    """Send the request; the answer's status, its body read no further than `_ANSWER_READ`
    (raw: a compressed answer is never inflated). Leaving the stream unread drops the
    connection instead of returning it to the pool."""
    async with http.stream(method, url, headers=headers, json=body, timeout=timeout) as response:
        read = 0
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read > _ANSWER_READ:
                break
        return response.status_code


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


def _check_destination(url: str, literal: str, shown: str) -> None:
    """Refuse a rendered URL that leads to another scheme, host or port than the literal
    start the rule wrote: the second line behind the encoding of rendered values."""
    import httpx

    try:
        wanted, rendered = _origin(httpx.URL(literal)), _origin(httpx.URL(url))
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ActionError(f"webhook {shown}: not a valid http(s) URL") from None
    if rendered != wanted:
        raise ActionError(
            f"webhook {shown}: the URL rendered from the event leads to another scheme, host or"
            " port than the rule's; not called (set `dynamic_host: true` on the action if the"
            " host must come from the event)"
        )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


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
    if url.startswith("${"):
        return
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
