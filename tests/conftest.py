"""Shared fixtures: real servers on loopback, started by the tests and stopped after them."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import trustme
from aiohttp import web

from controller.demo.world import LocalRoute53, SimulatedRegion
from controller.settings.loading import load_policy

REPO = Path(__file__).resolve().parent.parent
REGIONSHIFT = str(Path(sys.executable).with_name("regionshift"))
# The verdict policy the project ships, as a user gets it.
SHIPPED_VERDICTS = load_policy([Path(__file__).resolve().parent.parent / "policies" / "verdicts.yaml"])[0].verdicts


@pytest_asyncio.fixture(autouse=True)
async def _no_pending_tasks(request):
    """Fail a test that leaves tasks running: every long-lived piece must stop by itself."""
    yield
    if not asyncio.iscoroutinefunction(request.function):
        return
    current = asyncio.current_task()
    for _ in range(3):  # let cancelled tasks finish their last step
        pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not pending:
            return
        await asyncio.sleep(0.01)
    for task in pending:
        task.cancel()
    pytest.fail(f"test left tasks running: {[t.get_name() + ' ' + repr(t.get_coro()) for t in pending]}")


@pytest.fixture(scope="session")
def route53():
    """moto's Route 53 server for the whole session; each test makes zones of its own."""
    server = LocalRoute53()
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def region():
    async with SimulatedRegion("eu-west-1", seed=1) as r:
        yield r


@pytest_asyncio.fixture
async def two_regions():
    async with SimulatedRegion("us-east-1", seed=1) as a, SimulatedRegion("eu-west-1", seed=2) as b:
        yield {"us-east-1": a, "eu-west-1": b}


@pytest_asyncio.fixture
async def world():
    async with (
        SimulatedRegion("us-east-1", seed=1) as a,
        SimulatedRegion("eu-west-1", seed=2) as b,
        SimulatedRegion("ap-southeast-2", seed=3) as c,
    ):
        yield {r.name: r for r in (a, b, c)}


@pytest_asyncio.fixture
async def silent_port():
    """A port that accepts connections and never answers (for timeouts)."""
    connections: list[asyncio.Transport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport):
            connections.append(transport)

    server = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for transport in connections:
        transport.abort()
    server.close()
    await server.wait_closed()


@dataclass
class TlsServer:
    port: int
    ca_file: str
    not_after: dt.datetime

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


@contextlib.asynccontextmanager
async def serve_tls(tmp_path: Path, valid_days: int):
    """HTTPS on loopback with a fresh CA; the certificate expires in `valid_days`."""
    not_after = (dt.datetime.now(dt.UTC) + dt.timedelta(days=valid_days)).replace(microsecond=0)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", not_after=not_after)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="secure hello\n")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    try:
        yield TlsServer(int(runner.addresses[0][1]), str(ca_file), not_after)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def tls_server(tmp_path):
    async with serve_tls(tmp_path, valid_days=90) as server:
        yield server


@pytest_asyncio.fixture
async def expiring_tls_server(tmp_path):
    async with serve_tls(tmp_path, valid_days=5) as server:
        yield server


@pytest.fixture
def write(tmp_path):
    """Write a file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


@pytest.fixture
def cli_env():
    """The environment for running the `regionshift` console script as a user would."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env
