"""Hot reload of the rules: on SIGHUP, and when a rule file changes (watchfiles).

A reload loads the whole rule set again, resolving event-type names through the current
catalog. If the new set is invalid, every problem is logged with `file:line` and the rules
in force stay as they are. Otherwise the pipeline switches to the new set between two
batches, and the log says which rules were added, removed or changed.

Whatever a reload meets (an invalid file, one too costly to load, a failing listener, a bug)
is logged and leaves the rules in force: neither the file watcher nor a SIGHUP task ever
dies of it, so the next save is picked up. The loading itself runs in a worker thread, so a
large rule set does not stall the event loop (health checks, ingress) while it loads.

State is keyed on the rule id, so a rule whose id is unchanged keeps its threshold window,
throttle marks and pending follow-ups. The exception: when its `when`, `condition`,
`threshold` or `usage` changed, what its window counted no longer means the same, so the window is
reset (and the log says so); throttles and follow-ups are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import watchfiles

from engine.cron import check_crontab
from engine.errors import ConfigError, RuleSetError, StoreError
from engine.rules import EventTypeCatalog, Rule, RuleSet, load_rules
from engine.rules.loader import RULE_FILE_SUFFIXES

if TYPE_CHECKING:
    from engine.pipeline import Pipeline
    from engine.services import ServiceContext

_log = structlog.get_logger(__name__)

# The parts of a rule that decide what its threshold (or usage) window counts.
_WINDOW_PARTS = ("when", "condition", "threshold", "usage")


@dataclass(slots=True)
class RuleChanges:
    """What a reload changed, by rule id. `windows_reset` maps a rule to the parts whose
    change reset its threshold window."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    windows_reset: dict[str, list[str]] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def compare(old: RuleSet, new: RuleSet) -> RuleChanges:
    """The difference between two rule sets, as a reload reports it."""
    changes = RuleChanges()
    for rule in new:
        before = old.get(rule.id)
        if before is None:
            changes.added.append(rule.id)
            continue
        if before.definition != rule.definition:
            changes.changed.append(rule.id)
        parts = _window_parts_changed(before, rule)
        if parts:
            changes.windows_reset[rule.id] = parts
    changes.removed = [rule.id for rule in old if new.get(rule.id) is None]
    return changes


def _window_parts_changed(before: Rule, after: Rule) -> list[str]:
    # Compared as loaded, not as written: `type: "Quota used up"` → `type: 19` is no change.
    changed = {
        "when": before.when != after.when,
        "condition": before.condition_source != after.condition_source,
        "threshold": before.threshold != after.threshold,
        "usage": before.usage != after.usage,
    }
    if before.absence is not None or after.absence is not None:
        # The keys an absence watches: a new `per` names other keys; a new `when` or
        # `condition` other sightings (`for` and `forget_after` keep what was seen).
        per = (before.absence and before.absence.per) != (after.absence and after.absence.per)
        absence = {**changed, "absence": per}
        return [part for part in (*_WINDOW_PARTS[:2], "absence") if absence[part]]
    if (before.threshold, before.usage, after.threshold, after.usage) == (None,) * 4:
        return []  # no window to reset
    return [part for part in _WINDOW_PARTS if changed[part]]


