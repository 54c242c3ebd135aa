"""`change_tariff_profile`: ensure the endpoint's tariff profile (by id or by name), with an
optional connectivity reset so the device gets it at once."""

from engine.actions._profile import ChangeProfile


class ChangeTariffProfile(ChangeProfile):
    kind = "change_tariff_profile"
    summary = "ensures the endpoint's tariff profile (id or name), optionally resets connectivity"
    profile_kind = "tariff_profile"
