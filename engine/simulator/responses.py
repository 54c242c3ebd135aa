"""Response bodies the way emnify (and the gateway in front of it) sends them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(content, status_code=status, headers=headers)


def api_error(
    status: int,
    error_code: int,
    error_token: str,
    message: str,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The API's own error body: `{error_code, error_token, message[, errors]}`."""
    body: dict[str, Any] = {
        "error_code": error_code,
        "error_token": error_token,
        "message": message,
    }
    if errors is not None:
        body["errors"] = list(errors)
    return json_response(body, status, headers)


def gateway_unauthorized() -> Response:
    """What AWS API Gateway answers for a missing or malformed bearer token (emnify-api.md §2.4)."""
    return json_response(
        {"message": "token contains an invalid number of segments"},
        401,
        {"x-amzn-ErrorType": "AccessDeniedException", "x-cache": "Error from cloudfront"},
    )


def not_found(message: str) -> Response:
    return api_error(404, 1201, "NotFound", message)


def validation_failed(message: str, errors: Sequence[Mapping[str, Any]]) -> Response:
    return api_error(422, 1400, "InputValidationFailed", message, errors)


def empty(status: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(b"", status_code=status, headers=headers)
