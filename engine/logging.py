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


# The message apscheduler warns with whenever a job is due while its last run goes on: a
# poll that outlasts the interval, which is normal (the next poll takes up where it ended).
_STILL_RUNNING = "maximum number of running instances reached"


class _StillRunningIsNormal(logging.Filter):
    """apscheduler's "skipped: maximum number of running instances reached" is a debug
    line, shown only when the log level is debug."""

    def __init__(self, shown: bool) -> None:
        super().__init__()
        self.shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("apscheduler") and _STILL_RUNNING in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.shown
        return True


# The handler `configure` put on the root logger (replaced when it runs again).
_handler: logging.Handler | None = None


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog, and the standard library's loggers (apscheduler, asyncio, uvicorn)
    rendered the same way: with JSON lines every line is JSON, the libraries' too."""
    global _handler
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    # For a person, UTC to the second as `why` and `status` print times; exact for JSON.
    stamp = structlog.processors.TimeStamper(
        fmt="iso" if as_json else "%Y-%m-%dT%H:%M:%SZ", utc=True
    )
    shared: list[Any] = [structlog.processors.add_log_level, stamp]
    # Tracebacks become text before the redactor runs, so an exception message quoting a
    # secret is blanked before any renderer escapes it beyond recognition.
    redacted: list[Any] = [structlog.processors.format_exc_info, redact_secrets]
    rendered: list[Any]
    if as_json:
        rendered = [structlog.processors.JSONRenderer(), _redact_rendered]
    else:
        rendered = [
            person_order,
            structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False, pad_event_to=20),
            _redact_rendered,
        ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, *redacted, *rendered],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library: the same renderer, their logger's name
    # as `logger`; quiet unless something is wrong.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *redacted,
                *rendered,
            ],
        )
    )
    handler.addFilter(_StillRunningIsNormal(shown=numeric <= logging.DEBUG))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    _handler = handler
    for noisy in ("httpx", "httpcore", "apscheduler", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
