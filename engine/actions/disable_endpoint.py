"""`disable_endpoint`: Disable the event's endpoint (status 1); already disabled counts as done."""

from engine.actions._status import StatusChange
from engine.actions.base import Lane


class DisableEndpoint(StatusChange):
    kind = "disable_endpoint"
    summary = "ensures the endpoint is Disabled"
    needs = "endpoint"
    lane = Lane.ENDPOINT
    destructive = True
    status_id = 1
    causes = frozenset({43})  # "Endpoint disabled"
