"""The HTTP API: `/healthz`, `/metrics` (Prometheus exposition) and `/api/v1/state` (JSON).

The API observes; it never decides. It reads the daemon's state through `StateSource`.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Protocol, Self

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.planning.operator import ACTIONS, is_action
from controller.web import views
from controller.web.views import Observed

if TYPE_CHECKING:
    from types import TracebackType

    from prometheus_client import CollectorRegistry


class StateSource(Observed, Protocol):
    registry: CollectorRegistry

    def problems(self) -> list[str]: ...

    def api_token(self) -> str | None: ...


def _authorised(source: StateSource, request: web.Request) -> web.Response | None:
    """None when the request carries the operators' bearer token; the refusal otherwise."""
    token = source.api_token()
    if token is None:
        return web.json_response(
            {"error": "no API token configured: set the variable named by controller.api_token_env"}, status=403
        )
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return web.json_response(
            {"error": "missing or wrong bearer token"}, status=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return None


def _who(request: web.Request) -> str:
    return request.headers.get("X-Regionshift-Operator") or f"api:{request.remote}"


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
        return web.json_response(views.state(source))

    async def ramp_action(request: web.Request) -> web.Response:
        refused = _authorised(source, request)
        if refused is not None:
            return refused
        name, action = request.match_info["name"], request.match_info["action"]
        if not is_action(action):
            return web.json_response(
                {"error": f"unknown action {action!r}; use one of: {', '.join(ACTIONS)}"}, status=404
            )
        if source.reconciler is None:
            return web.json_response({"error": "no record sets configured: nothing to ramp"}, status=409)
        error = await source.reconciler.act(name, action, source.clock(), _who(request))
        if error is not None:
            status = 404 if error.startswith("no ramp named") else 409
            return web.json_response({"error": error}, status=status)
        state = source.reconciler.ramps[name]
        return web.json_response({"ramp": name, "status": state.status, "reason": state.reason})

    async def freeze(request: web.Request) -> web.Response:
        refused = _authorised(source, request)
        if refused is not None:
            return refused
        if source.reconciler is None:
            return web.json_response({"error": "no record sets configured: nothing to freeze"}, status=409)
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response(
                {"error": 'body must be JSON, e.g. {"frozen": true, "reason": "incident"}'}, status=400
            )
        frozen = bool(body.get("frozen", True))
        reason = str(body.get("reason", "no reason given"))
        await source.reconciler.freeze(frozen, source.clock(), _who(request), reason)
        return web.json_response({"frozen": source.reconciler.frozen})

    app = web.Application()
    app.router.add_post("/api/v1/ramps/{name}/{action}", ramp_action)
    app.router.add_post("/api/v1/freeze", freeze)
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
