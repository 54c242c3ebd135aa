"""`webhook`: call an HTTP endpoint with a templated JSON body.

Every call carries an `Idempotency-Key` header that stays the same across retries and
restarts, so a receiver can drop the duplicates an at-least-once delivery may produce.
Secrets go into `url` and `headers` as `${NAME}` and are filled in only when the call is
made: the outbox, the audit log and the logs see the reference, never the value. A literal
credential in a rule file (an `Authorization` header, a `?token=` in the URL, a password in
the URL) is refused at load time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from engine import secrets
from engine.actions.base import Action, ActionContext, PlannedAction, check_params, require_str
from engine.errors import ActionError, ConfigError, Location
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
_SECRET_HINT = (
    "secrets never go into rule files: write ${NAME} and set the environment variable NAME"
    " (or NAME_FILE, a file holding it)"
)


class Webhook(Action):
    kind = "webhook"

    def __init__(
        self,
        method: str,
        url: TemplateValue,
        headers: TemplateValue,
        body: TemplateValue | None,
        timeout: float,
        secret_names: tuple[str, ...],
    ):
        self._method = method
        self._url = url
        self._headers = headers
        self._body = body
        self._timeout = timeout
        self._secret_names = secret_names

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: Location) -> Self:
        check_params(
            cls.kind,
            params,
            where,
            allowed=("url", "method", "headers", "body", "timeout"),
            required=("url",),
        )
        url = require_str(cls.kind, params, "url", where) or ""
        if not url.startswith(("http://", "https://", "${", "{{")):
            raise ConfigError(
                f"`webhook.url` must be an http(s) URL, got {url[:60]!r}",
                where,
                "write e.g. https://hooks.example.com/emnify or ${OPS_WEBHOOK_URL}",
            )
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
        body = params.get("body")
        return cls(
            method,
            TemplateValue(url, where, "webhook.url", secret_refs=True),
            TemplateValue(
                {k: str(v) for k, v in headers.items()}, where, "webhook.headers", secret_refs=True
            ),
            TemplateValue(body, where, "webhook.body") if "body" in params else None,
            float(timeout),
            names,
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
        if self._body is not None:
            planned["body"] = self._body.render(template_context)
        return planned

    @classmethod
    async def run(cls, planned: PlannedAction, ctx: ActionContext) -> str:
        import httpx  # here, not on top: commands that only plan webhooks never load it

        params = planned.params
        try:
            url = secrets.expand(str(params["url"]))
            headers = {str(k): secrets.expand(str(v)) for k, v in params["headers"].items()}
        except secrets.MissingSecretError as error:
            raise ActionError(f"webhook: {error}") from None
        headers["Idempotency-Key"] = ctx.idempotency_key
        shown = _shown_url(str(params["url"]), url)
        # No exception text goes into a message: httpx quotes hosts, ports and header values,
        # and any of them may be (part of) a secret.
        try:
            response = await ctx.http.request(
                params["method"],
                url,
                headers=headers,
                json=params.get("body"),
                timeout=float(params.get("timeout", 10)),
            )
        except httpx.TimeoutException:
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
        if response.is_success:
            return f"delivered {response.status_code}"
        retryable = response.status_code == 429 or response.status_code >= 500
        raise ActionError(f"webhook {shown}: HTTP {response.status_code}", retryable=retryable)


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
