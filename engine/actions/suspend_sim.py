"""`suspend_sim`: Suspend the event's SIM (status 2); a SIM already suspended counts as done."""

from engine.actions._status import StatusChange
from engine.actions.base import Lane


class SuspendSim(StatusChange):
    kind = "suspend_sim"
    summary = "ensures the SIM is Suspended (already suspended counts as done)"
    needs = "sim"
    lane = Lane.SIM
    destructive = True
    status_id = 2
    causes = frozenset({9})  # "SIM suspension"
