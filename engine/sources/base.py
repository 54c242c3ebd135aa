"""The contract of a source: where events come into the engine from.

A source is one module of `engine.sources` (or any module imported before the config is
read) holding one `Source` subclass, registered by the name an operator lists under
`sources:` in the config. Nothing else names it: the config loader asks it to read its own
section, the daemon builds, starts and stops every listed source the same way, `/readyz`
shows what its `readiness` says, the HTTP server mounts the routes it asks for, and every
batch it hands over through `SourceContext.ingest` is judged, committed and counted
(`/metrics`, the run's summary) under its name. docs/adding-a-source.md walks through one.

This module imports nothing heavier than the engine's errors: the config loader reads the
registry through it, and the core must not load the sources' I/O to do so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from engine.errors import EngineError, Location
from engine.lookups import LookupTable
from engine.ports import DedupHorizon, Meta, SeenEvents

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from engine.clock import Clock
    from engine.emnify import EmnifyClient
    from engine.metrics import Metrics
    from engine.pipeline import BatchResult

SettingsT = TypeVar("SettingsT")
_T = TypeVar("_T")


class SettingsSection(Protocol):
    """A source's own section of the config file (named like the source), as it reads its
    settings from it. Every getter marks its key as known (the loader reports the others
    as unknown options, with did-you-mean) and raises `ConfigError` with file:line."""

    @property
    def name(self) -> str: ...

    def get(self, key: str, convert: Callable[[Any, str], _T], default: _T) -> _T:
        """`convert(value, path)` turns the written value into the setting, or raises
        `ConfigError(message)` (the location is added); `default` when the key is absent."""
        ...

    def text(self, key: str, default: str) -> str: ...

    def flag(self, key: str, default: bool) -> bool: ...

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int: ...

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float: ...

    def duration(self, key: str, default: timedelta) -> timedelta:
        """`10s`, `5m`, `24h` (or a number of seconds)."""
        ...

    def path(self, key: str) -> Path | None:
        """A file's path, relative to the config file's folder unless absolute (`~` too)."""
        ...

    def secret(self, key: str, *, hint: str) -> str | None:
        """A `${NAME}` reference (resolved later, at start), never the secret itself."""
        ...

    def where(self, key: str) -> Location:
        """Where `key` is written; where the source is listed under `sources:` when it is
        not (a required key that is missing)."""
        ...


class SourceStore(Meta, SeenEvents, DedupHorizon, Protocol):
    """What a source may use of the store beside its batches: small named values (a
    cursor, its last run's outcome) and the seen ids (forgetting them past its horizon)."""


class Ingest(Protocol):
    """Hand records to the pipeline as one batch: judged, committed (with `cursor`, a time
    source's progress, when given) in one transaction, then counted under `source` and
    the dispatcher woken. `complete`: every event up to this time is now known (what
    absence rules judge silences on; a source that cannot promise it leaves it out).
    Raises `StoreError` when the store cannot take the batch (nothing of it counts; the
    same records may be handed over again)."""

    def __call__(
        self,
        records: Sequence[object],
        *,
        source: str,
        cursor: datetime | None = None,
        complete: datetime | None = None,
        lookups: LookupTable | None = None,
    ) -> BatchResult: ...


# Fetches the facts rules look up for records before they are handed to `Ingest`
# (`SourceContext.look_up`; None: no rule looks anything up).
LookUp = Callable[[Sequence[object]], Awaitable[LookupTable | None]]


class SourceContext(Protocol):
    """What the daemon gives a source: the one door into the pipeline and the few things
    a source may use beside it. Its `scheduler` runs jobs on the daemon's event loop."""

    @property
    def clock(self) -> Clock: ...

    @property
    def client(self) -> EmnifyClient: ...

    @property
    def organisation(self) -> str:
        """The organisation whose events the source's batches are (its name under
        `organisations:`); "" for the single organisation of a config without that key."""
        ...

    @property
    def store(self) -> SourceStore: ...

    @property
    def scheduler(self) -> AsyncIOScheduler: ...

    @property
    def metrics(self) -> Metrics: ...

    def ingest(
        self,
        records: Sequence[object],
        *,
        source: str,
        cursor: datetime | None = None,
        complete: datetime | None = None,
        lookups: LookupTable | None = None,
    ) -> BatchResult: ...

    async def look_up(self, records: Sequence[object]) -> LookupTable | None:
        """The facts the rules' `lookup` lists need for `records`, fetched within the
        lookups' budget (None: no rule looks anything up), to hand to `ingest`."""
        ...

    def emit_engine_event(
        self,
        kind: str,
        *,
        detail: Mapping[str, Any] | None = None,
        sim: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Say an engine event (`engine.engine_events`), judged like any other event."""
        ...


@dataclass(frozen=True, slots=True)
class Check:
    """One line of `/readyz`: ok or not, and why."""

    name: str
    ok: bool
    detail: str


class ClientGone(Exception):
    """Raised by a request's body iterator when the client closed the connection mid-body."""


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request to a source's route, without the web framework."""

    headers: Mapping[str, str]  # case-insensitive
    body: AsyncIterator[bytes]  # raises ClientGone when the client leaves mid-body
    # Seconds the body may take to arrive once the headers are in (`http.body_timeout`);
    # the route enforces it, as only it knows what waiting for a body includes.
    body_timeout: float | None


@dataclass(frozen=True, slots=True)
class Answer:
    """What a route answers: a status and a JSON body. A 408 also closes the connection."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Route:
    """An HTTP route a source needs on the daemon's server (a push source's ingress)."""

    path: str
    methods: tuple[str, ...]
    handle: Callable[[Request], Awaitable[Answer]]


class SourceError(EngineError):
    """A source is registered twice, or a listed source has no settings."""


class Source(ABC, Generic[SettingsT]):
    """One kind of source (see the module docstring). A subclass names itself in its class
    line, `class FileDrop(Source[FileDropSettings], name="file_drop")`, which registers it;
    the name is also its label: `source="file_drop"` in `/metrics`, the audit and the log.

    It is built once the daemon is (its context ready, nothing running yet), `start`ed
    when the daemon runs, and `stop`ped at shutdown: `stop` lets in-flight work finish
    and is cancelled when the daemon's grace runs out."""

    name: ClassVar[str]
    # True when the source needs the daemon's HTTP server (for its `routes`): the config
    # refuses to list it with `http.enabled: false`.
    serves_http: ClassVar[bool] = False
    # True when one instance of a cluster runs it at a time (the leader: a poller), its
    # batches committed under the leader lease; False when every instance runs it (a push
    # ingress behind a load balancer).
    leader_only: ClassVar[bool] = False
    # True when its batches tell how far event time is complete (`Ingest`'s `complete`):
    # absence rules judge silences only as far as such a source has read.
    tells_complete_time: ClassVar[bool] = False
    # Whether it delivers usage records (data and SMS traffic), which rules with `usage:`
    # judge (`engine.usage`).
    delivers_usage: ClassVar[bool] = False
    # True when its events are those of the organisation its context's client logs in to
    # (a poller, a stream): with `organisations:` in the config, the daemon builds one per
    # organisation, each over that organisation's context (`engine.organisation_run`).
    per_organisation: ClassVar[bool] = False

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            _register(cls)

    def __init__(self, settings: SettingsT, context: SourceContext) -> None:
        self.settings = settings
        self.context = context

    @classmethod
    @abstractmethod
    def read_settings(cls, section: SettingsSection, *, enabled: bool) -> SettingsT:
        """The source's settings from its config section. Read whether or not the source
        is listed (a section may be kept for later), so check what only matters for a
        running source (a required secret) when `enabled`."""

    @classmethod
    def check(cls, settings: SettingsT) -> None:
        """What must hold before the engine starts anything, e.g. a secret that must be
        set: raise `ConfigError` saying what to do. Runs at `run`'s start for listed
        sources."""

    @abstractmethod
    async def start(self) -> None:
        """Begin taking events in (schedule a job, open a connection); return once running."""

    @abstractmethod
    async def stop(self) -> None:
        """Take no more events in and let in-flight work finish."""

    def readiness(self) -> Check | None:
        """What `/readyz` shows for this source; None when there is nothing to check."""
        return None

    def startup_line(self) -> str:
        """How `run`'s start-up block names this source (its name, and what matters most
        of its settings)."""
        return self.name

    def routes(self) -> Sequence[Route]:
        """HTTP routes this source needs (set `serves_http` too)."""
        return ()


_registry: dict[str, type[Source[Any]]] = {}


def _register(kind: type[Source[Any]]) -> None:
    known = _registry.get(kind.name)
    if known is not None and _where(known) != _where(kind):
        raise SourceError(
            f"two sources are named {kind.name!r}: {_where(known)} and {_where(kind)}"
        )
    # The same class again (its module reloaded) replaces the old one.
    _registry[kind.name] = kind


def _where(kind: type[Source[Any]]) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def registry() -> Mapping[str, type[Source[Any]]]:
    """Every source registered so far, by name (see `engine.sources.registered`)."""
    return _registry
