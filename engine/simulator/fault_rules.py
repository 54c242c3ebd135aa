"""Fault rules: which requests fail, how, how often. Parsed once; drawn with a seeded RNG.

A rule is a JSON object, e.g.
`{"path": "^/api/v1/event$", "method": "GET", "kind": "503", "probability": 0.2, "count": 1}`.
`path` is a regular expression matched at the start of the request path (so a plain prefix
works), `method` is optional, `probability` defaults to 1 and `count` (fire at most N times)
to unlimited. The first rule that matches and fires decides; `/admin` is never faulted.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

STATUS_KINDS = frozenset({"403", "429", "500", "502", "503", "504"})
# Kinds that act around the handler (the middleware) and kinds the Event API handler asks for.
WRAPPING_KINDS = STATUS_KINDS | {"slow", "drop", "apply_then_fail", "expire_token", "no_access"}
PAGING_KINDS = frozenset({"duplicate_across_pages", "clamp_per_page"})
KINDS = WRAPPING_KINDS | PAGING_KINDS
BODIES = frozenset({"json", "error", "empty", "html"})


class FaultRuleError(ValueError):
    """A fault rule that does not make sense; the message names the field."""


@dataclass(frozen=True, slots=True)
class FaultRule:
    """One fault. Options by kind:

    - "403"/"429"/"500"/"502"/"503"/"504": `body` one of "json" (`{"message"}`), "error"
      (`{error_code, error_token, message}`), "empty", "html" (a CloudFront error page);
      default depends on the status. `retry_after` adds a `Retry-After` header (seconds).
    - "slow": wait `delay` seconds (default 30), then answer normally.
    - "drop": close the connection; `when` "before" (no response at all, the default) or
      "mid" (headers and part of the body, then close).
    - "apply_then_fail": run the request so its change takes effect, then answer `then`
      ("504", the default, or "drop"): the ambiguous failure.
    - "expire_token": revoke every issued auth token before the request is checked.
    - "no_access": answer 200 with `[]` and no pages, as emnify answers some list calls
      when the token may not see what was asked for: "no data" that is not "nothing there".
    - "duplicate_across_pages": on a page after the first, repeat the previous page's last event.
    - "clamp_per_page": lower the page-size maximum to `max_per_page` for matching requests.
    """

    kind: str
    path: str = ""
    method: str | None = None
    probability: float = 1.0
    count: int | None = None
    retry_after: float | None = None
    body: str | None = None
    delay: float = 30.0
    when: str = "before"
    then: str = "504"
    max_per_page: int | None = None
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaultRuleError(f"kind: unknown {self.kind!r}; one of {sorted(KINDS)}")
        try:
            object.__setattr__(self, "_pattern", re.compile(self.path))
        except re.error as exc:
            raise FaultRuleError(f"path: not a regular expression: {exc}") from None
        if not 0.0 <= self.probability <= 1.0:
            raise FaultRuleError("probability: must be between 0 and 1")
        if self.count is not None and self.count < 0:
            raise FaultRuleError("count: must not be negative")
        if self.body is not None and self.body not in BODIES:
            raise FaultRuleError(f"body: one of {sorted(BODIES)}")
        if self.when not in {"before", "mid"}:
            raise FaultRuleError("when: 'before' or 'mid'")
        if self.then not in {"504", "drop"}:
            raise FaultRuleError("then: '504' or 'drop'")
        if self.kind == "clamp_per_page" and (self.max_per_page or 0) < 1:
            raise FaultRuleError("max_per_page: a positive integer is required for clamp_per_page")

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> FaultRule:
        if not isinstance(data, Mapping):
            raise FaultRuleError("a fault rule must be a JSON object")
        known = {name for name in cls.__dataclass_fields__ if not name.startswith("_")}
        unknown = set(data) - known
        if unknown:
            raise FaultRuleError(f"unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        values["kind"] = str(values.get("kind", ""))
        if values.get("method") is not None:
            values["method"] = str(values["method"]).upper()
        try:
            return cls(**values)
        except TypeError as exc:
            raise FaultRuleError(str(exc)) from None

    def matches(self, method: str, path: str) -> bool:
        if self.method not in (None, "*", method):
            return False
        return self._pattern.match(path) is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_pattern", None)
        return data


class FaultPlan:
    """The active rules with their remaining counts. Not thread-safe; the state holds the lock."""

    def __init__(self, seed: int, rules: Iterable[FaultRule] = ()) -> None:
        self._rng = random.Random(f"faults:{seed}")
        self._rules: list[FaultRule] = []
        self._remaining: list[int | None] = []
        self._fired: list[int] = []
        self.replace(rules)

    def replace(self, rules: Iterable[FaultRule]) -> None:
        self._rules = list(rules)
        self._remaining = [rule.count for rule in self._rules]
        self._fired = [0 for _ in self._rules]

    def draw(self, method: str, path: str, kinds: frozenset[str]) -> FaultRule | None:
        """The rule that fires for this request, if any; counts it."""
        for index, rule in enumerate(self._rules):
            if rule.kind not in kinds or not rule.matches(method, path):
                continue
            if self._remaining[index] == 0:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            remaining = self._remaining[index]
            if remaining is not None:
                self._remaining[index] = remaining - 1
            self._fired[index] += 1
            return rule
        return None

    def describe(self) -> list[dict[str, Any]]:
        return [
            {**rule.to_json(), "remaining": remaining, "fired": fired}
            for rule, remaining, fired in zip(
                self._rules, self._remaining, self._fired, strict=True
            )
        ]
