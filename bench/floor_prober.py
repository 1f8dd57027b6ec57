"""The floor of an agent's cost, for `bench/mqtt_ingest.py`: what a CPython prober costs that
does nothing but probe over asyncio and publish each result with aiomqtt at QoS 1.

Run by mqtt_ingest.py:  python bench/floor_prober.py TARGET RATE SECONDS
  with BENCH_FLOOR_PUBLISH=PORT:PASSWORD (of the user agent-a) to publish, empty not to.

Each probe, at its own slot of a fixed rate and in a task of its own: connect, send one fixed
request, read to EOF, close (no parsing, no result object, no schedule); then, when publishing,
one QoS 1 publish of a 9-byte payload, awaited until its PUBACK (no encoding, no validation).
It imports what any such agent must (asyncio, ssl for TLS to the broker, aiomqtt, pydantic to
validate what it receives), so its peak RSS is that agent's floor too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl  # noqa: F401 - an agent speaks TLS to brokers: its memory is part of the floor
import sys
import time
from urllib.parse import urlsplit

import aiomqtt
import pydantic  # noqa: F401 - an agent validates its plan and hurries with it: part of the floor


class _ReadToEof(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        if not self.done.done():
            self.done.set_result(None)


async def floor_prober(target: str, rate: float, seconds: float, publish_to: tuple[int, str] | None) -> int:
    """The floor: `rate` bare HTTP probes a second for `seconds` (each in a task of its own, at its
    own slot), each followed, with `publish_to` (broker port, password of agent-a), by one QoS 1
    publish awaited until its PUBACK. Returns how many probes did not complete."""
    url = urlsplit(target)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        client = None
        if publish_to is not None:
            client = aiomqtt.Client("127.0.0.1", publish_to[0], username="agent-a", password=publish_to[1])
            client.pending_calls_threshold = 10_000  # publishes overlap at this rate: no warning
            await stack.enter_async_context(client)
        topic = "regionshift/v1/results/eu-west-1/p000/agent-a"

        async def one() -> None:
            done: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.create_connection(lambda: _ReadToEof(done), host, port)
            transport.write(request)
            await done
            transport.abort()
            if client is not None:
                await client.publish(topic, b'{"ok":1}\n', qos=1)

        tasks: set[asyncio.Task[None]] = set()
        start, total = time.perf_counter(), int(seconds * rate)
        completed = 0

        def count(task: asyncio.Task[None]) -> None:
            nonlocal completed
            tasks.discard(task)
            completed += not task.cancelled() and task.exception() is None

        for k in range(total):
            await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(count)
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        return total - completed


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2
    target, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    port, _, password = os.environ.get("BENCH_FLOOR_PUBLISH", "").partition(":")
    incomplete = asyncio.run(floor_prober(target, rate, seconds, (int(port), password) if port else None))
    if incomplete:
        print(f"floor_prober: {incomplete} probes of {target} did not complete", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
