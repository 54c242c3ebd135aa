"""A throw-away source, added the way docs/adding-a-source.md says: this one module and
nothing else. `file_drop` reads event records that something appends to a JSON-lines file,
every `every`, and hands each new batch to the pipeline. tests/test_source_registry.py
configures it by name and runs the daemon over it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import orjson
from apscheduler.jobstores.base import JobLookupError

from engine.errors import ConfigError, StoreError
from engine.sources.base import Check, SettingsSection, Source, SourceContext


@dataclass(frozen=True, slots=True)
class FileDropSettings:
    path: Path | None = None
    every: timedelta = timedelta(seconds=1)


class FileDrop(Source[FileDropSettings], name="file_drop"):
    @classmethod
    def read_settings(cls, section: SettingsSection, *, enabled: bool) -> FileDropSettings:
        defaults = FileDropSettings()
        settings = FileDropSettings(
            path=section.path("path"), every=section.duration("every", defaults.every)
        )
        if enabled and settings.path is None:
            raise ConfigError(
                f"the {cls.name} source needs `{section.name}.path`",
                section.where("path"),
                hint="the JSON-lines file events are appended to",
            )
        return settings

    def __init__(self, settings: FileDropSettings, context: SourceContext) -> None:
        super().__init__(settings, context)
        self.offset = 0  # bytes of the file handed over so far
        self.read_at: datetime | None = None
        self.error: str | None = None

    async def start(self) -> None:
        self.context.scheduler.add_job(
            self.read_new,
            "interval",
            seconds=self.settings.every.total_seconds(),
            next_run_time=self.context.clock(),
            id=f"source:{self.name}",
            max_instances=1,
            coalesce=True,
        )

    async def stop(self) -> None:
        with contextlib.suppress(JobLookupError):
            self.context.scheduler.remove_job(f"source:{self.name}")

    async def read_new(self) -> None:
        """Hand over the complete lines appended since the last read, as one batch."""
        assert self.settings.path is not None
        try:
            with self.settings.path.open("rb") as file:
                file.seek(self.offset)
                data = file.read()
        except OSError as error:
            self.error = f"cannot read {self.settings.path}: {error.strerror}"
            return
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        records = [_record(line) for line in complete.splitlines() if line.strip()]
        try:
            if records:
                self.context.ingest(records, source=self.name)
        except StoreError as error:
            self.error = str(error)  # not handed over: read again next time
            return
        self.offset += len(complete)
        self.read_at, self.error = self.context.clock(), None

    def readiness(self) -> Check:
        if self.error is not None:
            return Check(self.name, False, self.error)
        if self.read_at is None:
            return Check(self.name, False, "not read yet")
        return Check(self.name, True, f"{self.offset} bytes read")


def _record(line: bytes) -> object:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return line.decode("utf-8", "replace")  # quarantined by the pipeline, not lost
