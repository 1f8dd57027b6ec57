"""The `tcp` probe kind: a fresh TCP connection, optionally with a TLS handshake."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from probes.connection import Phases, ProbeError, check_certificate, open_connection
from probes.results import Result, Subject
from probes.spec import split_host_port

if TYPE_CHECKING:
    from probes.spec import TcpProbe


class TcpProber:
    """Runs one `TcpProbe` for a region from a vantage."""

    overlaps = True  # runs share nothing: extra runs on suspicion may be in flight together

    def __init__(self, spec: TcpProbe, region: str, vantage: str) -> None:
        self.spec = spec
        self.subject = Subject(region, spec.name, vantage)
        self._host, self._port = split_host_port(spec.target)
        self._tls = spec.tls if spec.tls_handshake else None

    async def __call__(self) -> Result:
        started_at = time.time()
        phases = Phases()
        extra: dict[str, object] = {}
        error_class: str | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.spec.timeout):
                transport, _ = await open_connection(self._host, self._port, asyncio.Protocol, phases, self._tls)
                try:
                    if self._tls is not None:
                        check_certificate(transport, self._tls, extra)
                finally:
                    transport.abort()
        except TimeoutError:
            error_class = "timeout"
            error = phases.timeout_message(self.spec.timeout)
        except ProbeError as exc:
            error_class, error = exc.error_class, str(exc)
        return self.subject.result(started_at, phases.finish(), error_class=error_class, error=error, extra=extra)
