"""The live event stream's fan-out: events per second to 100 clients, and the server's CPU.

Run:  .venv/bin/python bench/event_stream.py [--clients 100] [--rate 200] [--seconds 10] [--rounds 2]

A server in a process of its own publishes `--rate` verdict events a second (about 300 bytes
each as JSON) for `--seconds`, 3 s after it starts (time for the clients to connect), and
`--clients` clients in this process read `GET /api/v1/events` to the end, counting every event
and checking that each saw every id in order. Two servers, alternating in rounds so a noisy
minute hurts both:

- anchor: a bare aiohttp server that writes the same pre-encoded frame to every client's
  StreamResponse in a loop, each write awaited (no bus, no queues, no per-client task or
  bookkeeping): what serving SSE with aiohttp costs at least;
- regionshift: the daemon's API (`make_app`) with its bus: a snapshot per client, a bounded
  queue per client, each event encoded once.

Printed: events delivered per second (all clients: the offered load, clients x rate, when every
one arrives; not a capacity), the server's CPU while publishing (cores) and its CPU per 10,000
delivered events, and regionshift / anchor of the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import probe_throughput as pt

from controller.events.bus import Bus
from controller.events.kinds import VerdictChanged
from controller.judging.windows import WindowStore
from controller.settings.schema import Config, Region
from controller.web.api import ApiServer, make_app

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

START_AFTER = 3.0  # seconds the server waits before publishing: the clients connect meanwhile
REASONS = (
    "orders: 9 of 78 probes failed in the last 9s (11.5%; acceptable 0.1%) from controller 9/78, worse than us-east-1",
)


def event(i: int) -> VerdictChanged:
    return VerdictChanged(at=time.time(), region="eu-west-1", previous="healthy", status=f"s{i % 4}", reasons=REASONS)


class _Metrics:
    def stream_clients(self, count: int) -> None:
        pass

    def stream_dropped(self, reason: str) -> None:
        print(f"event_stream: a client was dropped ({reason})", file=sys.stderr)

    def stream_sent(self, events: int) -> None:
        pass


class _Source:
    """What the API reads of a daemon: three regions, no record sets, the bus."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry  # noqa: PLC0415 - the server process only

        self.config = Config(regions=[Region(name=n) for n in ("us-east-1", "eu-west-1", "ap-southeast-2")])
        self.registry = CollectorRegistry()
        self.metrics = _Metrics()
        self.bus = Bus()
        self.reconciler = None
        self.vantage = "controller"
        self.verdicts: dict[str, object] = {}
        self.windows = WindowStore(60.0)
        self.verdict_log: list[object] = []
        self.set_aside: dict[str, str] = {}
        self.started_at = time.time()

    def probe_stats(self) -> tuple[int, int]:
        return 0, 0

    def agents(self) -> None:
        return None

    def clock(self) -> float:
        return time.time()

    def problems(self) -> list[str]:
        return []

    def actuation(self) -> dict[str, str]:
        return {}

    def api_token(self) -> None:
        return None


async def publish(rate: float, seconds: float, one: Callable[[int], Awaitable[None] | object]) -> None:
    """Call `one(i)` `rate` times a second for `seconds`, after START_AFTER (awaited when it is
    a coroutine function: the anchor writes to its clients there)."""
    await asyncio.sleep(START_AFTER)
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        done = one(i)
        if asyncio.iscoroutine(done):
            await done


async def serve_regionshift(port: int, rate: float, seconds: float) -> None:
    source = _Source()
    async with ApiServer(make_app(source), "127.0.0.1", port):  # type: ignore[arg-type]
        await publish(rate, seconds, lambda i: source.bus.publish(event(i)))
        await asyncio.sleep(1.0)  # the last events leave before the server stops


async def serve_bare(port: int, rate: float, seconds: float) -> None:
    """The anchor: every client's response gets the same frame, written in a loop."""
    clients: set[web.StreamResponse] = set()
    frame_body = event(0).to_json()

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        clients.add(response)
        try:
            await asyncio.sleep(START_AFTER + seconds + 1.0)
        finally:
            clients.discard(response)
        return response

    async def one(i: int) -> None:
        data = f"id: {i + 1}\nevent: verdict\ndata: {json.dumps(frame_body)}\n\n".encode()
        for response in list(clients):
            await response.write(data)

    app = web.Application()
    app.router.add_get("/api/v1/events", handle)
    async with ApiServer(app, "127.0.0.1", port):
        await publish(rate, seconds, one)
        await asyncio.sleep(1.0)


