"""`GET /api/v1/events`: a snapshot, then every event in order with its id; resume with
Last-Event-ID; heartbeats; and a client that stops reading is dropped and counted without
slowing anyone else (100 clients on a real server over loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import TYPE_CHECKING

import aiohttp

from controller.daemon import Daemon
from controller.events.bus import Bus
from controller.events.kinds import OperatorAction, VerdictChanged
from controller.web.api import ApiServer, make_app
from controller.web.stream import StreamSettings
from tests.test_api import Source

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class StreamSource(Source):
    def __init__(self, bus: Bus | None = None) -> None:
        super().__init__()
        if bus is not None:
            self.bus = bus


@contextlib.asynccontextmanager
async def serving(source: StreamSource, **settings: float) -> AsyncIterator[ApiServer]:
    app = make_app(source, StreamSettings(**settings))  # type: ignore[arg-type]
    async with ApiServer(app, "127.0.0.1", 0) as server:
        yield server


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """Each event of an SSE body as {"id", "event", "data"}; a comment as {"comment"}."""
    fields: dict = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(": ")
            if name == "id":  # BOOT-N: this run of the daemon, the bus's id
                fields["boot"], _, number = value.rpartition("-")
                fields["id"] = int(number)
            else:
                fields[name] = json.loads(value) if name == "data" else value


def sample(source: StreamSource, name: str, **labels: str) -> float | None:
    return source.registry.get_sample_value(name, labels)


def verdict(region: str, status: str) -> VerdictChanged:
    return VerdictChanged(at=1000.0, region=region, previous="healthy", status=status, reasons=("why",))


async def test_a_client_gets_a_snapshot_then_every_event_in_order_each_with_its_id():
    source = StreamSource()
    source.bus.publish(verdict("eu-west-1", "degraded"))  # before the client: in the snapshot
    async with (
        serving(source) as server,
        aiohttp.ClientSession() as http,
        http.get(server.url + "/api/v1/events") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = events(response)
        snapshot = await anext(stream)
        assert snapshot["event"] == "snapshot"
        assert snapshot["id"] == 1
        assert [r["name"] for r in snapshot["data"]["regions"]] == ["eu-west-1"]
        assert [e["id"] for e in snapshot["data"]["events"]] == [1]
        source.bus.publish(verdict("eu-west-1", "unhealthy"))
        source.bus.publish(OperatorAction(at=1001.0, who="ana", action="freeze", target="*", reason="incident"))
        first, second = await anext(stream), await anext(stream)
    assert (first["id"], first["event"], first["data"]["to"]) == (2, "verdict", "unhealthy")
    assert (second["id"], second["event"], second["data"]["who"]) == (3, "operator", "ana")
    assert sample(source, "regionshift_event_stream_events_sent_total") == 2
    assert sample(source, "regionshift_event_stream_clients") == 0  # the client left


async def test_a_client_that_comes_back_with_last_event_id_gets_what_it_missed_or_a_snapshot():
    source = StreamSource(Bus(history=5))
    for i in range(8):
        source.bus.publish(verdict("eu-west-1", f"s{i}"))
    async with serving(source) as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/api/v1/events") as response:
            boot = (await anext(events(response)))["boot"]
        # Ids 4..8 are in the history: after 5, it gets 6, 7, 8 and no snapshot.
        async with http.get(server.url + "/api/v1/events", headers={"Last-Event-ID": f"{boot}-5"}) as response:
            stream = events(response)
            got = [await anext(stream) for _ in range(3)]
            assert [(e["id"], e["event"]) for e in got] == [(6, "verdict"), (7, "verdict"), (8, "verdict")]
            source.bus.publish(verdict("eu-west-1", "live"))
            assert (await anext(stream))["id"] == 9
        # Event 2 is gone from the history: a snapshot, never a gap.
        async with http.get(server.url + f"/api/v1/events?last_event_id={boot}-1") as response:
            first = await anext(events(response))
            assert (first["event"], first["id"]) == ("snapshot", 9)
        # An id from before a restart (another boot) is not this run's 5: a snapshot.
        async with http.get(server.url + "/api/v1/events", headers={"Last-Event-ID": "0badb007-5"}) as response:
            first = await anext(events(response))
            assert (first["event"], first["id"]) == ("snapshot", 9)
        async with http.get(server.url + "/api/v1/events", headers={"Last-Event-ID": "x1"}) as response:
            assert response.status == 400
            assert "Last-Event-ID must be an event id as this stream sent it" in (await response.json())["error"]


async def test_an_idle_stream_carries_heartbeats():
    source = StreamSource()
    async with (
        serving(source, heartbeat=0.05) as server,
        aiohttp.ClientSession() as http,
        http.get(server.url + "/api/v1/events") as response,
    ):
        stream = events(response)
        assert (await anext(stream))["event"] == "snapshot"
        assert await anext(stream) == {"comment": "heartbeat"}
        assert await anext(stream) == {"comment": "heartbeat"}


async def test_a_hundred_clients_one_never_reading_the_others_get_every_event_in_order():
    source = StreamSource()
    total = 600
    reason = "r" * 600  # ~800 bytes a frame: the silent client's buffers fill within the run
    async with serving(source, queue=256, write_timeout=0.5) as server:
        # The client that never reads: a raw socket with a small receive buffer, the request sent.
        silent = socket.socket()
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        silent.setblocking(False)  # noqa: FBT003 - the socket's own API
        await asyncio.get_running_loop().sock_connect(silent, ("127.0.0.1", server.port))
        silent.send(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                seen: dict[int, list[int]] = {}

                async def reader(n: int, ready: asyncio.Event) -> None:
                    ids = seen.setdefault(n, [])
                    async with http.get(server.url + "/api/v1/events") as response:
                        stream = events(response)
                        await anext(stream)  # the snapshot
                        ready.set()
                        async for event in stream:
                            if "id" in event:
                                ids.append(event["id"])
                                if event["id"] == total:
                                    return

                readies = [asyncio.Event() for _ in range(99)]
                readers = [asyncio.create_task(reader(n, r)) for n, r in enumerate(readies)]
                await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
                assert sample(source, "regionshift_event_stream_clients") == 100
                for i in range(total):
                    source.bus.publish(OperatorAction(at=float(i), who="ana", action="x", target="*", reason=reason))
                    if i % 10 == 9:
                        await asyncio.sleep(0.01)  # publishing never waits; this only paces the test
                await asyncio.wait_for(asyncio.gather(*readers), 60)
        finally:
            silent.close()
    assert len(seen) == 99
    for ids in seen.values():
        assert ids == list(range(1, total + 1))  # every event, in order, none twice
    name = "regionshift_event_stream_dropped_clients_total"
    assert sum(sample(source, name, reason=r) or 0 for r in ("behind", "stalled")) == 1  # the silent one


async def test_a_real_daemon_streams_a_verdict_change_and_stops_promptly_with_a_client_connected(world):
    from tests.test_daemon import Running, world_config  # noqa: PLC0415 - the daemon tests' harness

    daemon = Daemon(world_config(world))
    async with aiohttp.ClientSession() as http:  # its own: still connected when the daemon stops
        async with Running(daemon, stop_within=3.0) as running:
            await running.status_becomes("eu-west-1", "healthy")
            response = await http.get(daemon.url + "/api/v1/events")
            stream = events(response)
            snapshot = await anext(stream)
            assert {r["name"] for r in snapshot["data"]["regions"]} == set(world)
            world["eu-west-1"].set(error_ratio=1.0)
            async with asyncio.timeout(10):
                async for event in stream:
                    if event.get("event") == "verdict" and event["data"]["region"] == "eu-west-1":
                        assert event["id"] > snapshot["id"]
                        # Held at once, or unknown first while the peers' results are too few
                        # to tell it apart; never healthy again in between.
                        assert event["data"]["to"] in ("degraded", "unhealthy", "unknown")
                        if event["data"]["to"] != "unknown":
                            break
        # Running's exit stopped the daemon within 3 s with this client connected: on_shutdown
        # aborted its stream, which ends at once (cut short: an EventSource reconnects).
        async with asyncio.timeout(5):
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for _ in stream:
                    pass
        response.release()
