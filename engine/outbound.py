"""HTTP calls to receivers outside emnify, for actions (the `Receivers` port), with httpx.

A receiver cannot hold the engine: `timeout` bounds the whole exchange, however slowly the
answer trickles in (httpx's own timeouts bound each step only), and of the answer at most
`ANSWER_READ` bytes are read, raw (a compressed answer is never inflated). A small answer
is read to its end so the connection can serve the next call (and handed to the action
unless it came compressed); a larger one is cut off and its connection dropped. No failure
quotes httpx's message: it may name a host, a port or a header value, and any of them may
be (part of) a secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx

from engine.ports import ReceiverAnswer, ReceiverError

ANSWER_READ = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpReceivers:
    """The `Receivers` port over one shared `httpx.AsyncClient` (the daemon's)."""

    def __init__(self, http: httpx.AsyncClient):
        self._http = http

    async def call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Any = None,
        timeout: float,
    ) -> ReceiverAnswer:
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(method, url, headers, body, timeout)
        except (TimeoutError, httpx.TimeoutException):
            raise ReceiverError("timed out", retryable=True) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            raise ReceiverError("not a valid http(s) URL", retryable=False) from None
        except (httpx.LocalProtocolError, UnicodeError):
            raise ReceiverError(
                "the request cannot be sent (a header value is not plain ASCII text?)",
                retryable=False,
            ) from None
        except httpx.TransportError as error:
            raise ReceiverError(type(error).__name__, retryable=True) from None

    async def _exchange(
        self, method: str, url: str, headers: Mapping[str, str], body: Any, timeout: float
    ) -> ReceiverAnswer:
        # Leaving the stream unread drops the connection instead of returning it to the pool.
        async with self._http.stream(
            method, url, headers=dict(headers), json=body, timeout=timeout
        ) as response:
            chunks: list[bytes] = []
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > ANSWER_READ:
                    return ReceiverAnswer(response.status_code, None)
                chunks.append(chunk)
            encoded = response.headers.get("content-encoding", "identity") != "identity"
            return ReceiverAnswer(response.status_code, None if encoded else b"".join(chunks))

    def origin(self, url: str) -> tuple[str, str, int | None]:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as error:
            raise ValueError("not a valid URL") from error
        return parsed.scheme, parsed.host, parsed.port or _DEFAULT_PORTS.get(parsed.scheme)