class RuleReloader:
    """The daemon service that reloads the rules at `path` on SIGHUP and on file changes.

    `catalog` gives the event-type catalog names resolve through at each reload;
    `on_reload` hears of every new rule set put in force (the digests re-schedule)."""

    def __init__(
        self,
        path: Path,
        *,
        catalog: Callable[[], EventTypeCatalog] = EventTypeCatalog.bundled,
        watch: bool = True,
        debounce: float = 1.0,
        on_reload: Sequence[Callable[[RuleSet], None]] = (),
        organisations: Mapping[str, Path | None] | None = None,
    ):
        """`organisations`: the config's organisations and their own rule folders
        (`load_rules`); their folders are reloaded with the rest on SIGHUP."""
        self.path = Path(path)
        self._organisations = organisations
        self._catalog = catalog
        self._watch_files = watch
        self._debounce_ms = max(1, int(debounce * 1000))
        self._listeners = list(on_reload)
        self._pipeline: Pipeline | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[RuleChanges | None]] = set()
        self._signal_installed = False
        self.ready = asyncio.Event()  # set once the file watcher is watching

    async def start(self, context: ServiceContext) -> None:
        self.attach(context.pipeline)
        loop = asyncio.get_running_loop()
        # Not possible outside the main thread or on Windows: the file watcher still works.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.request, "SIGHUP")
            self._signal_installed = True
        if self._watch_files:
            self._stop.clear()
            self._watcher = asyncio.create_task(self._watch())

    def attach(self, pipeline: Pipeline) -> None:
        """Reload into `pipeline` (what `start` does with the daemon's)."""
        self._pipeline = pipeline

    async def stop(self) -> None:
        if self._signal_installed:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._signal_installed = False
        self._stop.set()
        if self._watcher is not None:
            try:
                await asyncio.wait_for(self._watcher, timeout=2.0)
            except TimeoutError:
                self._watcher.cancel()
            self._watcher = None
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)

    def request(self, reason: str) -> None:
        """Ask for a reload soon (from a signal handler or a callback)."""
        task = asyncio.get_running_loop().create_task(self.reload(reason))
        self._pending.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[RuleChanges | None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("rule reload failed", error=repr(task.exception()))

    async def reload(self, reason: str = "requested") -> RuleChanges | None:
        """Load the rules again and put them in force if they are valid. Returns what
        changed, or None when the new set was rejected (the old one stays)."""
        pipeline = self._attached()
        async with self._lock:
            try:
                new = await asyncio.to_thread(self._load)
            except Exception as error:  # anything at all: the rules in force stay
                _rejected(error, reason, self.path)
                return None
            return self._put_in_force(pipeline, new, reason)

    def reload_now(self, reason: str) -> RuleChanges | None:
        """`reload`, in this thread (for callers without an event loop)."""
        pipeline = self._attached()
        try:
            new = self._load()
        except Exception as error:  # anything at all: the rules in force stay
            _rejected(error, reason, self.path)
            return None
        return self._put_in_force(pipeline, new, reason)

    def _attached(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("RuleReloader.reload before start/attach")
        return self._pipeline

    def _load(self) -> RuleSet:
        return load_rules(
            self.path,
            catalog=self._catalog(),
            cron=check_crontab,
            organisations=self._organisations,
        )

    def _put_in_force(self, pipeline: Pipeline, new: RuleSet, reason: str) -> RuleChanges | None:
        try:
            changes = compare(pipeline.rules, new)
        except Exception as error:  # a bug in comparing must not stop reloading
            _rejected(error, reason, self.path)
            return None
        for rule_id, parts in changes.windows_reset.items():
            try:
                _reset_windows(pipeline, rule_id)
            except StoreError as error:
                _log.error(
                    "rules not reloaded: the state store could not reset a changed rule's "
                    "window; the previous rules stay active",
                    reason=reason,
                    rule_id=rule_id,
                    error=str(error),
                )
                return None
            counted = new.get(rule_id)
            _log.warning(
                "rule's absence keys forgotten: what it watches changed"
                if counted is not None and counted.absence is not None
                else "rule's threshold window reset: what it counts changed",
                rule_id=rule_id,
                changed=parts,
            )
        pipeline.set_rules(new)
        _log.info(
            "rules reloaded" if changes.any else "rules reloaded, no rule changed",
            reason=reason,
            rules=len(new),
            added=changes.added,
            removed=changes.removed,
            changed=changes.changed,
        )
        for listener in self._listeners:
            try:
                listener(new)
            except Exception as error:  # the rules are in force; the listener's work is not
                _log.error(
                    "rules reloaded, but a listener failed",
                    listener=getattr(listener, "__qualname__", repr(listener)),
                    error=f"{type(error).__name__}: {error}",
                )
        return changes

    # -- watching ------------------------------------------------------------------------

    async def _watch(self) -> None:
        directory, accepts = self._watched()
        try:
            watcher = watchfiles.awatch(
                directory,
                watch_filter=lambda _change, name: accepts(Path(name)),
                debounce=self._debounce_ms,
                step=min(50, self._debounce_ms),
                stop_event=self._stop,
                recursive=False,
            )
            self.ready.set()
            async for changed in watcher:
                names = sorted({Path(name).name for _, name in changed})
                try:
                    await self.reload("changed: " + ", ".join(names))
                except Exception as error:  # reload logs its own failures; this is a bug
                    _log.error("rule reload failed; still watching", error=repr(error))
        except (OSError, RuntimeError) as error:
            _log.error(
                "not watching the rule files; reload with SIGHUP",
                path=str(self.path),
                error=str(error),
            )
        finally:
            self.ready.set()

    def _watched(self) -> tuple[Path, Callable[[Path], bool]]:
        """The folder to watch and which paths in it are rule files. A single rule file is
        watched through its folder, so an editor's save-by-rename is seen too."""
        path = self.path.resolve()
        if path.is_dir():
            return path, lambda p: p.parent == path and p.suffix in RULE_FILE_SUFFIXES
        return path.parent, lambda p: p.name == path.name


def _rejected(error: Exception, reason: str, path: Path) -> None:
    """Log why a new rule set was not put in force: each problem with its `file:line`."""
    if isinstance(error, RuleSetError | ConfigError):
        problems = error.errors if isinstance(error, RuleSetError) else [error]
        for problem in problems:
            _log.error("invalid rule", problem=str(problem))
        _log.error(
            "rules not reloaded: the new set is invalid; the previous rules stay active",
            reason=reason,
            problems=len(problems),
            path=str(path),
        )
        return
    _log.error(
        "rules not reloaded: loading them failed; the previous rules stay active",
        reason=reason,
        error=f"{type(error).__name__}: {error}"[:1000],
        path=str(path),
    )


def _reset_windows(pipeline: Pipeline, rule_id: str) -> None:
    pipeline.reset_rule_windows(rule_id)
