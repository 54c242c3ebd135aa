"""`log`: write a line to the engine's log, e.g. for rules on trial or for audit trails."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import structlog

from engine.actions.base import (
    Action,
    ActionContext,
    ActionParams,
    Lane,
    Parameter,
    require_str,
)
from engine.errors import ConfigError, Location
from engine.templates import TemplateValue

_LEVELS = ("debug", "info", "warning", "error")
_DEFAULT_MESSAGE = "{{ event.event_type.description }}: {{ event.description }}"

_log = structlog.get_logger("engine.rule")


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class LogLine(ActionParams):
    message: str
    level: str = "info"


@dataclass(frozen=True)
class Log(Action):
    kind = "log"
    summary = "writes a log line"
    parameters = (Parameter("message", "template"), Parameter("level"))
    params_type = LogLine
    # Beside the other actions on the event's endpoint, in the rule's order.
    lane = Lane.ENDPOINT

    message: TemplateValue
    level: str

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        message = require_str(cls.kind, params, "message", where) or _DEFAULT_MESSAGE
        level = (require_str(cls.kind, params, "level", where) or "info").lower()
        if level not in _LEVELS:
            raise ConfigError(f"`log.level` must be one of {', '.join(_LEVELS)}", where)
        return cls(TemplateValue(message, where, "log.message"), level)

    def params_for(self, template_context: Mapping[str, Any]) -> LogLine:
        return LogLine(str(self.message.render(template_context)), self.level)

    @classmethod
    async def run(cls, params: LogLine, ctx: ActionContext) -> str:
        target = ctx.target
        fields = {"sim_id": target.sim_id, "endpoint_id": target.endpoint_id, "iccid": target.iccid}
        getattr(_log, params.level if params.level in _LEVELS else "info")(
            params.message, **{k: v for k, v in fields.items() if v is not None}
        )
        return "logged"
