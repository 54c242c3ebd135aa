"""`suspend_sim`: Suspend the event's SIM (status 2); a SIM already suspended counts as done."""

from engine.actions._status import StatusChange


class SuspendSim(StatusChange):
    kind = "suspend_sim"
    needs = "sim"
    destructive = True
    status_id = 2
