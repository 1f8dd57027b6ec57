"""Opening a fresh connection phase by phase: name resolution, TCP connect, TLS handshake.

A synthetic probe must see what a new client sees, so it never reuses a connection, and it
times each phase on its own (as blackbox_exporter does) so that a slow handshake is told apart
from a slow application. Failures become `ProbeError` with a short, stable class.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

from probes.spec import unreadable

if TYPE_CHECKING:
    from collections.abc import Callable

    from probes.spec import TlsSettings

P = TypeVar("P", bound=asyncio.Protocol)


class ProbeError(Exception):
    """A probe failed in a way it can name: `error_class` is short and stable, for metrics."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class Phases:
    """Marks the end of each phase; `durations` holds how long each one took."""

    __slots__ = ("_last", "current", "durations", "start")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._last = self.start
        self.durations: dict[str, float] = {}
        self.current = "dns"

    def done(self, phase: str, following: str) -> None:
        now = time.perf_counter()
        self.durations[phase] = now - self._last
        self._last = now
        self.current = following

    def finish(self) -> dict[str, float]:
        """The durations, with `total` from the start until now."""
        self.durations["total"] = time.perf_counter() - self.start
        return self.durations

    def timeout_message(self, timeout: float) -> str:
        return f"no answer within {timeout:g}s (waiting for {self.current.replace('_', ' ')})"


@lru_cache(maxsize=64)
def tls_context(ca_file: str | None, insecure_skip_verify: bool) -> ssl.SSLContext:  # noqa: FBT001 - cache key
    # Building a context (and loading a CA bundle) costs milliseconds: one per setting, shared.
    context = ssl.create_default_context(cafile=ca_file)
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@lru_cache(maxsize=256)
def certificate_not_after(der: bytes) -> datetime:
    # Loaded at the first TLS probe, not at import: an agent probing plain HTTP stays ~5 MB smaller.
    from cryptography import x509  # noqa: PLC0415

    return x509.load_der_x509_certificate(der).not_valid_after_utc


@lru_cache(maxsize=1024)  # asked at every run, for the same few hosts
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def open_connection(
    host: str,
    port: int,
    protocol_factory: Callable[[], P],
    phases: Phases,
    tls: TlsSettings | None = None,
    server_name: str | None = None,
) -> tuple[asyncio.Transport, P]:
    """Resolve, connect and (when `tls` is given) handshake, recording each phase in `phases`."""
    loop = asyncio.get_running_loop()
    context = None
    if tls is not None:  # before connecting: a CA file that cannot be loaded is the setting's fault
        try:
            context = tls_context(tls.ca_file, tls.insecure_skip_verify)
        except (OSError, ssl.SSLError) as exc:  # not cached: a file put back is read at the next run
            why = getattr(exc, "strerror", None) or str(exc)
            raise ProbeError("config", f"tls.ca_file {tls.ca_file}: cannot load it: {why}") from exc
    address = host
    if not _is_ip(host):
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ProbeError("dns", f"cannot resolve {host!r}: {exc.strerror}") from exc
        address = str(infos[0][4][0])
    phases.done("dns", "connect")
    try:
        transport, protocol = await loop.create_connection(protocol_factory, address, port)
    except ConnectionRefusedError as exc:
        raise ProbeError("refused", f"connection to {address}:{port} refused") from exc
    except OSError as exc:
        raise ProbeError("connect", f"cannot connect to {address}:{port}: {exc.strerror or exc}") from exc
    phases.done("connect", "tls" if tls is not None else "first_byte")
    if tls is not None and context is not None:
        try:
            upgraded = await loop.start_tls(
                transport, protocol, context, server_hostname=tls.server_name or server_name or host
            )
        except ssl.SSLCertVerificationError as exc:
            transport.abort()
            raise ProbeError("tls", f"certificate not trusted: {exc.verify_message}") from exc
        except (ssl.SSLError, ConnectionError) as exc:
            transport.abort()
            raise ProbeError("tls", f"TLS handshake failed: {exc}") from exc
        if upgraded is None:
            transport.abort()
            raise ProbeError("tls", "connection closed during the TLS handshake")
        transport = upgraded
        protocol.connection_made(transport)
        phases.done("tls", "first_byte")
    return transport, protocol


def check_certificate(transport: asyncio.Transport, tls: TlsSettings, extra: dict[str, object]) -> None:
    """Record the peer certificate's expiry in `extra`; fail when it is sooner than allowed."""
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return
    not_after = certificate_not_after(der)
    remaining = (not_after - datetime.now(UTC)).total_seconds()
    extra["cert_not_after"] = not_after.isoformat()
    extra["cert_expires_in_seconds"] = round(remaining, 3)
    if tls.min_validity is not None and remaining < tls.min_validity:
        raise ProbeError(
            "cert_expiry",
            f"certificate expires {not_after.isoformat()}, in {remaining / 86400:.1f} days; "
            f"at least {tls.min_validity / 86400:.1f} days required",
        )


Named = tuple[str, str | None]  # (what the user called it, its path)


def tls_trouble(ca: Named, cert: Named = ("", None), key: Named = ("", None)) -> str | None:
    """'NAME PATH: why' for TLS files that cannot be read (`unreadable`) or are not what TLS
    takes (a CA bundle, a certificate and its key, in PEM); None when they are. A readable file
    that is no certificate was retried for ever as "broker unreachable" (`[X509:
    NO_CERTIFICATE_OR_CRL_FOUND]`), the network blamed for a wrong file mounted."""
    found = unreadable(**dict([ca, cert, key]))
    if found is not None:
        return found
    context = ssl.create_default_context()
    if ca[1] is not None:
        try:
            context.load_verify_locations(cafile=ca[1])
        except ssl.SSLError as exc:
            return f"{ca[0]} {ca[1]}: no CA certificate in it (PEM){_why(exc)}"
    if cert[1] is not None:
        try:
            context.load_cert_chain(cert[1], key[1])
        except ssl.SSLError as exc:
            keyed = f" with {key[0]} {key[1]}" if key[1] is not None else ""
            return f"{cert[0]} {cert[1]}{keyed}: not a certificate and its private key (PEM){_why(exc)}"
    return None


def _why(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, when it gives one (' (NO_CERTIFICATE_OR_CRL_FOUND)'); "PEM lib" names none."""
    return f" ({exc.reason})" if exc.reason else ""
