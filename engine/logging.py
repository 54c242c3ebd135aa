"""structlog set-up: JSON lines when stdout is not a terminal, readable lines when it is.
Known secrets are blanked from every event before it is rendered.

On a terminal a line reads time, level, message, then what a person looks for first —
which rule, how it ended, which action, for which event and SIM — and the rest in the order
it was logged (sorted keys would put `action` first and `rule` past the screen's edge)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from engine import secrets


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return secrets.redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: no known secret value survives into a log line."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict


# The keys a person scans a line for, in this order, ahead of the rest.
_FIRST_KEYS = ("rule", "rule_id", "outcome", "action", "event_id", "iccid")


def person_order(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor for the console: `_FIRST_KEYS` first, then the others as logged."""
    ordered = {key: event_dict[key] for key in _FIRST_KEYS if key in event_dict}
    ordered.update((key, value) for key, value in event_dict.items() if key not in ordered)
    return ordered


def _redact_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    # A last check on the finished line, for values a renderer produced itself.
    return secrets.redact(rendered) if isinstance(rendered, str) else rendered


class _RedactingFormatter(logging.Formatter):
    """For the standard library's loggers (apscheduler, asyncio, uvicorn): their messages
    and tracebacks are blanked of known secrets too."""

    def format(self, record: logging.LogRecord) -> str:
        return secrets.redact(super().format(record))


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog (and the stdlib loggers of our libraries) once per process."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # For a person, UTC to the second as `why` and `status` print times; exact for JSON.
        structlog.processors.TimeStamper(fmt="iso" if as_json else "%Y-%m-%dT%H:%M:%SZ", utc=True),
        # Tracebacks become text before the redactor runs, so an exception message quoting
        # a secret is blanked before any renderer escapes it beyond recognition.
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    if as_json:
        processors += [structlog.processors.JSONRenderer(), _redact_rendered]
    else:
        processors += [
            person_order,
            structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False, pad_event_to=20),
            _redact_rendered,
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library: keep them quiet unless something is wrong.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_RedactingFormatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for noisy in ("httpx", "httpcore", "apscheduler", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
