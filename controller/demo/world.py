"""The local world: simulated regions and a local Route 53 on loopback, for the demo, the tests
and the benchmarks.

Each region is a small aiohttp app with a health path and API paths whose behaviour can be
changed while it runs: an error ratio on chosen paths, added latency, `/healthz` staying 200
while the API fails (the partial failure that load-balancer health checks miss), or refusing
connections altogether. Behaviour can be changed in-process or over HTTP
(`POST /_world/behaviour`), and each region counts the requests it served.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from aiohttp import web

from controller.web.listening import close_runner, servers_of, stop_accepting

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from types import TracebackType

API_PATHS = ("/api/orders", "/api/users")
CUT_FOR = 60.0  # seconds a request over a cut path waits, unanswered


@dataclass(frozen=True)
class Behaviour:
    """How a simulated region answers. The default is a healthy region."""

    error_ratio: float = 0.0  # share of requests on `error_paths` that fail
    error_paths: tuple[str, ...] = ("/api/",)  # path prefixes the error ratio applies to
    error_status: int = 503
    latency: float = 0.0  # seconds added to every request
    healthz_ok: bool = True
    # Vantages whose path to this region is cut: their requests (told apart by the probes'
    # User-Agent, "regionshift-probe/1 (VANTAGE)") are never answered, as by a network black hole.
    cut_vantages: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Behaviour:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown behaviour fields: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        for name in ("error_paths", "cut_vantages"):
            if name in data:
                data = {**data, name: tuple(data[name])}
        behaviour = cls(**data)
        if not 0.0 <= behaviour.error_ratio <= 1.0:
            raise ValueError("error_ratio must be within 0..1")
        if behaviour.latency < 0:
            raise ValueError("latency must not be negative")
        return behaviour


@dataclass
class SimulatedRegion:
    """One region's app on 127.0.0.1; use as an async context manager."""

    name: str
    port: int = 0
    behaviour: Behaviour = field(default_factory=Behaviour)
    seed: int | None = None
    # Seconds every answer takes before any injected latency: the distance to the region. A world
    # answering in a millisecond makes a busy machine's scheduling jitter look like a slowdown of
    # several times; real regions answer in tens of milliseconds, where that jitter is noise.
    base_latency: float = 0.0
    served: Counter[str] = field(default_factory=Counter)  # path -> requests answered
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 - simulated faults, not cryptography

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, **changes: Any) -> None:
        """Change behaviour while running, e.g. `region.set(error_ratio=0.4)`."""
        self.behaviour = replace(self.behaviour, **changes)

    def heal(self) -> None:
        self.behaviour = Behaviour()

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_route("*", "/api/{tail:.*}", self._api)
        app.router.add_get("/_world/behaviour", self._get_behaviour)
        app.router.add_post("/_world/behaviour", self._set_behaviour)
        app.router.add_get("/_world/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await self.accept()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None  # requests held over a cut path end now
            await close_runner(runner)
            self._site = None

    async def refuse(self) -> None:
        """Stop listening: new connections are refused until `accept()`."""
        if self._site is None:
            return
        site, self._site = self._site, None
        await stop_accepting(*servers_of(site))  # no connection left half made (see the helper)
        await site.stop()

    async def accept(self) -> None:
        if self._site is None and self._runner is not None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await self._site.start()
            if self.port == 0:  # keep the port the system chose, so accept() after refuse() reuses it
                self.port = int(self._runner.addresses[0][1])

    async def _delay(self, request: web.Request) -> None:
        agent = request.headers.get("User-Agent", "")
        deadline = time.monotonic() + CUT_FOR
        # Unanswered while the cut lasts (the probe times out long before), ended by the region's stop.
        while any(agent.endswith(f"({v})") for v in self.behaviour.cut_vantages) and time.monotonic() < deadline:
            if self._runner is None:
                raise web.HTTPServiceUnavailable
            await asyncio.sleep(0.05)
        if self.base_latency + self.behaviour.latency > 0:
            await asyncio.sleep(self.base_latency + self.behaviour.latency)

    async def _healthz(self, request: web.Request) -> web.Response:
        await self._delay(request)
        self.served[request.path] += 1
        if not self.behaviour.healthz_ok:
            return web.Response(status=503, text="unhealthy\n")
        return web.Response(text="ok\n")

    async def _api(self, request: web.Request) -> web.Response:
        await self._delay(request)
        self.served[request.path] += 1
        b = self.behaviour
        failing = any(request.path.startswith(p) for p in b.error_paths)
        if failing and self._rng.random() < b.error_ratio:
            return web.json_response({"region": self.name, "error": "injected failure"}, status=b.error_status)
        return web.json_response({"region": self.name, "path": request.path, "ok": True})

    async def _get_behaviour(self, _: web.Request) -> web.Response:
        return web.json_response(asdict(self.behaviour))

    async def _set_behaviour(self, request: web.Request) -> web.Response:
        try:
            self.behaviour = Behaviour.from_json(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.behaviour))

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response({"region": self.name, "served": dict(self.served)})


