"""`disable_endpoint`: Disable the event's endpoint (status 1); already disabled counts as done."""

from engine.actions._status import StatusChange


class DisableEndpoint(StatusChange):
    kind = "disable_endpoint"
    needs = "endpoint"
    destructive = True
    status_id = 1
