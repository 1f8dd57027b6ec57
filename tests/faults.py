"""A fault-injecting proxy in front of moto's Route 53, for what moto never does by itself:
throttling, PriorRequestNotComplete, server errors, slow answers, and changes that stay PENDING
for a while before INSYNC. It also records every request, so tests can see what was sent."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

import aiohttp
from aiohttp import web

ERROR = (
    '<?xml version="1.0"?>\n<ErrorResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/">'
    "<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
    "<RequestId>injected-fault</RequestId></ErrorResponse>"
)

OPERATIONS = [
    ("POST", re.compile(r"^/2013-04-01/hostedzone/[^/]+/rrset/?$"), "ChangeResourceRecordSets"),
    ("GET", re.compile(r"^/2013-04-01/hostedzone/[^/]+/rrset/?$"), "ListResourceRecordSets"),
    ("GET", re.compile(r"^/2013-04-01/change/[^/]+$"), "GetChange"),
]


def operation_of(method: str, path: str) -> str:
    for m, pattern, name in OPERATIONS:
        if m == method and pattern.match(path):
            return name
    return f"{method} {path}"


@dataclass
class Fault:
    operation: str
    times: int
    status: int = 400
    code: str | None = None  # an AWS error code, answered as Route 53 does
    delay: float = 0.0  # seconds before forwarding
    after_forwarding: bool = False  # the request reaches Route 53, then the answer is lost


@dataclass
class Seen:
    operation: str
    method: str
    path: str
    body: str
    answered: int
    at: float = 0.0  # when the request reached Route 53 (or would have, for an injected error)


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    pending_polls: int = 0  # each change answers PENDING this many times before INSYNC
    pending_for: float = 0.0  # or: each change is PENDING this many seconds after it arrived
    arrived: Counter[str] = field(default_factory=Counter)  # requests received, answered or not
    _polls: Counter[str] = field(default_factory=Counter)
    _changed_at: float = 0.0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, operation: str, code: str, *, times: int = 1, status: int = 400) -> None:
        self.faults.append(Fault(operation, times, status=status, code=code))

    def http_error(self, operation: str, status: int = 500, *, times: int = 1) -> None:
        self.faults.append(Fault(operation, times, status=status))

    def lose_answer(self, operation: str, status: int = 503, *, times: int = 1) -> None:
        """Forward the request (Route 53 applies it), then answer with an error."""
        self.faults.append(Fault(operation, times, status=status, after_forwarding=True))

    def slow(self, operation: str, seconds: float, *, times: int = 1) -> None:
        self.faults.append(Fault(operation, times, status=0, delay=seconds))

    def count(self, operation: str) -> int:
        return sum(1 for s in self.seen if s.operation == operation)

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._http.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        operation = operation_of(request.method, request.path)
        self.arrived[operation] += 1
        fault = next((f for f in self.faults if f.operation == operation and f.times > 0), None)
        if fault is not None:
            fault.times -= 1
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status and not fault.after_forwarding:
                seen = Seen(operation, request.method, request.path, body.decode(), fault.status, time.time())
                self.seen.append(seen)
                text = ERROR.format(code=fault.code, message="injected") if fault.code else "injected server error"
                return web.Response(status=fault.status, text=text, content_type="text/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        forwarded_at = time.time()
        async with self._http.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            answer = await upstream.read()
            status = upstream.status
        self.seen.append(Seen(operation, request.method, request.path, body.decode(), status, forwarded_at))
        if fault is not None and fault.after_forwarding:
            return web.Response(status=fault.status, text="answer lost", content_type="text/xml")
        if operation in ("ChangeResourceRecordSets", "GetChange") and self.pending_polls and status == 200:
            answer = self._pending(operation, answer)
        if operation in ("ChangeResourceRecordSets", "GetChange") and self.pending_for and status == 200:
            if operation == "ChangeResourceRecordSets":
                self._changed_at = forwarded_at
            if time.time() - self._changed_at < self.pending_for:
                answer = answer.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")
        return web.Response(status=status, body=answer, content_type="text/xml")

    def _pending(self, operation: str, answer: bytes) -> bytes:
        # moto reuses one change id for every change: count polls per change request instead.
        if operation == "ChangeResourceRecordSets":
            self._polls["current"] = 0
            return answer.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")
        self._polls["current"] += 1
        if self._polls["current"] <= self.pending_polls:
            return answer.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")
        return answer
