"""`remove_tags`: ensure the endpoint no longer carries the tags; the others are kept."""

from engine.actions._tags import ChangeTags


class RemoveTags(ChangeTags):
    kind = "remove_tags"
    summary = "ensures the endpoint lacks the tags; its other tags are kept as written"
    present = False
