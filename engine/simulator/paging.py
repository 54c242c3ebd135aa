"""emnify's collection paging: a bare JSON array, with the metadata in response headers.

Quirks kept on purpose (emnify-api.md §3.3): `per_page < 1` means the default, a too-large
`per_page` is clamped without a word, and a page past the end returns the last page again.
An empty result is `[]` with `x-total-pages: 0` and `x-current-page: 1`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import urlencode

T = TypeVar("T")


class PagingError(ValueError):
    """`page` or `per_page` is not a number."""


@dataclass(frozen=True, slots=True)
class PageRequest:
    page: int
    per_page: int


def page_request(
    params: Mapping[str, str], *, default_per_page: int, max_per_page: int
) -> PageRequest:
    try:
        page = int(params.get("page", "1"))
        per_page = int(params.get("per_page", str(default_per_page)))
    except ValueError:
        raise PagingError("page and per_page must be integers") from None
    if per_page < 1:
        per_page = default_per_page
    return PageRequest(page=max(page, 1), per_page=min(per_page, max_per_page))


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    page: int
    per_page: int
    total_count: int
    total_pages: int
    start: int


def cut_page(items: Sequence[T], request: PageRequest) -> Page[T]:
    total = len(items)
    total_pages = -(-total // request.per_page)
    page = min(request.page, max(total_pages, 1))
    start = (page - 1) * request.per_page
    return Page(
        items=items[start : start + request.per_page],
        page=page,
        per_page=request.per_page,
        total_count=total,
        total_pages=total_pages,
        start=start,
    )


def _link(path: str, params: Mapping[str, str], page: int, rel: str) -> str:
    query = urlencode({**params, "page": str(page)})
    return f'<{path}?{query}>; rel="{rel}"'


def paging_headers(
    page: Page[T], path: str, params: Mapping[str, str], sort: str | None = None
) -> dict[str, str]:
    """The lower-case headers the real API sends; `link` is empty when there is one page."""
    links: list[str] = []
    if page.total_pages > 1:
        links.append(_link(path, params, 1, "first"))
        if page.page > 1:
            links.append(_link(path, params, page.page - 1, "prev"))
        if page.page < page.total_pages:
            links.append(_link(path, params, page.page + 1, "next"))
        links.append(_link(path, params, page.total_pages, "last"))
    headers = {
        "x-count-per-page": str(page.per_page),
        "x-current-page": str(page.page),
        "x-total-count": str(page.total_count),
        "x-total-pages": str(page.total_pages),
    }
    if sort is not None:
        headers["x-sort"] = sort
    headers["link"] = ", ".join(links)
    return headers
