"""An HTTP/1.1 receiver on loopback, written at the socket level, for the answers no
well-behaved server gives: trickled a byte at a time, endless, or never. It runs in the
test's own event loop, records each request's head as it arrived on the wire, and counts
what it managed to send before the other side hung up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

Answer = Callable[["RawReceiver", bytes, asyncio.StreamWriter], Awaitable[None]]

OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class RawReceiver:
    """`answer(receiver, request_head, writer)` writes the reply for each request, through
    `send` so that the bytes sent are counted."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.heads: list[bytes] = []  # request line and headers, as received
        self.bytes_sent = 0
        self.open_now = 0
        self.most_open = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def targets(self) -> list[str]:
        """The request targets (path and query), as sent."""
        return [head.split(b" ", 2)[1].decode("latin-1") for head in self.heads]

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.hang_up()

    async def hang_up(self) -> None:
        """Stop listening and drop every connection: calls in flight fail at once, and
        calls after them cannot connect."""
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.bytes_sent += len(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.heads.append(head)
                await self._answer(self, head, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up
        except asyncio.CancelledError:
            pass  # `hang_up`; ends the task quietly (asyncio's stream server logs a cancel)
        finally:
            self.open_now -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)


async def answer_ok(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
    await receiver.send(writer, OK_EMPTY)


async def answer_never(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
    await asyncio.Event().wait()


def trickle(text: bytes, every: float) -> Answer:
    """Send `text` one byte every `every` seconds: each read gets a byte well within any
    per-read timeout, and the whole takes `len(text) * every`."""

    async def answer(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
        for index in range(len(text)):
            await receiver.send(writer, text[index : index + 1])
            await asyncio.sleep(every)

    return answer


def endless_body(status: int, size: int, head_lines: bytes = b"") -> Answer:
    """Answer `status` with a body of `size` bytes, sent as fast as the client reads it."""
    chunk = b"x" * 65536

    async def answer(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
        await receiver.send(
            writer,
            b"HTTP/1.1 %d Answer\r\nContent-Length: %d\r\n%s\r\n" % (status, size, head_lines),
        )
        left = size
        while left > 0:
            await receiver.send(writer, chunk[: min(left, len(chunk))])
            left -= len(chunk)

    return answer
