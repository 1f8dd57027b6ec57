"""The event bus: each event published once, delivered to every subscriber.

A subscriber is an async iterator with a bounded queue of its own: a slow one loses events
(counted in its `dropped`) and never slows the publisher or the other subscribers. The bus
keeps the newest events for whoever asks what happened lately (the state API).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections import deque
from typing import TYPE_CHECKING, Self, TypeVar

if TYPE_CHECKING:
    from controller.events.kinds import Event

HISTORY = 500
QUEUE = 1000
E = TypeVar("E", bound="Event")


class Subscription:
    """`async for event in subscription:`; `close()` (or leaving `async with`) unsubscribes."""

    def __init__(self, bus: Bus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)  # None: ended
        self.dropped = 0
        self.ended = False

    def _offer(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self.ended:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def end(self) -> None:
        """End the iteration of whoever reads this subscription at its next step (what is still
        queued is not read), and unsubscribe: a server shutting down. The sentinel wakes a reader
        that waits on an empty queue."""
        self.ended = True
        self.close()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._bus._subscribers.discard(self)  # noqa: SLF001 - the bus's own bookkeeping

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()


class Bus:
    def __init__(self, history: int = HISTORY) -> None:
        self._subscribers: set[Subscription] = set()
        self._history: deque[Event] = deque(maxlen=history)
        self._ids = itertools.count(1)
        self.last_id = 0  # the id of the newest event published; 0 before the first

    def publish(self, event: E) -> E:
        """Stamp the event with the next id and hand it to every subscriber; never waits."""
        event = dataclasses.replace(event, id=next(self._ids))
        self.last_id = event.id
        self._history.append(event)
        for subscriber in self._subscribers:
            subscriber._offer(event)  # noqa: SLF001
        return event

    def subscribe(self, maxsize: int = QUEUE) -> Subscription:
        subscription = Subscription(self, maxsize)
        self._subscribers.add(subscription)
        return subscription

    def since(self, last_id: int) -> list[Event] | None:
        """Every event published after `last_id`, oldest first; None when the history no longer
        holds all of them (or `last_id` was never published): whoever asks needs a snapshot."""
        if last_id > self.last_id or last_id < 0:
            return None
        if last_id == self.last_id:
            return []
        if not self._history or self._history[0].id > last_id + 1:
            return None
        return [e for e in self._history if e.id > last_id]

    def recent(self, limit: int = 100) -> list[Event]:
        """The newest `limit` events, oldest first."""
        return list(self._history)[-limit:] if limit > 0 else []

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
