"""`enable_endpoint`: Enable the event's endpoint (status 0); already enabled counts as done."""

from engine.actions._status import StatusChange


class EnableEndpoint(StatusChange):
    kind = "enable_endpoint"
    needs = "endpoint"
    destructive = False
    status_id = 0
