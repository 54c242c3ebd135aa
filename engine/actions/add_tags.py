"""`add_tags`: ensure the endpoint carries the tags (e.g. for billing); the others are kept."""

from engine.actions._tags import ChangeTags


class AddTags(ChangeTags):
    kind = "add_tags"
    summary = "ensures the endpoint has the tags; its other tags are kept as written"
    present = True