async def read_all(port: int, clients: int, total: int, deadline: float) -> tuple[int, int]:
    """`clients` readers of the stream until each has seen id `total`; (events seen, readers in order)."""

    async def reader() -> tuple[int, bool]:
        stream, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/events HTTP/1.0\r\nHost: bench\r\n\r\n")  # 1.0: no chunking
        last, seen, in_order, frame_id = 0, 0, True, None
        try:
            async with asyncio.timeout(deadline):
                while last < total:
                    line = await stream.readline()
                    if not line:
                        break
                    if line.startswith(b"id: "):
                        frame_id = int(line[4:].rpartition(b"-")[2])  # BOOT-N, or N from the anchor
                    elif line.startswith(b"event: ") and frame_id is not None:
                        if line.startswith(b"event: snapshot"):
                            last = frame_id  # the events it already holds
                        else:
                            in_order &= frame_id == last + 1
                            last, seen = frame_id, seen + 1
                        frame_id = None
        finally:
            writer.close()
        return seen, in_order

    results = await asyncio.gather(*(reader() for _ in range(clients)))
    return sum(s for s, _ in results), sum(ok for _, ok in results)


def measure(kind: str, clients: int, rate: float, seconds: float) -> dict[str, float]:
    import subprocess  # noqa: PLC0415

    port = pt._free_port()  # noqa: SLF001 - the throughput bench's helper
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    command += ["--rate", str(rate), "--seconds", str(seconds)]
    server = subprocess.Popen(command)  # this interpreter, this file
    try:
        pt._wait_for_port(port)  # noqa: SLF001

        async def run() -> dict[str, float]:
            reading = asyncio.create_task(read_all(port, clients, int(rate * seconds), START_AFTER + seconds + 30))
            await asyncio.sleep(START_AFTER - 0.5)
            cpu0, wall0 = pt._proc_cpu(server.pid), time.perf_counter()  # noqa: SLF001
            seen, in_order = await reading
            cpu1, wall1 = pt._proc_cpu(server.pid), time.perf_counter()  # noqa: SLF001
            return {"events": seen, "in_order": in_order, "cpu": cpu1 - cpu0, "wall": wall1 - wall0}

        return asyncio.run(run())
    finally:
        server.terminate()
        server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0, help="events a second the server publishes")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", choices=("regionshift", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve = serve_regionshift if args.serve == "regionshift" else serve_bare
        asyncio.run(serve(args.port, args.rate, args.seconds))
        return 0
    totals: dict[str, dict[str, float]] = {}
    names = {"bare": "aiohttp, same frame to all (anchor)", "regionshift": "regionshift /api/v1/events"}
    for round_number in range(1, args.rounds + 1):
        for kind in ("bare", "regionshift"):
            m = measure(kind, args.clients, args.rate, args.seconds)
            print(f"round {round_number}: {kind}: {m}", file=sys.stderr)
            total = totals.setdefault(kind, {"events": 0, "in_order": 0, "cpu": 0.0, "wall": 0.0})
            for key in total:
                total[key] += m[key]
    expected = args.rounds * args.clients * int(args.rate * args.seconds)
    print(
        f"Event stream fan-out: {args.clients} clients, {args.rate:g} events/s for {args.seconds:g}s, "
        f"{args.rounds} rounds, loopback"
    )
    columns = f"{'delivered':>10} {'of':>10} {'in order':>9} {'events/s':>9} {'cores':>6} {'cpu-ms/10k':>10}"
    print(f"{'server':<38} {columns}")
    per = {}
    for kind, t in totals.items():
        per[kind] = t["cpu"] / t["events"] * 10_000 * 1000 if t["events"] else float("nan")
        print(
            f"{names[kind]:<38} {int(t['events']):>10} {expected:>10} {int(t['in_order']):>9} "
            f"{t['events'] / t['wall']:>9.0f} {t['cpu'] / t['wall']:>6.2f} {per[kind]:>10.1f}"
        )
    print(f"regionshift / anchor: {per['regionshift'] / per['bare']:.2f}x CPU per delivered event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
