"""The emnify REST client: auth, retries, rate limits, paging and the calls the engine makes."""

from engine.emnify.client import ClientSettings, EmnifyClient, EventPage, event_window
from engine.emnify.errors import LoginError, api_error_from_response, parse_retry_after
from engine.emnify.status import EndpointStatus, SimStatus

__all__ = [
    "ClientSettings",
    "EmnifyClient",
    "EndpointStatus",
    "EventPage",
    "LoginError",
    "SimStatus",
    "api_error_from_response",
    "event_window",
    "parse_retry_after",
]
