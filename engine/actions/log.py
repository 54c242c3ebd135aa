"""`log`: write a line to the engine's log, e.g. for rules on trial or for audit trails."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import structlog

from engine.actions.base import Action, ActionContext, PlannedAction, check_params, require_str
from engine.errors import ConfigError, Location
from engine.templates import TemplateValue

_LEVELS = ("debug", "info", "warning", "error")
_DEFAULT_MESSAGE = "{{ event.event_type.description }}: {{ event.description }}"

_log = structlog.get_logger("engine.rule")


class Log(Action):
    kind = "log"

    def __init__(self, message: TemplateValue, level: str):
        self._message = message
        self._level = level

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: Location) -> Self:
        params = params or {}
        check_params(cls.kind, params, where, allowed=("message", "level"))
        message = require_str(cls.kind, params, "message", where) or _DEFAULT_MESSAGE
        level = (require_str(cls.kind, params, "level", where) or "info").lower()
        if level not in _LEVELS:
            raise ConfigError(f"`log.level` must be one of {', '.join(_LEVELS)}", where)
        return cls(TemplateValue(message, where, "log.message"), level)

    def render(self, template_context: Mapping[str, Any]) -> dict[str, Any]:
        return {"message": str(self._message.render(template_context)), "level": self._level}

    @classmethod
    async def run(cls, planned: PlannedAction, ctx: ActionContext) -> str:
        level = str(planned.params.get("level", "info"))
        getattr(_log, level if level in _LEVELS else "info")(
            str(planned.params.get("message", "")), **planned.target
        )
        return "logged"
