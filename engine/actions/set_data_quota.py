"""`set_data_quota`: ensure the endpoint's data quota (`POST /api/v1/endpoint/{id}/quota/data`)."""

from engine.actions._quota import SetQuota


class SetDataQuota(SetQuota):
    kind = "set_data_quota"
    summary = (
        "ensures the endpoint's data quota (MB, expiry, threshold); the same quota counts as done"
    )
    quota_kind = "data"
