"""`GET /api/v1/events`: the daemon's state as server-sent events, for the live page and anyone
who would rather be told than poll.

A client gets a `snapshot` first (what `GET /api/v1/state` shows, with the id of the newest
event it already holds), then every event the bus publishes, typed (`verdict`, `action`,
`ramp`, `drift`, `lease`, `operator`) and in order, each with its `id:` (`BOOT-N`: N the bus's
id, BOOT this run of the daemon's). A client that reconnects with `Last-Event-ID` (browsers'
EventSource do by themselves) gets what it missed from the bus's history, or a fresh snapshot
when the history no longer holds all of it or the id is from before a restart. A
comment line every `heartbeat` seconds keeps proxies from closing an idle stream and lets a
client see a dead one.

No client slows the daemon or another client: each has a bounded queue of its own on the bus
(publishing never waits) and a bounded time to take each write. A client that falls `queue`
events behind, or leaves a write unread for `write_timeout`, is disconnected and counted; it
reconnects with its `Last-Event-ID` and catches up from the history, or from a snapshot. Each
event is encoded once, whatever the number of clients.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Callable

    from controller.events.bus import Bus, Subscription
    from controller.events.kinds import Event

log = structlog.get_logger("regionshift.web")

HEARTBEAT = 15.0  # seconds between comment lines on an idle stream
QUEUE = 256  # events a client may be behind before it is disconnected
WRITE_TIMEOUT = 10.0  # seconds a client may leave one write unread before it is disconnected
# A client's share of kernel memory: what one that stops reading leaves queued there before its
# writes block (and time out), instead of the megabytes a loopback or LAN socket grows to.
SEND_BUFFER = 64 * 1024
LOOK = 1.0  # seconds between looks at whether an idle client's connection is still there
ENCODED = 1024  # encoded events kept, newest first: each is encoded once for every client


class StreamMetrics(Protocol):
    """What the stream counts (the daemon's metrics implement it)."""

    def stream_clients(self, count: int) -> None: ...

    def stream_dropped(self, reason: str) -> None: ...

    def stream_sent(self, events: int) -> None: ...


@dataclass
class StreamSettings:
    heartbeat: float = HEARTBEAT
    queue: int = QUEUE
    write_timeout: float = WRITE_TIMEOUT


class _Behind(Exception):  # noqa: N818 - a reason to disconnect, not an error
    """The client fell further behind than its queue holds."""


class EventStream:
    def __init__(
        self,
        bus: Bus,
        snapshot: Callable[[], dict[str, Any]],
        metrics: StreamMetrics | None = None,
        settings: StreamSettings | None = None,
    ) -> None:
        self.bus = bus
        self.snapshot = snapshot
        self.metrics = metrics
        self.settings = settings or StreamSettings()
        self.clients = 0
        self._encoded: OrderedDict[int, bytes] = OrderedDict()
        # Each open stream's subscription and connection: a stop ends them all at once.
        self._streams: dict[Subscription, asyncio.Transport | None] = {}
        # Event ids are the bus's, which start at 1 in every process: a client's Last-Event-ID
        # from before a restart must not pass for one of this process (it would skip events).
        self.boot = secrets.token_hex(4)

    async def close(self, _: web.Application | None = None) -> None:
        """End every stream at once (the server is shutting down: aiohttp's `on_shutdown`). The
        connections are aborted, not closed: a client that stopped reading would otherwise hold
        the stop while aiohttp waits to finish its response."""
        for subscription, transport in list(self._streams.items()):
            subscription.end()
            if transport is not None:
                transport.abort()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        last_id = _last_event_id(request, self.boot)
        if isinstance(last_id, web.Response):
            return last_id
        # Subscribed before the snapshot is taken: nothing published in between is missed (what
        # the snapshot already holds is skipped by id).
        subscription = self.bus.subscribe(self.settings.queue)
        self._streams[subscription] = request.transport
        self._count(+1)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        try:
            sock = request.transport.get_extra_info("socket") if request.transport is not None else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            await response.prepare(request)
            await self._serve(request, response, subscription, last_id)
        except _Behind:
            self._drop("behind", request)
        except TimeoutError:
            self._drop("stalled", request)
        except ConnectionError:
            pass  # the client left, or the stop aborted the connection
        finally:
            subscription.close()
            self._streams.pop(subscription, None)
            self._count(-1)
        return response

    async def _serve(
        self, request: web.Request, response: web.StreamResponse, subscription: Subscription, last_id: int | None
    ) -> None:
        missed = self.bus.since(last_id) if last_id is not None else None
        if missed is None:
            sent = self.bus.last_id
            await self._write(response, self._frame("snapshot", sent, json.dumps(self.snapshot(), default=str)))
        else:
            sent = last_id or 0
            for event in missed:
                await self._write(response, self._frame_of(event))
                sent = event.id
            self._sent(len(missed))
        loop = asyncio.get_running_loop()
        beat = loop.time() + self.settings.heartbeat
        while True:
            # aiohttp does not cancel a handler whose client left: look at the connection at
            # least every LOOK seconds, so a gone client's subscription does not linger.
            try:
                async with asyncio.timeout(min(LOOK, max(0.0, beat - loop.time()))):
                    event = await anext(subscription)
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return
                if loop.time() >= beat:
                    await self._write(response, b": heartbeat\n\n")
                    beat = loop.time() + self.settings.heartbeat
                continue
            except StopAsyncIteration:
                return  # the server is shutting down
            if subscription.dropped:
                raise _Behind
            if event.id <= sent:
                continue  # the snapshot or the history already had it
            await self._write(response, self._frame_of(event))
            sent = event.id
            self._sent(1)

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        # Every write under the timer: once writing is paused, asyncio resumes it only below the
        # low-water mark, so even a small write can wait for a client that stopped reading.
        async with asyncio.timeout(self.settings.write_timeout):
            await response.write(data)

    def _frame(self, kind: str, event_id: int, data: str) -> bytes:
        # The id names this run of the daemon too (see `boot`). One JSON document on one line:
        # json.dumps never writes a newline unless asked to indent.
        return f"id: {self.boot}-{event_id}\nevent: {kind}\ndata: {data}\n\n".encode()

    def _frame_of(self, event: Event) -> bytes:
        frame = self._encoded.get(event.id)
        if frame is None:
            frame = self._frame(event.kind, event.id, json.dumps(event.to_json(), default=str))
            self._encoded[event.id] = frame
            if len(self._encoded) > ENCODED:
                self._encoded.popitem(last=False)
        return frame

    def _count(self, change: int) -> None:
        self.clients += change
        if self.metrics is not None:
            self.metrics.stream_clients(self.clients)

    def _sent(self, events: int) -> None:
        if self.metrics is not None and events:
            self.metrics.stream_sent(events)

    def _drop(self, reason: str, request: web.Request) -> None:
        """Disconnect a client that fell behind or stopped reading: aborted, so what it left
        unread (up to the send buffers) is freed at once rather than kept for a graceful close."""
        if request.transport is not None:
            request.transport.abort()
        what = "fell too far behind" if reason == "behind" else "left a write unread"
        log.warning("event stream client disconnected", why=what, client=request.remote, reason=reason)
        if self.metrics is not None:
            self.metrics.stream_dropped(reason)


def _last_event_id(request: web.Request, boot: str) -> int | web.Response | None:
    """The client's `Last-Event-ID` (header, or `last_event_id` in the query for clients that
    cannot set headers) as this process's bus id; None without one or when it is from another
    run of the daemon (a snapshot then); the refusal of one that is not an event id."""
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id", "")).strip()
    if not raw:
        return None
    its_boot, _, number = raw.rpartition("-")
    if not its_boot or not number.isdigit() or len(number) > 18:  # noqa: PLR2004 - far more than a daemon publishes
        error = f"Last-Event-ID must be an event id as this stream sent it (BOOT-N), not {raw[:40]!r}"
        return web.json_response({"error": error}, status=400)
    return int(number) if its_boot == boot else None
