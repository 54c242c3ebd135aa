"""Data Streamer push mode: newly stored events go out as JSON-array batches to a webhook.

Like emnify's RestAPI stream (emnify-api.md §8): static custom headers, bodies that are arrays
of event records, at-least-once delivery. A non-2xx answer or a transport error is retried
with the same batch after an exponential backoff, forever; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from engine.simulator.state import SimulatorState


@dataclass(slots=True)
class StreamerStats:
    delivered_batches: int = 0
    delivered_events: int = 0
    failed_attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None


class StreamerPusher:
    """Pushes events stored after it was created; `start()` runs it as a task in this loop."""

    def __init__(
        self,
        state: SimulatorState,
        url: str,
        headers: Mapping[str, str] | None = None,
        batch_size: int = 100,
        interval_s: float = 1.0,
        *,
        method: str = "POST",
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._state = state
        self._url = url
        self._headers = {"content-type": "application/json", **(headers or {})}
        self._batch_size = batch_size
        self._interval = interval_s
        self._method = method
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._timeout = timeout_s
        self._position = state.store_position()
        self._task: asyncio.Task[None] | None = None
        self.stats = StreamerStats()

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="simulator-streamer")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            while True:
                records, after = self._state.events_since(self._position, self._batch_size)
                if records:
                    await self._deliver(client, records)
                    self._position = after
                if len(records) < self._batch_size:
                    # A full batch goes out at once; a partial one waits for the interval.
                    await asyncio.sleep(self._interval)

    async def _deliver(self, client: httpx.AsyncClient, records: list[dict[str, Any]]) -> None:
        body = orjson.dumps(records)
        delay = self._retry_initial
        while True:
            try:
                response = await client.request(
                    self._method, self._url, content=body, headers=self._headers
                )
                self.stats.last_status = response.status_code
                if response.is_success:
                    self.stats.delivered_batches += 1
                    self.stats.delivered_events += len(records)
                    self.stats.last_error = None
                    return
                self.stats.last_error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                self.stats.last_status = None
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self.stats.failed_attempts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)
