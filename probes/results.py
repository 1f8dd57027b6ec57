"""The one thing probes produce: a `Result` record per probe run.

Everything downstream (windows, verdicts, metrics, the wire format for agents) consumes these and
nothing else, so a probe kind knows nothing of the controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from probes.spec import redact

Outcome = Literal["success", "failure", "timeout"]
OUTCOMES: tuple[Outcome, ...] = ("success", "failure", "timeout")
# Why a probe ran: on its interval, or as an extra run on a target under suspicion.
RunReason = Literal["scheduled", "suspicion"]
RUN_REASONS: tuple[RunReason, ...] = ("scheduled", "suspicion")

# Phase names, as blackbox_exporter's probe_http_duration_seconds{phase} splits a request:
# each is the duration of that phase alone, in seconds.
PHASES = ("dns", "connect", "tls", "first_byte", "total")


@dataclass(frozen=True, slots=True)
class Result:
    region: str
    probe: str
    vantage: str
    started_at: float  # wall clock, seconds since the epoch
    ok: bool
    latency: float  # seconds, start to end (or to the failure)
    phases: dict[str, float] = field(default_factory=dict)
    status: int | None = None  # HTTP status, when there was a response
    error_class: str | None = None  # short and stable: timeout, refused, tls, status, body, dns, ...
    error: str | None = None  # human sentence with the detail
    extra: dict[str, Any] = field(default_factory=dict)  # per kind, e.g. cert_expires_in_seconds
    reason: RunReason = "scheduled"

    @property
    def outcome(self) -> Outcome:
        if self.ok:
            return "success"
        timed_out = self.error_class == "timeout" or (self.error_class or "").endswith(" timeout")  # "primary timeout"
        return "timeout" if timed_out else "failure"


@dataclass(frozen=True, slots=True)
class Subject:
    """What a probe run is about: which region, which probe, seen from which vantage."""

    region: str
    probe: str
    vantage: str

    def result(
        self,
        started_at: float,
        phases: dict[str, float],
        *,
        status: int | None = None,
        error_class: str | None = None,
        error: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Result:
        return Result(
            region=self.region,
            probe=self.probe,
            vantage=self.vantage,
            started_at=started_at,
            ok=error_class is None,
            latency=phases["total"],
            phases=phases,
            status=status,
            error_class=error_class,
            error=redact(error) if error else error,
            extra=extra or {},
        )

    def lag_result(
        self,
        started_at: float,
        elapsed: float,
        extra: dict[str, Any],
        error_class: str | None = None,
        error: str | None = None,
        lag: float | None = None,
    ) -> Result:
        """A replication-lag probe's result: the lag is its latency, as given (infinite when
        not replicating), else the measured `lag_seconds`, else the lower bound `lag_at_least`;
        the run's own `elapsed` time when there is no lag at all (it could not ask)."""
        for value in (lag, extra.get("lag_seconds"), extra.get("lag_at_least")):
            if value is not None:
                break
        else:
            value = elapsed
        return self.result(started_at, {"total": value}, error_class=error_class, error=error, extra=extra)
