"""Replication lag verdicts: a pure function of a region's lag-probe windows and the clock.

A lag probe's result carries the lag as its latency: the measured lag when the heartbeat was
seen, the lower bound ("at least") when it was not, and `stalled` as its error class when the
replica stopped advancing. A lag source breaks its limit when

- replication is stalled (lag unknown and growing: never read as zero),
- the newest lag (or its lower bound) is over the limit for that region and source, or
- lag is growing fast enough (Theil-Sen slope over `trend_over`, robust to one odd reading)
  to cross the limit within `crosses_within`.

Region types weigh it: a `read-only` region's value is its replicated data, so a breach there
makes it `unhealthy`; elsewhere it makes it `degraded`. Either keeps a ramp from advancing onto
it (a failed gate) and an evacuation from sending it share: both only send share to regions
whose verdict is `healthy`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from scipy.stats import theilslopes

from controller.judging.verdicts import Assessment, RegionView, Status
from controller.judging.windows import AT, ERROR_CLASS, LATENCY, OK

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.judging.windows import Sample
    from controller.settings.policy import VerdictPolicy


class LagDetector:
    name = "lag"
    one_vantage = True  # no quorum (see `Judge`): the controller alone measures the lag

    def __init__(
        self,
        policy: VerdictPolicy,
        lag_probes: Mapping[str, Mapping[str, str]],
        region_types: Mapping[str, str],
    ) -> None:
        self.policy = policy
        self.lag_probes = lag_probes  # region -> probe -> source
        self.region_types = region_types

    def assess(self, view: RegionView, now: float) -> Assessment:
        probes = self.lag_probes.get(view.region, {})
        if not probes:
            return Assessment("healthy")
        reasons: list[str] = []
        evidence: dict[str, Any] = {}
        breached = unknown = False
        for probe, source in sorted(probes.items()):
            state, reason, evidence[probe] = self._probe(view, probe, source, now)
            breached |= state == "breach"
            unknown |= state == "unknown"
            if reason:
                reasons.append(reason)
        status: Status = "healthy"
        if breached:
            status = "unhealthy" if self.region_types.get(view.region) == "read-only" else "degraded"
        elif unknown:
            status = "unknown"
        return Assessment(status, tuple(reasons), evidence)

    def _probe(self, view: RegionView, probe: str, source: str, now: float) -> tuple[str, str | None, dict[str, Any]]:
        p = self.policy
        limit = p.lag.limit(view.region, source)
        windows = view.fresh_of(probe, now, p.stale_after)
        samples = sorted(s for w in windows.values() for s in w.samples(now, p.lag.trend_over))
        evidence: dict[str, Any] = {"source": source, "limit": limit}
        if not samples:
            return "unknown", f"{probe} ({source} lag): no result in the last {p.stale_after:g}s", evidence
        newest = samples[-1]
        lag = newest[LATENCY]
        measured = newest[ERROR_CLASS] in (None, "lagging", "stalled")  # the lag, or a bound on it
        evidence.update(
            # A run that measured nothing (its latency is how long it tried) shows no lag, as
            # `regionshift_replication_lag_seconds` shows NaN then.
            lag=round(lag, 4) if measured and math.isfinite(lag) else None,
            measured=newest[OK],
            stalled=newest[ERROR_CLASS] == "stalled",
        )
        what = f"{probe} ({source} lag)"
        if newest[ERROR_CLASS] == "stalled":
            bound = f" (at least {lag:.1f}s)" if math.isfinite(lag) else ""
            return "breach", f"{what}: replication stalled, lag unknown and growing{bound}", evidence
        if newest[ERROR_CLASS] not in (None, "lagging"):
            return "unknown", f"{what}: not measured ({newest[ERROR_CLASS]})", evidence
        shown = f"{lag:.1f}s" if newest[OK] else f"at least {lag:.1f}s"
        if lag > limit:
            return "breach", f"{what}: {shown}, over its {limit:g}s limit", evidence
        slope = _slope(samples, p.lag.min_trend_samples)
        if slope is not None:
            evidence["growth"] = round(slope, 4)  # seconds of lag per second
            if slope > 0 and lag + slope * p.lag.crosses_within > limit:
                crosses = (limit - lag) / slope
                reason = f"{what}: {shown} and growing {slope:.2f}s per second: crosses its {limit:g}s limit"
                return "breach", f"{reason} in {crosses:.0f}s", evidence
        return "ok", None, evidence


def _slope(samples: list[Sample], at_least: int) -> float | None:
    """Lag growth in seconds per second (Theil-Sen), or None with too few results."""
    usable = [s for s in samples if s[OK] or s[ERROR_CLASS] == "lagging"]
    if len(usable) < at_least or usable[-1][AT] <= usable[0][AT]:
        return None
    slope = theilslopes([s[LATENCY] for s in usable], [s[AT] for s in usable]).slope
    return float(slope)
