"""`enable_endpoint`: Enable the event's endpoint (status 0); already enabled counts as done."""

from engine.actions._status import StatusChange
from engine.actions.base import Lane


class EnableEndpoint(StatusChange):
    kind = "enable_endpoint"
    summary = "ensures the endpoint is Enabled"
    needs = "endpoint"
    lane = Lane.ENDPOINT
    destructive = False
    status_id = 0
    causes = frozenset({42})  # "Endpoint enabled"
