"""The HTTP API: `/` (the live page, from `controller/web/page`), `/healthz`, `/metrics`
(Prometheus exposition), `/api/v1/state` (JSON) and
`/api/v1/events` (server-sent events, see `controller.web.stream`) and `/api/v1/audit` (the
weight changes, paged, and the operators' actions).

The API observes; it never decides. It reads the daemon's state through `StateSource`.
"""

from __future__ import annotations

import hmac
import math
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.acting.errors import Route53Error
from controller.planning.operator import ACTIONS, is_action
from controller.web import views
from controller.web.listening import close_runner
from controller.web.stream import EventStream, StreamMetrics, StreamSettings
from controller.web.views import Observed

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from prometheus_client import CollectorRegistry

    from controller.acting.reconciler import Reconciler


class StateSource(Observed, Protocol):
    registry: CollectorRegistry

    @property
    def metrics(self) -> StreamMetrics: ...

    def problems(self) -> list[str]: ...


Body = TypeVar("Body", bound=BaseModel)
MAX_OPERATOR = 100  # characters of an operator's name
MAX_REASON = 500  # characters of a reason


class FreezeBody(BaseModel):
    """`POST /api/v1/freeze`: {"frozen": true, "reason": "incident 42"}; both optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    frozen: bool = True
    reason: str = Field(default="no reason given", min_length=1, max_length=MAX_REASON)


class AdoptBody(BaseModel):
    """`POST /api/v1/records/{record}/adopt`: {"reason": "..."}, optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(default="hand edit adopted", min_length=1, max_length=MAX_REASON)


def _authorised(source: StateSource, request: web.Request) -> web.Response | None:
    """None when the request carries the operators' bearer token; the refusal otherwise. The
    scheme is case-insensitive (RFC 6750, via RFC 7235). A read-only daemon refuses every one."""
    if source.config.controller.read_only:
        return web.json_response(
            {"error": "this daemon is read-only: operator actions are refused (controller.read_only)"}, status=403
        )
    token = source.api_token()
    if token is None:
        return web.json_response(
            {"error": "no API token configured: set the variable named by controller.api_token_env"}, status=403
        )
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return web.json_response(
            {"error": "missing or wrong bearer token"}, status=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return None


def _who(request: web.Request) -> str | web.Response:
    """The operator's name for the audit log, or the refusal of one that is not a name."""
    name = request.headers.get("X-Regionshift-Operator", "").strip()
    if not name:
        return f"api:{request.remote}"
    if len(name) > MAX_OPERATOR or not name.isprintable():
        return web.json_response(
            {"error": f"X-Regionshift-Operator must be a printable name of at most {MAX_OPERATOR} characters"},
            status=400,
        )
    return name


async def _operator(
    source: StateSource, request: web.Request, what: str, model: type[Body], example: str
) -> tuple[str, Reconciler, Body] | web.Response:
    """Who acts, on what, with which body (`model`, its defaults when empty), once the request
    may: the token checked, record sets configured, the operator's name a name, the body valid;
    or the refusal, saying what is wrong."""
    refused = _authorised(source, request)
    if refused is not None:
        return refused
    if source.reconciler is None:
        return web.json_response({"error": f"no record sets configured: nothing to {what}"}, status=409)
    who = _who(request)
    if isinstance(who, web.Response):
        return who
    try:
        raw = await request.read()
        body = model.model_validate_json(raw) if raw.strip() else model()
    except ValidationError as exc:
        if any(e["type"] in ("json_invalid", "model_type") for e in exc.errors()):
            return web.json_response({"error": f"the body must be a JSON object like {example}"}, status=400)
        return web.json_response({"error": f"{_invalid(exc)}; e.g. {example}"}, status=400)
    return who, source.reconciler, body


def _invalid(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors(include_url=False)
    )


# The live page: three files in the package, read once, served with a policy that lets it talk
# to this daemon only (no CDN, no request leaves for anywhere else).
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:;"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Vary": "Accept-Encoding",
}


