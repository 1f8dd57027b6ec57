"""A far link on loopback: a TCP relay that holds every chunk `delay` seconds each way before
passing it on, in order, so a broker on 127.0.0.1 answers as one a round trip of 2 x `delay`
away would (the bytes are not held back by one another: many can be on their way at once, as
on a real long path)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Self

from controller.web.listening import stop_accepting


@dataclass
class DelayedLink:
    """Listens on a free loopback port; each connection is relayed to `upstream_port`."""

    upstream_port: int
    delay: float
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _closing: bool = False  # a connection accepted as it closes is closed, not relayed

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._closing = True
        if self._server is not None:
            await stop_accepting(self._server)
            self._server.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        if self._closing:  # closed while it connected upstream
            writer.close()
            up_writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Read as it comes; each chunk goes out `delay` after it came, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    return
                sink.write(chunk)
                await sink.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                chunk = await source.read(65536)
                queue.put_nowait((loop.time() + self.delay, chunk))
                if not chunk:
                    break
            await sender
        except ConnectionError:
            pass  # one end went: so does this side
        finally:
            sender.cancel()
            with contextlib.suppress(ConnectionError, RuntimeError):
                sink.close()
