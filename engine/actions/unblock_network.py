"""`unblock_network`: take the network (the event's, or `operator_id`) off the endpoint's
operator blacklist: the undo of `block_current_network`."""

from engine.actions._network import ChangeBlacklist


class UnblockNetwork(ChangeBlacklist):
    kind = "unblock_network"
    summary = "takes the event's operator (or `operator_id`) off the endpoint's blacklist"
    blocked = False
