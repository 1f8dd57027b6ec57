"""The HTTP API: `/healthz`, `/metrics` (Prometheus exposition) and `/api/v1/state` (JSON).

The API observes; it never decides. It reads the daemon's state through `StateSource`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Self

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from types import TracebackType

    from prometheus_client import CollectorRegistry


class StateSource(Protocol):
    registry: CollectorRegistry

    def state(self) -> dict[str, Any]: ...

    def problems(self) -> list[str]: ...


def make_app(source: StateSource) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        problems = source.problems()
        if problems:
            return web.json_response({"status": "failing", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(source.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def state(_: web.Request) -> web.Response:
        return web.json_response(source.state())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/state", state)
    return app


class ApiServer:
    """Serves an app on host:port for the duration of an `async with`."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ListenError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._runner.cleanup()


class ListenError(RuntimeError):
    """The API could not bind its address (in use, not permitted)."""
