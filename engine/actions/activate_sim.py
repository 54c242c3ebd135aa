"""`activate_sim`: Activate the event's SIM (status 1); a SIM already active counts as done."""

from engine.actions._status import StatusChange
from engine.actions.base import Lane


class ActivateSim(StatusChange):
    kind = "activate_sim"
    summary = "ensures the SIM is Activated"
    needs = "sim"
    lane = Lane.SIM
    destructive = False
    status_id = 1
    causes = frozenset({8})  # "SIM activation"
