"""What `add_tags` and `remove_tags` share: the endpoint's tags are one comma-separated
string (`"fleet,berlin"`, or null), changed by `PATCH /api/v1/endpoint/{id}` `{"tags": ...}`
with the whole string (emnify-api.md §13 [OAS]: read, change, write back).

The other tags are kept exactly as they were written (their order, their spelling, any
space around them): only the tags the rule names are added at the end or taken out, and a
string that already is as wanted is not written at all. A tag is compared without the
spaces around it, as emnify's tag filters do. Tags hold no comma (it is the separator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.errors import ActionError, ConfigError, Location


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class TagParams(ActionParams):
    tags: list[str]


def parse_tags(kind: str, value: Any, where: Location) -> list[str]:
    """`tags: [a, b]` or `tags: a` (one tag), each non-empty and without a comma."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"`{kind}.tags` must be a tag or a list of tags", where)
    tags: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"`{kind}.tags` holds a tag that is not text: {item!r}", where)
        if "," in item:
            raise ConfigError(f"`{kind}.tags`: {item!r} holds a comma, which separates tags", where)
        if item.strip() not in tags:
            tags.append(item.strip())
    return tags


def split(text: str | None) -> list[str]:
    """The tags of a tags string as written (spaces kept); none for null or ""."""
    return [] if not text else text.split(",")


def with_tags(current: str | None, tags: Sequence[str], present: bool) -> str | None:
    """`current` with `tags` added at the end (`present`) or taken out; the others as written.
    None (no tags at all) when nothing is left."""
    items = split(current)
    names = {item.strip() for item in items}
    if present:
        items += [tag for tag in tags if tag not in names]
    else:
        items = [item for item in items if item.strip() not in tags]
    return ",".join(items) if items else None


@dataclass(frozen=True)
class ChangeTags(Action):
    present: ClassVar[bool]
    parameters = (Parameter("tags", "a tag or a list", required=True),)
    params_type = TagParams
    needs = "endpoint"
    lane = Lane.ENDPOINT
    looks_first = True

    tags: tuple[str, ...]

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        return cls(tuple(parse_tags(cls.kind, params.get("tags"), where)))

    def params_for(self, template_context: Mapping[str, Any]) -> TagParams:
        return TagParams(list(self.tags))

    @classmethod
    async def current(cls, ctx: ActionContext) -> tuple[int, str | None]:
        if ctx.target.endpoint_id is None:
            raise ActionError(f"{cls.kind}: no endpoint_id in the target")
        endpoint = await ctx.emnify.get_endpoint(ctx.target.endpoint_id)
        tags = endpoint.get("tags")
        return ctx.target.endpoint_id, tags if isinstance(tags, str) else None

    @classmethod
    async def effect(cls, params: TagParams, ctx: ActionContext) -> str | None:
        _, tags = await cls.current(ctx)
        return "already" if with_tags(tags, params.tags, cls.present) == (tags or None) else None

    @classmethod
    async def run(cls, params: TagParams, ctx: ActionContext) -> str:
        endpoint_id, tags = await cls.current(ctx)
        wanted = with_tags(tags, params.tags, cls.present)
        if wanted == (tags or None):
            return "already"
        await ctx.emnify.update_endpoint(endpoint_id, {"tags": wanted})
        return "done"
