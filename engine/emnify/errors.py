"""Turn whatever a failed emnify response carries into one `ApiError`.

The API and the gateways in front of it (CloudFront, AWS API Gateway) answer failures in several
shapes: an empty body, an HTML page, `{"message"}`, `{error_code, error_token, message, errors}`,
`{status_code, message}` and `{reason, message}`. None is trusted to be small or well formed.
"""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from engine.clock import system_clock
from engine.errors import ApiError, Retry


class LoginError(ApiError):
    """`POST /api/v1/authenticate` failed. Already retried where that made sense; a 401 or 403
    means the application token itself is refused, which no retry will fix."""

    @property
    def retry(self) -> Retry:
        """Never at once: the login call was already retried on its own, so the call that
        needed the login is not repeated for it; later, unless the login is refused for
        good (a 403, a 4xx)."""
        return Retry.NEVER if super().retry is Retry.NEVER else Retry.LATER


_MAX_MESSAGE = 300  # characters of server text kept in a message
_MAX_NESTED = 3  # nested `errors[].message` texts folded into the message
_SECONDS = re.compile(r"\d+(\.\d+)?")


def api_error_from_response(
    response: httpx.Response,
    *,
    method: str | None = None,
    path: str | None = None,
    context: str | None = None,
    now: float | None = None,
) -> ApiError:
    """Build the `ApiError` for a failed (or unusable) response.

    `method` and `path` default to the request's; the path never includes the query string.
    `context`, if given, starts the message (e.g. "rejected again after a fresh login").
    `now` (epoch seconds) is only used to turn an HTTP-date `Retry-After` into seconds.
    """
    status = response.status_code
    body = response.content
    error_code: int | None = None
    error_token: str | None = None
    nested: list[object] = []

    if not body.strip():
        message = f"HTTP {status} with an empty body"
    else:
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            message = _describe_non_json(status, response)
        else:
            if isinstance(parsed, dict):
                error_code = _as_int(parsed.get("error_code"))
                token = parsed.get("error_token")
                error_token = token if isinstance(token, str) and token else None
                raw_errors = parsed.get("errors")
                if isinstance(raw_errors, list):
                    nested = list(raw_errors)
                message = _message_from_dict(status, parsed, nested)
            else:
                kind = type(parsed).__name__
                message = f"HTTP {status} with an unexpected JSON body ({kind})"

    if context:
        message = f"{context}: {message}"
    return ApiError(
        status,
        message,
        method=method if method is not None else _request_method(response),
        path=path if path is not None else _request_path(response),
        error_code=error_code,
        error_token=error_token,
        errors=nested,
        retry_after=parse_retry_after(response.headers.get("retry-after"), now=now),
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delay-seconds or HTTP-date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    current = system_clock().timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


def _message_from_dict(status: int, body: dict[str, Any], nested: list[object]) -> str:
    message = _text(body.get("message"))
    reason = _text(body.get("reason"))
    if message and reason and reason != message:
        message = f"{message} ({reason})"
    message = message or reason or _text(body.get("error_token"))
    if not message:
        keys = ", ".join(sorted(str(k) for k in body)[:5])
        message = f"HTTP {status} with no message (keys: {keys or 'none'})"
    details = [text for item in nested[:_MAX_NESTED] if (text := _nested_text(item))]
    if details:
        message = f"{message}: {'; '.join(details)}"
    return _truncate(message)


def _nested_text(item: object) -> str:
    if isinstance(item, dict):
        return _text(item.get("message")) or _text(item.get("error_token"))
    return _text(item)


def _describe_non_json(status: int, response: httpx.Response) -> str:
    content_type = response.headers.get("content-type", "no content type").split(";")[0].strip()
    size = len(response.content)
    snippet = " ".join(response.content[:400].decode("utf-8", "replace").split())
    text = f"HTTP {status} with a non-JSON body ({content_type}, {size} bytes)"
    return f"{text}: {_truncate(snippet, 120)}" if snippet else text


def _text(value: object) -> str:
    if isinstance(value, str):
        return _truncate(" ".join(value.split()))
    return ""


def _truncate(text: str, limit: int = _MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _request_method(response: httpx.Response) -> str:
    try:
        return response.request.method
    except RuntimeError:  # a Response built without a request
        return ""


def _request_path(response: httpx.Response) -> str:
    try:
        return response.request.url.path
    except RuntimeError:
        return ""