def _page() -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /` and `GET /page/{file}`: the live page's files."""
    folder = resources.files("controller.web") / "page"
    files = {name: (folder / name).read_bytes() for name in PAGE_FILES}

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info.get("file", "index.html")
        if name not in files:
            raise web.HTTPNotFound(text=f"no page file {name!r}; the page is at /")
        response = web.Response(body=files[name], headers={"Content-Type": PAGE_FILES[name], **PAGE_HEADERS})
        response.enable_compression()
        return response

    return serve


AUDIT_PAGE = 50  # changes a page of /api/v1/audit holds unless asked
AUDIT_PAGE_MAX = 500


def _adopt(source: StateSource) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`POST /api/v1/records/{record}/adopt`: a hand edit in Route 53 becomes the new baseline."""

    async def adopt(request: web.Request) -> web.Response:
        acting = await _operator(source, request, "adopt", AdoptBody, '{"reason": "failover drill, kept"}')
        if isinstance(acting, web.Response):
            return acting
        who, reconciler, body = acting
        record = request.match_info["record"]
        try:
            error, weights = await reconciler.adopt(record, source.clock(), who, body.reason)
        except Route53Error as exc:  # it reads Route 53 once more before it adopts anything
            return web.json_response({"error": f"{record}: Route 53 could not be read: {exc}"}, status=503)
        if error is not None:
            return web.json_response({"error": error}, status=404 if error.startswith("no record set") else 409)
        return web.json_response({"record": record, "adopted": weights})

    return adopt


def _audit(source: StateSource) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /api/v1/audit`: the weight changes, newest first, a page at a time."""

    async def audit(request: web.Request) -> web.Response:
        query = _audit_query(request)
        if isinstance(query, web.Response):
            return query
        if source.reconciler is None:
            return web.json_response({"changes": [], "operator_actions": [], "next": None})
        audit = source.reconciler.store.audit
        changes = await audit.changes(**query)
        following = None
        if len(changes) == query["limit"]:
            following = str(request.rel_url.update_query(before=changes[-1]["id"]))
        # The operators' actions over the same time (not paged): on the record set, its ramps, a freeze.
        record = query["record"]
        targets = None
        if record is not None:
            ramps = [f"ramp:{n}" for n, p in source.config.policy.ramps.items() if p.record_key == record]
            targets = [record, "shifting", *ramps]
        operators = await audit.operator_actions(
            targets=targets, since=query.get("since"), until=query.get("until"), limit=query["limit"]
        )
        return web.json_response({"changes": changes, "operator_actions": operators, "next": following})

    return audit


def _audit_query(request: web.Request) -> dict[str, Any] | web.Response:
    """The audit's filters: record, since and until (epoch seconds or ISO 8601, until excluded),
    before (an id: the next page), limit; or the refusal saying what is wrong."""
    q = request.query
    out: dict[str, Any] = {"record": q.get("record") or None, "limit": AUDIT_PAGE}
    try:
        for name in ("since", "until"):
            if q.get(name):
                out[name] = _when(q[name])
        if q.get("before"):
            out["before"] = _page_size(q["before"], most=2**62)  # an id: SQLite's integers end at 2^63
        if q.get("limit"):
            out["limit"] = _page_size(q["limit"])
    except ValueError:
        example = "?record=api.example.com.&since=2026-12-02T10:00:00Z&limit=50"
        error = (
            "since and until take epoch seconds or an ISO 8601 time, before an id, "
            f"limit 1 to {AUDIT_PAGE_MAX}; e.g. {example}"
        )
        return web.json_response({"error": error}, status=400)
    return out


def _when(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(seconds):  # SQLite would take NaN for no filter at all
        raise ValueError(text)
    return seconds


def _page_size(text: str, most: int = AUDIT_PAGE_MAX) -> int:
    size = int(text)
    if not 1 <= size <= most:
        raise ValueError(text)
    return size


def make_app(source: StateSource, stream: StreamSettings | None = None) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        problems = source.problems()
        if problems:
            return web.json_response({"status": "failing", "problems": problems}, status=503)
        # Cut off from Route 53, the daemon still probes and judges: 200, so that an orchestrator
        # does not restart it for what a restart cannot fix; the body and the metrics say it.
        # So too with the agents' broker gone: the agents' vantages count toward no quorum, and
        # a region short of one is unknown; reconnecting is the intake's own work.
        body: dict[str, Any] = {}
        actuation = source.actuation()
        if actuation:
            body["actuation"] = actuation
        agents = source.agents()
        if agents is not None and not agents["connected"]:
            body["agents"] = (
                f"not connected to the agents' broker {agents['broker']}: only the controller's own results count"
            )
        if body:
            return web.json_response({"status": "degraded", **body})
        return web.json_response({"status": "ok"})

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(source.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def state(request: web.Request) -> web.Response:
        response = web.json_response(views.state(source, history=request.query.get("history") != "0"))
        response.enable_compression()
        return response

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
        who = _who(request)
        if isinstance(who, web.Response):
            return who
        error = await source.reconciler.act(name, action, source.clock(), who)
        if error is not None:
            status = 404 if error.startswith("no ramp named") else 409
            return web.json_response({"error": error}, status=status)
        state = source.reconciler.ramps[name]
        return web.json_response({"ramp": name, "status": state.status, "reason": state.reason})

    async def freeze(request: web.Request) -> web.Response:
        acting = await _operator(source, request, "freeze", FreezeBody, '{"frozen": true, "reason": "incident 42"}')
        if isinstance(acting, web.Response):
            return acting
        who, reconciler, body = acting
        await reconciler.freeze(body.frozen, source.clock(), who, body.reason)
        return web.json_response({"frozen": reconciler.frozen})

    events = EventStream(source.bus, lambda: views.state(source), source.metrics, stream)
    app = web.Application()
    app.on_shutdown.append(events.close)
    app.router.add_get("/api/v1/events", events.handle)
    app.router.add_post("/api/v1/ramps/{name}/{action}", ramp_action)
    app.router.add_post("/api/v1/freeze", freeze)
    app.router.add_post("/api/v1/records/{record:.+}/adopt", _adopt(source))  # a record's key holds a slash
    page = _page()
    app.router.add_get("/", page)
    app.router.add_get("/page/{file}", page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/state", state)
    app.router.add_get("/api/v1/audit", _audit(source))
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
        await close_runner(self._runner)


class ListenError(RuntimeError):
    """The API could not bind its address (in use, not permitted)."""