def terminate(process: subprocess.Popen[bytes], within: float = 10.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL if it has not exited `within` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(within)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorldError(RuntimeError):
    """The local world cannot start: a sentence saying what is missing and how to get it."""


MOTO_MISSING = "the launch demo needs moto's server as its local Route 53: pip install 'regionshift[demo]'"


def moto_server() -> Path | None:
    """The moto_server beside this interpreter (the project's virtual environment), if installed."""
    server = Path(sys.executable).with_name("moto_server")
    return server if server.exists() else None


class LocalRoute53:
    """moto's server mode on a loopback port: the Route 53 API that boto3 reaches by endpoint_url.

    It speaks the real HTTP API but differs from Route 53 (DESIGN.md): changes are INSYNC at once,
    batches are not atomic, there is no throttling. Tests put a fault-injecting proxy in front.
    Use `start()`/`stop()` or `async with`.
    """

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, within: float = 20.0) -> None:
        server = moto_server()
        if server is None:
            raise WorldError(MOTO_MISSING)
        self.port = free_port()
        self._proc = subprocess.Popen(  # noqa: S603 - our own venv's moto_server
            [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # stopped in order by the demo, not by a Ctrl-C (see `Broker.start`)
        )
        deadline = time.monotonic() + within
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise WorldError(f"the local Route 53 ({server}) did not start within {within:g}s") from None
                time.sleep(0.1)
            else:
                return

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc)
        self._proc = None

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


class SimulatedReplication:
    """A replication source per region, with a lag knob: every `every` seconds it publishes
    each region's replica lag as RDS `ReplicaLag` (seconds) to a local CloudWatch (moto's
    server, through the `client` given), so the daemon's CloudWatch lag probes read it the way
    they read AWS. `lag[region]` is the knob; -1 means not replicating, as RDS reports it."""

    def __init__(self, client: Any, regions: Iterable[str], lag: float = 0.2, every: float = 0.5) -> None:
        self.client = client
        self.lag = dict.fromkeys(regions, lag)
        self.every = every

    @staticmethod
    def instance(region: str) -> str:
        """The replica's DBInstanceIdentifier, the dimension its lag probe reads."""
        return f"orders-{region}"

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.publish)
            await asyncio.sleep(self.every)

    def publish(self) -> None:
        now = datetime.now(UTC)
        for region, lag in self.lag.items():
            self.client.put_metric_data(
                Namespace="AWS/RDS",
                MetricData=[
                    {
                        "MetricName": "ReplicaLag",
                        "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": self.instance(region)}],
                        "Timestamp": now,
                        "Value": lag,
                        "Unit": "Seconds",
                    }
                ],
            )


def seed_weighted_group(
    client: Any, zone_id: str, name: str, members: list[tuple[str, int, str]], ttl: int = 60
) -> None:
    """Create a weighted group (set identifier, weight, value per member) in a local Route 53,
    as an operator would have before regionshift runs: the demo, the benchmarks and the tests."""
    changes = [
        {
            "Action": "CREATE",
            "ResourceRecordSet": {
                "Name": name,
                "Type": "A",
                "SetIdentifier": sid,
                "Weight": weight,
                "TTL": ttl,
                "ResourceRecords": [{"Value": value}],
            },
        }
        for sid, weight, value in members
    ]
    client.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": changes})


def ramp_config(
    root: Path,
    regions: Mapping[str, SimulatedRegion],
    endpoint: str,
    zone_id: str,
    name: str,
    *,
    port: int,
    ttl: int,
    bake: float,
    insync_timeout: float = 300.0,
) -> Path:
    """A configuration file (and its policy file) for a daemon that ramps eu-west-1 on `name`
    (members use1 and euw1) over these regions, each probed every 100 ms: what the restart
    benchmark and the SIGKILL test run as a subprocess. The lease is the default 30 s."""
    (root / "policy.yaml").write_text(
        "verdicts: {window: 3s, stale_after: 1s, min_samples: 3, degraded_below: 0.9, recover_after: 1s,"
        " slowdown: {min_effect: 9}}\n"
        f"ramps:\n  launch:\n    record_set: {name}\n    waves: [[eu-west-1]]\n    steps: [1, 5, 10, 25, 50]\n"
        f"    bake: {bake}s\n    start_gate: 300ms\n"
    )
    probe = "{{kind: http, name: orders, target: '{url}/api/orders', interval: 100ms, timeout: 100ms}}"
    probes = "".join(f"  - name: {n}\n    probes:\n      - {probe.format(url=r.url)}\n" for n, r in regions.items())
    path = root / "regionshift.yaml"
    path.write_text(
        f"controller:\n  listen: 127.0.0.1:{port}\n  tick: 100ms\n  state_path: state.sqlite\n"
        f"  route53: {{endpoint_url: '{endpoint}', reconcile_every: 100ms, poll_interval: 50ms,"
        f" insync_timeout: {insync_timeout}s, max_requests_per_second: 400}}\n"
        f"policies: [policy.yaml]\nregions:\n{probes}"
        f"record_sets:\n  - zone_id: {zone_id}\n    name: {name}\n    ttl: {ttl}\n    members:\n"
        "      - {set_identifier: use1, region: us-east-1, value: 192.0.2.10}\n"
        "      - {set_identifier: euw1, region: eu-west-1, value: 192.0.2.20}\n"
    )
    return path
