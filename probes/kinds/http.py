"""The `http` probe kind: one request on a fresh connection, checked against expectations.

HTTP/1.1 framing is h11's (a sans-IO parser); this module owns only the socket, so it can time
name resolution, connect, TLS and the wait for the first byte separately, the way
blackbox_exporter reports them, at a fraction of a full client's cost per probe.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import h11

from probes.connection import Phases, ProbeError, check_certificate, open_connection
from probes.results import Result, Subject
from probes.spec import Secret

if TYPE_CHECKING:
    from probes.spec import HttpProbe

BODY_LIMIT = 1 << 20  # bytes of body kept for the regex; the rest is read and dropped
USER_AGENT = "regionshift-probe/1"


class _Exchange(asyncio.Protocol):
    """Feeds received bytes to h11 and resolves `done` at the end of the response."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.parser = h11.Connection(h11.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.first_byte_at: float | None = None
        self.response: h11.Response | None = None
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # always a stream transport here

    def data_received(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
        self.parser.receive_data(data)
        self._drain()

    def eof_received(self) -> bool:
        self.parser.receive_data(b"")
        self._drain()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            detail = f": {exc}" if exc else ""
            self.done.set_exception(ProbeError("closed", f"connection closed before the response ended{detail}"))

    def _drain(self) -> None:
        while not self.done.done():
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError as exc:
                self.done.set_exception(ProbeError("protocol", f"invalid HTTP response: {exc}"))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                if len(self.body) < BODY_LIMIT:
                    self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.done.set_result(None)
            elif isinstance(event, h11.ConnectionClosed):
                self.done.set_exception(ProbeError("closed", "connection closed before the response ended"))


class HttpProber:
    """Runs one `HttpProbe` for a region from a vantage; everything parsed once, up front."""

    overlaps = True  # runs share nothing: extra runs on suspicion may be in flight together

    def __init__(self, spec: HttpProbe, region: str, vantage: str) -> None:
        self.spec = spec
        self.subject = Subject(region, spec.name, vantage)
        url = urlsplit(spec.target)
        self._tls = spec.tls if url.scheme == "https" else None
        self._host = url.hostname or ""
        self._port = url.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        self._host_header = spec.host or (url.netloc.rsplit("@", 1)[-1] if not default_port else self._host)
        # The name for SNI and certificate checks is the Host without its port.
        self._server_name = urlsplit(f"//{self._host_header}").hostname or self._host
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._body = spec.body.encode() if spec.body is not None else b""
        # The User-Agent names the vantage, so a target's logs tell the vantages apart.
        headers = [("Host", self._host_header), ("User-Agent", f"{USER_AGENT} ({vantage})"), ("Accept", "*/*")]
        wanted = {k: v for k, v in spec.headers.items() if k.lower() not in ("host", "connection")}
        headers += [(k, v) for k, v in wanted.items() if isinstance(v, str)]
        # Credentials in the URL (https://user:pass@host/) are sent as Basic auth, as a browser would.
        if url.username is not None and not any(k.lower() == "authorization" for k in wanted):
            basic = base64.b64encode(f"{unquote(url.username)}:{unquote(url.password or '')}".encode()).decode()
            headers.append(("Authorization", f"Basic {basic}"))
        tail = [("Connection", "close")]
        if self._body or spec.method in ("POST", "PUT", "PATCH"):
            tail.append(("Content-Length", str(len(self._body))))
        self._head, self._tail = headers, tail
        # Headers whose values are secrets are read on every run (a rotated secret is picked up).
        self._secret_headers = [(k, v) for k, v in wanted.items() if isinstance(v, Secret)]
        # Built (and validated by h11) once when nothing is secret: every run sends the same request.
        self._request_event = None if self._secret_headers else self._build([])
        self._regex = re.compile(spec.body_regex) if spec.body_regex else None

    async def __call__(self) -> Result:
        started_at = time.time()
        phases = Phases()
        status: int | None = None
        extra: dict[str, object] = {}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            request = self._request_for_run()
            async with asyncio.timeout(self.spec.timeout):
                transport, exchange = await open_connection(
                    self._host, self._port, lambda: _Exchange(done), phases, self._tls, self._server_name
                )
                try:
                    if self._tls is not None:
                        check_certificate(transport, self._tls, extra)
                    transport.write(self._request(exchange.parser, request))
                    sent_at = time.perf_counter()
                    await done
                finally:
                    transport.abort()
                # h11 yields the Response event before EndOfMessage, so it is set once `done` is.
                assert exchange.response is not None  # noqa: S101
                status = exchange.response.status_code
                phases.durations["first_byte"] = (exchange.first_byte_at or sent_at) - sent_at
                self._check(status, exchange.body)
        except TimeoutError:
            error_class, error = "timeout", phases.timeout_message(self.spec.timeout)
        except ProbeError as exc:
            error_class, error = exc.error_class, str(exc)
        else:
            return self.subject.result(started_at, phases.finish(), status=status, extra=extra)
        finally:
            # The connection closes after this returns; its protocol must find `done` settled
            # rather than leave an exception on a future nobody awaits any more.
            if not done.done():
                done.cancel()
        return self.subject.result(
            started_at, phases.finish(), status=status, error_class=error_class, error=error, extra=extra
        )

    def _build(self, secrets: list[tuple[str, str]]) -> h11.Request:
        headers = [*self._head, *secrets, *self._tail]
        return h11.Request(method=self.spec.method, target=self._path, headers=headers)

    def _request_for_run(self) -> h11.Request:
        """This run's request: the one built up front, or one with its secret headers read now."""
        if self._request_event is not None:
            return self._request_event
        secrets = []
        for name, secret in self._secret_headers:
            try:
                secrets.append((name, secret.read()))
            except LookupError as exc:
                raise ProbeError("config", f"header {name}: {exc}") from None
        try:
            return self._build(secrets)
        except h11.LocalProtocolError:
            raise ProbeError(
                "config", f"a secret header ({', '.join(n for n, _ in secrets)}) is not a valid value"
            ) from None

    def _request(self, parser: h11.Connection, request: h11.Request) -> bytes:
        data = parser.send(request) or b""
        if self._body:
            data += parser.send(h11.Data(data=self._body)) or b""
        return data + (parser.send(h11.EndOfMessage()) or b"")

    def _check(self, status: int, body: bytearray) -> None:
        if not self.spec.accepts(status):
            wanted = ", ".join(map(str, self.spec.expect_status)) or "2xx"
            raise ProbeError("status", f"status {status}, expected {wanted}")
        if self._regex is not None and not self._regex.search(body.decode("utf-8", "replace")):
            raise ProbeError("body", f"body does not match {self._regex.pattern!r}")
