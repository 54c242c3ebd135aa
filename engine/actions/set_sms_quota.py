"""`set_sms_quota`: ensure the endpoint's SMS quota (`POST /api/v1/endpoint/{id}/quota/sms`)."""

from engine.actions._quota import SetQuota


class SetSmsQuota(SetQuota):
    kind = "set_sms_quota"
    summary = "ensures the endpoint's SMS quota (volume in messages); the same quota counts as done"
    quota_kind = "sms"
