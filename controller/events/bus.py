"""The event bus: each event published once, delivered to every subscriber.

A subscriber is an async iterator with a bounded queue of its own: a slow one loses events
(counted in its `dropped`) and never slows the publisher or the other subscribers. The bus
keeps the newest events for whoever asks what happened lately (the state API).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import deque
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from controller.events.kinds import Event

HISTORY = 500
QUEUE = 1000


class Subscription:
    """`async for event in subscription:`; `close()` (or leaving `async with`) unsubscribes."""

    def __init__(self, bus: Bus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        return await self._queue.get()

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

    def publish(self, event: Event) -> Event:
        """Stamp the event with the next id and hand it to every subscriber; never waits."""
        event = dataclasses.replace(event, id=next(self._ids))
        self._history.append(event)
        for subscriber in self._subscribers:
            subscriber._offer(event)  # noqa: SLF001
        return event

    def subscribe(self, maxsize: int = QUEUE) -> Subscription:
        subscription = Subscription(self, maxsize)
        self._subscribers.add(subscription)
        return subscription

    def recent(self, limit: int = 100) -> list[Event]:
        """The newest `limit` events, oldest first."""
        return list(self._history)[-limit:] if limit > 0 else []

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
