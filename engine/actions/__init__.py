"""Action kinds. `ACTIONS` is the only list of them: adding a kind means adding a module
here and one line below."""

from collections.abc import Mapping

from engine.actions.activate_sim import ActivateSim
from engine.actions.base import Action, ActionContext, PlannedAction
from engine.actions.disable_endpoint import DisableEndpoint
from engine.actions.enable_endpoint import EnableEndpoint
from engine.actions.log import Log
from engine.actions.send_sms import SendSms
from engine.actions.suspend_sim import SuspendSim
from engine.actions.webhook import Webhook

ACTIONS: Mapping[str, type[Action]] = {
    cls.kind: cls
    for cls in (SuspendSim, ActivateSim, DisableEndpoint, EnableEndpoint, SendSms, Webhook, Log)
}

__all__ = ["ACTIONS", "Action", "ActionContext", "PlannedAction"]
