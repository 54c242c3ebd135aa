"""`EmnifyClient`: the thin async client for the emnify REST calls the engine needs (§10, §11).

Every call goes through `_request`, which in this order: waits for the rate limiter of its path
class, attaches a fresh-enough auth token, sends, logs in again once on a 401, and repeats what
`ApiError.retry` says may be repeated at once (throttling, gateway errors and transport failures;
only the first kinds for a call that is not idempotent) with backoff (tenacity). Anything non-2xx
that is left becomes an `ApiError`.

An answer is bounded in time and size, whoever sends it: one exchange ends within
`connect_timeout + read_timeout` however slowly its bytes trickle in (httpx's own timeouts
bound each read, not their sum), and a body is read no further than `max_response_bytes`
(decoded) for a success, a few KB for a failure, whose text only goes into a message.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import httpx
import orjson
import structlog
from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from engine import __version__
from engine.emnify.auth import AuthSession, Secret
from engine.emnify.errors import LoginError, api_error_from_response
from engine.errors import ApiError, Retry
from engine.jsontext import loads_json, loads_records

_log = structlog.get_logger(__name__)

USER_AGENT = f"emnify-event-engine/{__version__} httpx/{httpx.__version__}"

# Transport failures raised before any byte of the request went out: an `ApiError` from one
# is `unsent`.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

_RATE_MARGIN = 1.1
_FAILURE_BODY_BYTES = 64 * 1024  # of a failed call's answer, read for its message
# Headers that describe the body as it was sent, not as it is kept (decoded, maybe cut).
_BODY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_MAX_PAGE_REASKS = 10  # per walk: re-asked pages after the page size changed

OnResponse = Callable[[str, str, int | None, float], None]


@dataclass(frozen=True)
class ClientSettings:
    """How to reach emnify and how hard to try. Rates are requests per second."""

    base_url: str = "https://cdn.emnify.net"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    event_rate_limit: float = 5.0  # /api/v1/event and /api/v1/event/type
    action_rate_limit: float = 5.0  # everything else, except the login
    max_retries: int = 5  # attempts after the first, for retryable failures
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_deadline: float = 300.0  # no retry starts later than this after the first attempt
    per_page: int = 1000
    relogin_margin: float = 300.0
    # The same bound as the Data Streamer's deliveries: a page of events is far smaller.
    max_response_bytes: int = 16 * 1024 * 1024
    # What a refused login tells the operator to check: the variable, or (with several
    # organisations) which organisation's token.
    token_source: str = "EMNIFY_APPLICATION_TOKEN"

    def __post_init__(self) -> None:
        positive = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "event_rate_limit": self.event_rate_limit,
            "action_rate_limit": self.action_rate_limit,
            "backoff_initial": self.backoff_initial,
            "backoff_max": self.backoff_max,
            "retry_deadline": self.retry_deadline,
            "per_page": self.per_page,
            "max_response_bytes": self.max_response_bytes,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"ClientSettings.{name} must be > 0, got {value!r}")
        if self.max_retries < 0:
            raise ValueError(f"ClientSettings.max_retries must be >= 0, got {self.max_retries!r}")
        if self.relogin_margin < 0:
            raise ValueError(
                f"ClientSettings.relogin_margin must be >= 0, got {self.relogin_margin!r}"
            )


DEFAULT_SETTINGS = ClientSettings()


@dataclass(frozen=True)
class EventPage:
    """One page of `GET /api/v1/event`, with the paging facts read from its headers."""

    # Raw event records as sent by the API: dicts, save for the odd malformed one, which the
    # pipeline quarantines (refusing the page would refuse it at every poll).
    events: list[Any]
    page: int  # the page asked for
    total_pages: int  # x-total-pages (1 when absent)
    per_page: int  # effective size, read back from x-count-per-page (the API clamps silently)
    total_count: int | None  # x-total-count, when sent


@dataclass(frozen=True, slots=True)
class _Call:
    """One logical API call; retries and a re-login repeat it unchanged."""

    method: str
    path: str  # literal, without query: goes into ApiError and logs
    template: str  # ids replaced by placeholders: goes to `on_response` for metrics
    limiter: AsyncLimiter | None  # None: the login, which has no bucket
    params: Mapping[str, str | int] | None = None
    body: bytes | None = field(default=None, repr=False)  # the login body holds the app token
    idempotent: bool = True
    authenticated: bool = True
    on_underway: Callable[[], None] | None = None


@dataclass(slots=True)
class _Attempts:
    relogged_in: bool = False  # a call logs in again on a 401 only once


class EmnifyClient:
    """Async client for the emnify REST API, authenticated with an application token."""

    def __init__(
        self,
        application_token: str,
        settings: ClientSettings = DEFAULT_SETTINGS,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        on_response: OnResponse | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not application_token.strip():
            raise ValueError(f"the emnify application token is empty: set {settings.token_source}")
        self._application_token = Secret(application_token)
        self._settings = settings
        self._on_response = on_response
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=settings.base_url,
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=settings.read_timeout,
                write=settings.read_timeout,
                pool=settings.connect_timeout,
            ),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            transport=transport,
            follow_redirects=False,
        )
        # Capacity 1, so the bucket never lets a burst through above the configured rate.
        # The spacing is wider than the rate asks (`_RATE_MARGIN`), so that jitter between
        # our timer and the requests' arrival at the API (a busy event loop on either side)
        # does not show it more than the configured number in any second.
        self._event_limiter = AsyncLimiter(1, _RATE_MARGIN / settings.event_rate_limit)
        self._action_limiter = AsyncLimiter(1, _RATE_MARGIN / settings.action_rate_limit)
        self._auth = AuthSession(self._login, relogin_margin=settings.relogin_margin)
        # Profile names resolved to ids, per kind: read once, again only for a name not in it.
        self._profile_ids: dict[str, dict[str, int]] = {}

    def __repr__(self) -> str:
        return f"EmnifyClient(base_url={self._settings.base_url!r})"

    def observe_responses(self, on_response: OnResponse) -> None:
        """Report every response from now on to `on_response` (the daemon's metrics, on a
        client made before the daemon to fetch the event-type catalog)."""
        self._on_response = on_response

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- auth -------------------------------------------------------------------------------

    async def authenticate(self) -> None:
        """Log in now (otherwise the first call does): `POST /api/v1/authenticate`."""
        await self._auth.token()

    async def _login(self) -> Secret:
        path = "/api/v1/authenticate"
        call = _Call(
            "POST",
            path,
            path,
            limiter=None,
            body=orjson.dumps({"application_token": self._application_token.reveal()}),
            authenticated=False,
        )
        try:
            response = await self._request(call)
        except ApiError as exc:
            if exc.status in (401, 403):
                message = (
                    f"application token rejected: check {self._settings.token_source} (revoked,"
                    f" expired, IP-restricted, or blocked after failed logins; {exc.message})"
                )
            else:
                message = f"login failed: {exc.message}"
            # A login body is the one place the application token travels; never echo it.
            message = message.replace(self._application_token.reveal(), "***")
            raise LoginError(
                exc.status,
                message,
                method=call.method,
                path=path,
                error_code=exc.error_code,
                error_token=exc.error_token,
                retry_after=exc.retry_after,
            ) from exc
        body = _json(response, call)
        token = body.get("auth_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise LoginError(
                response.status_code,
                "login response has no auth_token",
                method=call.method,
                path=path,
            )
        return Secret(token)

    # --- events -----------------------------------------------------------------------------

    async def list_events_page(
        self,
        start: datetime,
        end: datetime,
        page: int = 1,
        *,
        sort: str = "id",
        per_page: int | None = None,
        on_underway: Callable[[], None] | None = None,
    ) -> EventPage:
        """One page of the organisation's events with `start <= timestamp <= end`.

        The window goes out in whole seconds: `start` rounded down, `end` rounded up, so no event
        inside the window is missed (the poller dedupes by id anyway).

        `on_underway` is called once the request is on the wire and only the answer is awaited,
        or as soon as it must wait for something else first (the rate limit, a login, a retry's
        backoff): from then on the caller may block the event loop with other work, and the
        API's work overlaps it.
        """
        if page < 1:
            raise ValueError(f"page must be >= 1, got {page}")
        size = self._settings.per_page if per_page is None else per_page
        if size < 1:
            raise ValueError(f"per_page must be >= 1, got {size}")
        path = "/api/v1/event"
        call = _Call(
            "GET",
            path,
            path,
            limiter=self._event_limiter,
            params={"q": event_window(start, end), "sort": sort, "page": page, "per_page": size},
            on_underway=on_underway,
        )
        response = await self._request(call)
        headers = response.headers
        total_pages = _int_header(headers, "x-total-pages")
        effective = _int_header(headers, "x-count-per-page")
        return EventPage(
            events=_event_records(response, call),
            page=page,
            total_pages=1 if total_pages is None else total_pages,
            per_page=size if effective is None else effective,
            total_count=_int_header(headers, "x-total-count"),
        )

    async def iter_event_pages(
        self,
        start: datetime,
        end: datetime,
        *,
        sort: str = "id",
        per_page: int | None = None,
        on_underway: Callable[[], None] | None = None,
    ) -> AsyncIterator[EventPage]:
        """Every page of the window, 1 … x-total-pages (`on_underway`: see `list_events_page`).

        Asking past the last page returns the last page again (§3.3), so the walk stops at
        `total_pages`, at an empty page, and at a page whose ids repeat the previous page's.
        The page size is read back from each page (`x-count-per-page`): when it changes
        during the walk (a clamp that comes and goes), the next page is the one holding the
        first event not yet read at the new size, so no event falls between two pages.
        Pages may then overlap; the caller drops repeated ids anyway.
        """
        page, previous_page = 1, 0
        previous_ids: list[object] | None = None
        covered = 0  # events read from the top of the result without a gap
        last_size: int | None = None
        reasks = _MAX_PAGE_REASKS
        while True:
            current = await self.list_events_page(
                start, end, page, sort=sort, per_page=per_page, on_underway=on_underway
            )
            size = max(current.per_page, 1)
            first = (page - 1) * size
            if first > covered and last_size not in (None, size) and reasks > 0:
                # The size changed under the walk: this page starts past what was read.
                reasks -= 1
                _log.info("emnify page size changed during a walk", was=last_size, now=size)
                page, last_size = covered // size + 1, size
                continue
            ids = [_id_of(event) for event in current.events]
            if ids and ids == previous_ids and page > previous_page:
                _log.warning(
                    "emnify event page repeats the previous one; stopping",
                    page=page,
                    total_pages=current.total_pages,
                )
                return
            yield current
            if page >= current.total_pages or not current.events:
                return
            full = len(current.events) >= size
            covered = max(covered, first + size) if full and first <= covered else first + size
            # A full page: continue from the first event not read. A short one that is not
            # the last (an inconsistent server): simply the next page.
            page = covered // size + 1 if full else page + 1
            previous_ids, previous_page, last_size = ids, current.page, size

    async def event_types(self) -> list[dict[str, Any]]:
        """`GET /api/v1/event/type`: `[{"id": int, "description": str}, …]`."""
        path = "/api/v1/event/type"
        call = _Call("GET", path, path, limiter=self._event_limiter)
        return _list_of_dicts(await self._request(call), call)

    # --- data streams ----------------------------------------------------------------------

    async def data_streams(self) -> list[dict[str, Any]]:
        """`GET /api/v2/data_stream`: the organisation's data streams, each with its
        `status` (`{"id": 1, "description": "Running"}`; 3 is Error)."""
        path = "/api/v2/data_stream"
        call = self._action("GET", path, path)
        return _list_of_dicts(await self._request(call), call)

    async def restart_data_stream(self, stream_id: int) -> None:
        """`POST /api/v2/data_stream/{id}/restart`: a stream in Error runs again."""
        call = self._action(
            "POST",
            f"/api/v2/data_stream/{stream_id}/restart",
            "/api/v2/data_stream/{id}/restart",
        )
        await self._request(call)

    # --- SIMs and endpoints -----------------------------------------------------------------

    async def get_sim(self, sim_id: int) -> dict[str, Any]:
        call = self._action("GET", f"/api/v1/sim/{sim_id}", "/api/v1/sim/{sim_id}")
        return _dict(await self._request(call), call)

    async def set_sim_status(self, sim_id: int, status_id: int) -> None:
        """`PATCH /api/v1/sim/{id}` `{"status": {"id": N}}` (see `SimStatus`); 204 expected.

        Not retried here after it may have been applied (timeout, dropped connection, 5xx):
        the caller reads the status back first, so a late or stale PATCH is never repeated.
        """
        call = self._action(
            "PATCH",
            f"/api/v1/sim/{sim_id}",
            "/api/v1/sim/{sim_id}",
            _status_body(status_id),
            idempotent=False,
        )
        await self._request(call)

    async def get_endpoint(self, endpoint_id: int) -> dict[str, Any]:
        call = self._action(
            "GET", f"/api/v1/endpoint/{endpoint_id}", "/api/v1/endpoint/{endpoint_id}"
        )
        return _dict(await self._request(call), call)

    async def endpoints_named(self, name: str) -> list[dict[str, Any]]:
        """`GET /api/v1/endpoint?q=name:NAME`: the endpoints whose name matches (the API
        matches a part of the name), each with its `sim` (`{"id", "iccid", ...}`)."""
        path = "/api/v1/endpoint"
        call = self._action("GET", path, path, params={"q": f"name:{name}", "per_page": 100})
        return _list_of_dicts(await self._request(call), call)

    async def set_endpoint_status(self, endpoint_id: int, status_id: int) -> None:
        """`PATCH /api/v1/endpoint/{id}` `{"status": {"id": N}}` (see `EndpointStatus`)."""
        call = self._action(
            "PATCH",
            f"/api/v1/endpoint/{endpoint_id}",
            "/api/v1/endpoint/{endpoint_id}",
            _status_body(status_id),
            idempotent=False,  # as for `set_sim_status`: the caller reads back first
        )
        await self._request(call)

    # --- SMS --------------------------------------------------------------------------------

    async def send_sms(self, endpoint_id: int, message: dict[str, Any]) -> int | None:
        """`POST /api/v1/endpoint/{id}/sms`; the new SMS id from `Location`, None if absent.

        Not idempotent: retried only when emnify surely did not take it (429, or no connection
        made). After a timeout, a dropped connection or a 5xx the SMS may have gone out, so the
        `ApiError` (status None or 5xx) goes to the caller, who can look for it with `list_sms`.
        """
        call = self._action(
            "POST",
            f"/api/v1/endpoint/{endpoint_id}/sms",
            "/api/v1/endpoint/{endpoint_id}/sms",
            orjson.dumps(message),
            idempotent=False,
        )
        response = await self._request(call)
        return _id_from_location(response.headers.get("location"))

    async def list_sms(self, endpoint_id: int) -> list[dict[str, Any]]:
        """Every SMS of the endpoint, all pages (oldest first, as the API sends them: the
        newest, which a check for an SMS already sent looks for, are on the last page)."""
        messages: list[dict[str, Any]] = []
        previous_ids: list[object] | None = None
        page = 1
        while True:
            call = self._action(
                "GET",
                f"/api/v1/endpoint/{endpoint_id}/sms",
                "/api/v1/endpoint/{endpoint_id}/sms",
                params={"page": page, "per_page": self._settings.per_page},
            )
            response = await self._request(call)
            items = _list_of_dicts(response, call)
            ids = [item.get("id") for item in items]
            if not items or ids == previous_ids:  # past the end, the last page comes again
                return messages
            messages.extend(items)
            total_pages = _int_header(response.headers, "x-total-pages") or 1
            if page >= total_pages:
                return messages
            page, previous_ids = page + 1, ids

    # --- quotas (emnify-api.md §6.4) --------------------------------------------------------

    async def get_quota(self, endpoint_id: int, kind: str) -> dict[str, Any] | None:
        """`GET /api/v1/endpoint/{id}/quota/{data|sms}`; None when the endpoint has no quota
        (a 404 for an endpoint that exists: the SIM's quota was never set, or was deleted)."""
        call = self._action(
            "GET",
            f"/api/v1/endpoint/{endpoint_id}/quota/{kind}",
            "/api/v1/endpoint/{endpoint_id}/quota/" + kind,
        )
        try:
            return _dict(await self._request(call), call)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def set_quota(self, endpoint_id: int, kind: str, quota: dict[str, Any]) -> None:
        """`POST /api/v1/endpoint/{id}/quota/{data|sms}`: the whole quota (a POST replaces
        it, it does not add); 201 expected. Not retried once it may have reached emnify: the
        caller reads back first (`set_endpoint_status` does the same)."""
        call = self._action(
            "POST",
            f"/api/v1/endpoint/{endpoint_id}/quota/{kind}",
            "/api/v1/endpoint/{endpoint_id}/quota/" + kind,
            orjson.dumps(quota),
            idempotent=False,
        )
        await self._request(call)

    async def traffic_limit_extension(self, endpoint_id: int) -> dict[str, Any] | None:
        """`GET /api/v1/endpoint/{id}/traffic_limit_extension`; None when there is none."""
        call = self._action(
            "GET",
            f"/api/v1/endpoint/{endpoint_id}/traffic_limit_extension",
            "/api/v1/endpoint/{endpoint_id}/traffic_limit_extension",
        )
        try:
            return _dict(await self._request(call), call)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def extend_traffic_limit(self, endpoint_id: int, volume: float) -> None:
        """`POST /api/v1/endpoint/{id}/traffic_limit_extension` `{"volume": MB}`; 201. Not
        retried once it may have reached emnify: the caller reads back first."""
        call = self._action(
            "POST",
            f"/api/v1/endpoint/{endpoint_id}/traffic_limit_extension",
            "/api/v1/endpoint/{endpoint_id}/traffic_limit_extension",
            orjson.dumps({"volume": int(volume) if float(volume).is_integer() else volume}),
            idempotent=False,
        )
        await self._request(call)

    # --- endpoint settings, profiles, connectivity, operator blacklist (§6.2, §6.5, §13) ---

    async def update_endpoint(self, endpoint_id: int, changes: dict[str, Any]) -> None:
        """`PATCH /api/v1/endpoint/{id}` with `changes` (a partial update: `tags`,
        `service_profile: {id}`, `tariff_profile: {id}`, `imei_lock`); 204 expected. emnify
        asks for one change per call, run one after another (the endpoint lane does that).
        Not retried once it may have reached emnify: the caller reads back first."""
        call = self._action(
            "PATCH",
            f"/api/v1/endpoint/{endpoint_id}",
            "/api/v1/endpoint/{endpoint_id}",
            orjson.dumps(changes),
            idempotent=False,
        )
        await self._request(call)

    async def profiles(self, kind: str) -> list[dict[str, Any]]:
        """`GET /api/v1/service_profile` or `GET /api/v1/tariff_profile` (`kind` names
        which): the organisation's profiles, `[{"id", "name", ...}]`."""
        call = self._action("GET", f"/api/v1/{kind}", f"/api/v1/{kind}")
        return _list_of_dicts(await self._request(call), call)

    async def profile_id(self, kind: str, name: str) -> int | None:
        """The id of the "service_profile" or "tariff_profile" named `name` (exactly), None
        when there is none. The list is read once and kept; a name not in it reads it once
        more (a profile created since), so a rule naming a profile costs no call per use."""
        known = self._profile_ids.get(kind)
        if known is None or name not in known:
            known = {}
            for profile in await self.profiles(kind):
                ident, title = profile.get("id"), profile.get("name")
                if isinstance(ident, int) and isinstance(title, str):
                    known.setdefault(title, ident)
            self._profile_ids[kind] = known
        return known.get(name)

    async def reset_connectivity(
        self, endpoint_id: int, *, location: bool, pdp_context: bool
    ) -> None:
        """`PATCH /api/v1/endpoint/{id}/connectivity` with `{"location": null}` (cancel the
        location) and/or `{"pdp_context": null}` (delete the PDP context); 204, the effect
        comes later. Doing it twice only makes the device attach again."""
        body: dict[str, None] = {}
        if location:
            body["location"] = None
        if pdp_context:
            body["pdp_context"] = None
        call = self._action(
            "PATCH",
            f"/api/v1/endpoint/{endpoint_id}/connectivity",
            "/api/v1/endpoint/{endpoint_id}/connectivity",
            orjson.dumps(body),
        )
        await self._request(call)

    async def operator_blacklist(self, endpoint_id: int) -> list[int]:
        """`GET /api/v1/endpoint/{id}/operator_blacklist`: the ids of the operators the
        endpoint may not use."""
        call = self._action(
            "GET",
            f"/api/v1/endpoint/{endpoint_id}/operator_blacklist",
            "/api/v1/endpoint/{endpoint_id}/operator_blacklist",
        )
        items = _list_of_dicts(await self._request(call), call)
        return [i for item in items if isinstance(i := item.get("id"), int)]

    async def set_operator_blacklisted(
        self, endpoint_id: int, operator_id: int, blacklisted: bool
    ) -> None:
        """`PUT` (or `DELETE`) `/api/v1/endpoint/{id}/operator_blacklist/{operator_id}`;
        204. A 409 `Duplicated` to a PUT means it is blacklisted already: done."""
        call = self._action(
            "PUT" if blacklisted else "DELETE",
            f"/api/v1/endpoint/{endpoint_id}/operator_blacklist/{operator_id}",
            "/api/v1/endpoint/{endpoint_id}/operator_blacklist/{operator_id}",
        )
        try:
            await self._request(call)
        except ApiError as error:
            if not (blacklisted and error.status == 409):
                raise

    # --- lookups: facts a rule reads before its condition (read only) -----------------------

    async def get_endpoint_stats(self, endpoint_id: int) -> dict[str, Any]:
        """`GET /api/v1/endpoint/{id}/stats`: usage (`current_month`, `last_month`, ...)."""
        call = self._action(
            "GET", f"/api/v1/endpoint/{endpoint_id}/stats", "/api/v1/endpoint/{endpoint_id}/stats"
        )
        return _dict(await self._request(call), call)

    async def get_connectivity(self, endpoint_id: int) -> dict[str, Any]:
        """`GET /api/v1/endpoint/{id}/connectivity`: `status.description` ONLINE, ATTACHED,
        OFFLINE or BLOCKED, with location and PDP context (emnify-api.md §6.5)."""
        call = self._action(
            "GET",
            f"/api/v1/endpoint/{endpoint_id}/connectivity",
            "/api/v1/endpoint/{endpoint_id}/connectivity",
        )
        return _dict(await self._request(call), call)

    # --- the request pipeline ---------------------------------------------------------------

    def _action(
        self,
        method: str,
        path: str,
        template: str,
        body: bytes | None = None,
        *,
        idempotent: bool = True,
        params: Mapping[str, str | int] | None = None,
    ) -> _Call:
        return _Call(
            method,
            path,
            template,
            self._action_limiter,
            params=params,
            body=body,
            idempotent=idempotent,
        )

    async def _request(self, call: _Call) -> httpx.Response:
        """Send `call` with auth and retries; a 2xx response, or `ApiError`."""
        state = _Attempts()
        response: httpx.Response | None = None
        async for attempt in self._retrying(call):
            with attempt:
                response = await self._attempt(call, state)
        assert response is not None  # tenacity either returned after a success or raised
        return response

    def _retrying(self, call: _Call) -> AsyncRetrying:
        settings = self._settings
        backoff = wait_random_exponential(
            multiplier=settings.backoff_initial, max=settings.backoff_max
        )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, ApiError) and error.retry_after is not None:
                return min(error.retry_after, settings.backoff_max)
            return backoff(state)

        def should_retry(error: BaseException) -> bool:
            return _retryable(call, error)

        return AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(settings.max_retries + 1)
            | stop_before_delay(settings.retry_deadline),
            wait=wait,
            retry=retry_if_exception(should_retry),
            before_sleep=lambda state: _before_retry(call, state),
            reraise=True,
        )

    async def _attempt(self, call: _Call, state: _Attempts) -> httpx.Response:
        if not call.authenticated:
            response = await self._send(call, None)
        else:
            if call.on_underway is not None and not self._auth.ready:
                call.on_underway()
            token = await self._auth.token()
            response = await self._send(call, token)
            if response.status_code == 401:
                if state.relogged_in:
                    raise api_error_from_response(response, method=call.method, path=call.path)
                state.relogged_in = True
                _log.warning(
                    "emnify refused the auth token; logging in again",
                    method=call.method,
                    path=call.path,
                    status=401,
                )
                token = await self._auth.renew(token)
                response = await self._send(call, token)
                if response.status_code == 401:
                    raise api_error_from_response(
                        response,
                        method=call.method,
                        path=call.path,
                        context="refused again right after a fresh login",
                    )
        if not response.is_success:
            raise api_error_from_response(response, method=call.method, path=call.path)
        return response

    async def _send(self, call: _Call, token: Secret | None) -> httpx.Response:
        """One HTTP exchange, after the rate limiter; transport failures become `ApiError`."""
        if call.limiter is not None:
            if call.on_underway is not None and not call.limiter.has_capacity():
                call.on_underway()
            await call.limiter.acquire()
        headers = {"Content-Type": "application/json"} if call.body is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.reveal()}"
        extensions = None if call.on_underway is None else {"trace": _tracer(call.on_underway)}
        request = self._http.build_request(
            call.method,
            call.path,
            params=call.params,
            content=call.body,
            headers=headers,
            extensions=extensions,
        )
        deadline = self._settings.connect_timeout + self._settings.read_timeout
        started = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                response, complete = await self._exchange(request)
        except TimeoutError as exc:
            self._report(call, None, time.perf_counter() - started)
            raise ApiError(
                None,
                f"no response (the answer took longer than {deadline:g} s)",
                method=call.method,
                path=call.path,
            ) from exc
        except httpx.TransportError as exc:
            self._report(call, None, time.perf_counter() - started)
            detail = _truncate(str(exc)) or "no detail"
            raise ApiError(
                None,
                f"no response ({type(exc).__name__}: {detail})",
                method=call.method,
                path=call.path,
                unsent=isinstance(exc, NOT_SENT),
            ) from exc
        self._report(call, response.status_code, time.perf_counter() - started)
        if not complete and response.is_success:
            limit = self._settings.max_response_bytes
            raise ApiError(
                response.status_code,
                f"the answer is larger than {limit} bytes and was not read further"
                " (a smaller api.per_page makes pages smaller)",
                method=call.method,
                path=call.path,
            )
        return response

    async def _exchange(self, request: httpx.Request) -> tuple[httpx.Response, bool]:
        """Send `request` and read its answer up to the size bound; the response with the
        body read, and whether that was all of it."""
        response = await self._http.send(request, stream=True)
        try:
            limit = (
                self._settings.max_response_bytes if response.is_success else _FAILURE_BODY_BYTES
            )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk[: limit + 1 - len(body)]
                if len(body) > limit:
                    break  # leaving it unread drops the connection
            return _with_body(response, bytes(body[:limit])), len(body) <= limit
        finally:
            await response.aclose()

    def _report(self, call: _Call, status: int | None, seconds: float) -> None:
        if self._on_response is None:
            return
        try:
            self._on_response(call.method, call.template, status, seconds)
        except Exception:  # metrics must never break an API call
            _log.warning("emnify on_response callback failed", exc_info=True)


