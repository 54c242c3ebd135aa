"""`block_current_network`: put the network the event names on the endpoint's operator
blacklist (a roaming device stops using it)."""

from engine.actions._network import ChangeBlacklist


class BlockCurrentNetwork(ChangeBlacklist):
    kind = "block_current_network"
    summary = "blacklists the operator in the event's detail for the endpoint (already counts)"
    blocked = True
