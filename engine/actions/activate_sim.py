"""`activate_sim`: Activate the event's SIM (status 1); a SIM already active counts as done."""

from engine.actions._status import StatusChange


class ActivateSim(StatusChange):
    kind = "activate_sim"
    needs = "sim"
    destructive = False
    status_id = 1