def _with_body(response: httpx.Response, body: bytes) -> httpx.Response:
    """A streamed response as a read one: the same status and headers, holding `body`."""
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _BODY_HEADERS]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=body,
        request=response.request,
        extensions=response.extensions,
    )


def event_window(start: datetime, end: datetime) -> str:
    """The `q` filter for a time window: `from:…Z,until:…Z`, UTC, whole seconds.

    `start` is rounded down and `end` up, so the window sent covers the one asked for.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("event window bounds must be timezone-aware datetimes (use UTC)")
    if start > end:
        raise ValueError(f"event window starts after it ends: {start} > {end}")
    since = start.astimezone(UTC).replace(microsecond=0)
    until_exact = end.astimezone(UTC)
    until = until_exact.replace(microsecond=0)
    if until != until_exact:
        until += timedelta(seconds=1)
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return f"from:{since.strftime(fmt)},until:{until.strftime(fmt)}"


def _retryable(call: _Call, error: BaseException) -> bool:
    """Whether to send `call` again at once. What may have reached emnify is repeated only
    when the call is idempotent; for the rest, the caller decides."""
    if not isinstance(error, ApiError):
        return False
    retry = error.retry
    return retry is Retry.AT_ONCE or (call.idempotent and retry is Retry.AT_ONCE_IF_IDEMPOTENT)


def _tracer(on_underway: Callable[[], None]) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """An httpcore `trace` callback that calls `on_underway` once the request has been written
    and the answer is awaited."""

    async def trace(name: str, info: dict[str, Any]) -> None:
        if name.endswith(".receive_response_headers.started"):
            on_underway()

    return trace


def _before_retry(call: _Call, state: RetryCallState) -> None:
    if call.on_underway is not None:
        call.on_underway()
    error = state.outcome.exception() if state.outcome else None
    _log.warning(
        "emnify request failed; retrying",
        method=call.method,
        path=call.path,
        status=error.status if isinstance(error, ApiError) else None,
        error=error.message if isinstance(error, ApiError) else type(error).__name__,
        attempt=state.attempt_number,
        wait=round(state.upcoming_sleep, 3),
    )


def _truncate(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _status_body(status_id: int) -> bytes:
    return orjson.dumps({"status": {"id": int(status_id)}})


def _json(response: httpx.Response, call: _Call) -> Any:
    try:
        # Leniently where orjson refuses valid JSON: refusing an event page would refuse it
        # at every poll, and the cursor could never pass it.
        return loads_json(response.content)
    except orjson.JSONDecodeError:
        error = api_error_from_response(response, method=call.method, path=call.path)
        raise ApiError(
            response.status_code,
            f"unreadable success response: {error.message}",
            method=call.method,
            path=call.path,
        ) from None


def _event_records(response: httpx.Response, call: _Call) -> list[Any]:
    """An event page's records, whatever each of them is: one record nested too deeply to
    read, or not an object, is the pipeline's to quarantine, not a reason to refuse the
    page (and every poll after it)."""
    try:
        body = loads_records(response.content)
    except orjson.JSONDecodeError:
        body = _json(response, call)  # raises, with the API's own error where it sent one
    if not isinstance(body, list):
        raise _unexpected(response, call, f"expected a JSON array, got {_kind(body)}")
    return body


def _id_of(record: Any) -> Any:
    return record.get("id") if isinstance(record, dict) else None


def _list_of_dicts(response: httpx.Response, call: _Call) -> list[dict[str, Any]]:
    body = _json(response, call)
    if not isinstance(body, list):
        raise _unexpected(response, call, f"expected a JSON array, got {_kind(body)}")
    for index, item in enumerate(body):
        if not isinstance(item, dict):
            raise _unexpected(response, call, f"item {index} is {_kind(item)}, not an object")
    return body


def _dict(response: httpx.Response, call: _Call) -> dict[str, Any]:
    body = _json(response, call)
    if not isinstance(body, dict):
        raise _unexpected(response, call, f"expected a JSON object, got {_kind(body)}")
    return body


def _unexpected(response: httpx.Response, call: _Call, what: str) -> ApiError:
    return ApiError(
        response.status_code,
        f"unexpected response body: {what}",
        method=call.method,
        path=call.path,
    )


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), "null" if value is None else "a number")


def _int_header(headers: httpx.Headers, name: str) -> int | None:
    """An integer paging header; absent or malformed counts as absent."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        _log.warning("emnify sent a malformed paging header", header=name, value=value[:40])
        return None
    return int(number) if math.isfinite(number) and number >= 0 else None


_TRAILING_ID = re.compile(r"/(\d+)/?$")


def _id_from_location(location: str | None) -> int | None:
    if not location:
        return None
    match = _TRAILING_ID.search(httpx.URL(location).path)
    return int(match.group(1)) if match else None
