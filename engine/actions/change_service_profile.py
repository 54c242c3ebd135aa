"""`change_service_profile`: ensure the endpoint's service profile (by id or by name), e.g.
a throttled one, with an optional connectivity reset so the device gets it at once."""

from engine.actions._profile import ChangeProfile


class ChangeServiceProfile(ChangeProfile):
    kind = "change_service_profile"
    summary = "ensures the endpoint's service profile (id or name), optionally resets connectivity"
    profile_kind = "service_profile"
