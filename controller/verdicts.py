"""Verdicts: what regionshift believes about each region, and why.

A `Detector` is a pure function of one region's windows and the clock that returns an
`Assessment` (status, reasons, evidence). The `Judge` runs every detector on every region,
combines their assessments into one `Verdict` per region and remembers since when each
verdict holds. Statistical detectors (sequential tests, peer comparison, vantage quorum) plug
in beside `ThresholdDetector` through the same interface.

`unknown` is never treated as healthy: a region with no fresh data is `unknown`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from controller.windows import WindowStats

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from controller.config import VerdictPolicy
    from controller.windows import Window, WindowStore

Status = Literal["healthy", "degraded", "unhealthy", "unknown"]
STATUSES: tuple[Status, ...] = ("healthy", "degraded", "unhealthy", "unknown")
# Which assessment wins when detectors disagree: evidence of failure beats lack of evidence,
# and lack of evidence beats health.
_PRECEDENCE: dict[Status, int] = {"healthy": 0, "unknown": 1, "degraded": 2, "unhealthy": 3}


@dataclass(frozen=True, slots=True)
class RegionView:
    """What a detector sees of one region: its configured probes and their windows."""

    region: str
    probes: tuple[str, ...]
    windows: Mapping[tuple[str, str], Window]  # (probe, vantage) -> window

    def windows_of(self, probe: str) -> dict[str, Window]:
        return {vantage: w for (p, vantage), w in self.windows.items() if p == probe}


@dataclass(frozen=True, slots=True)
class Assessment:
    status: Status
    reasons: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)


class Detector(Protocol):
    """A pure function of one region's windows and the clock."""

    name: str

    def assess(self, view: RegionView, now: float) -> Assessment: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    region: str
    status: Status
    reasons: tuple[str, ...]
    evidence: dict[str, Any]  # detector name -> its evidence
    since: float  # when the region entered this status
    at: float  # when this verdict was computed

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "status": self.status,
            "reasons": list(self.reasons),
            "evidence": self.evidence,
            "since": self.since,
            "at": self.at,
        }


def combine(assessments: Iterable[Assessment]) -> Status:
    statuses = [a.status for a in assessments]
    return max(statuses, key=_PRECEDENCE.__getitem__) if statuses else "unknown"


class ThresholdDetector:
    """Success ratio and latency quantile per probe against the policy's fixed thresholds.

    Every vantage's fresh results for a probe are pooled. A probe whose last `down_after`
    results failed at every fresh vantage is failing at once, whatever its window's ratio (a
    region that went down must not wait for its window to fill with failures). A probe with no
    fresh result, or with fewer than `min_samples`, is not judged. The region is `unhealthy` when every judged probe
    is below `unhealthy_below` (and none is unjudged), `degraded` when any probe is below
    `degraded_below` or slower than the latency objective, `unknown` when any probe is not
    judged, and `healthy` only when every probe was judged and passed.
    """

    name = "threshold"

    def __init__(self, policy: VerdictPolicy) -> None:
        self.policy = policy

    def assess(self, view: RegionView, now: float) -> Assessment:
        if not view.probes:
            return Assessment("unknown", ("no probes configured for this region",))
        states: dict[str, str] = {}
        reasons: list[str] = []
        evidence: dict[str, Any] = {}
        for probe in view.probes:
            state, reason, evidence[probe] = self._probe(view.windows_of(probe), now)
            states[probe] = state
            if reason:
                reasons.append(f"{probe}: {reason}")
        values = set(states.values())
        if values == {"failing"}:
            status: Status = "unhealthy"
        elif values & {"failing", "degraded", "slow"}:
            status = "degraded"
        elif "unknown" in values:
            status = "unknown"
        else:
            status = "healthy"
        return Assessment(status, tuple(reasons), evidence)

    def _probe(self, windows: dict[str, Window], now: float) -> tuple[str, str | None, dict[str, Any]]:
        p = self.policy
        fresh = {v: w for v, w in windows.items() if (age := w.age(now)) is not None and age <= p.stale_after}
        ages = [a for w in windows.values() if (a := w.age(now)) is not None]
        evidence: dict[str, Any] = {
            "vantages": sorted(fresh),
            "last_result_age": round(min(ages), 3) if ages else None,
        }
        if not fresh:
            what = f"no result in the last {p.stale_after:g}s" if ages else "no result yet"
            return "unknown", what, evidence
        stats = WindowStats.pooled(s for w in fresh.values() for s in w.samples(now))
        quantile = stats.latency_quantile(p.latency.quantile)
        q_name = f"latency_p{round(p.latency.quantile * 100):d}"
        evidence.update(
            samples=stats.samples,
            failures=stats.failures,
            success_ratio=round(stats.success_ratio, 4) if stats.samples else None,
            errors=stats.errors,
        )
        evidence[q_name] = round(quantile, 4) if quantile is not None else None
        if all(w.last_failed(p.down_after, now) for w in fresh.values()):
            evidence["consecutive_failures"] = True
            return (
                "failing",
                f"the last {p.down_after} results from {', '.join(sorted(fresh))} all failed{_errors_text(stats)}",
                evidence,
            )
        if stats.samples < p.min_samples:
            return "unknown", f"only {stats.samples} of {p.min_samples} results needed to judge", evidence
        ratio = stats.success_ratio
        summary = f"{ratio:.0%} of {stats.samples} probes succeeded over {p.window:g}s from {', '.join(sorted(fresh))}"
        summary += _errors_text(stats)
        if ratio < p.unhealthy_below:
            return "failing", f"{summary}, below {p.unhealthy_below:.0%}", evidence
        if ratio < p.degraded_below:
            return "degraded", f"{summary}, below {p.degraded_below:.0%}", evidence
        if quantile is not None and quantile > p.latency.threshold:
            return (
                "slow",
                f"{q_name} {quantile * 1000:.0f}ms over {p.window:g}s exceeds {p.latency.threshold * 1000:.0f}ms",
                evidence,
            )
        return "ok", None, evidence


def _errors_text(stats: WindowStats) -> str:
    return " (" + ", ".join(f"{k} x{n}" for k, n in sorted(stats.errors.items())) + ")" if stats.errors else ""


@dataclass(frozen=True, slots=True)
class Transition:
    region: str
    previous: Status | None
    verdict: Verdict


class Judge:
    """Runs the detectors on every region and keeps each verdict's `since`."""

    def __init__(self, detectors: Sequence[Detector], probes: Mapping[str, tuple[str, ...]]) -> None:
        self.detectors = list(detectors)
        self.probes = dict(probes)  # region -> configured probe names
        self.verdicts: dict[str, Verdict] = {}

    def judge(self, windows: WindowStore, now: float) -> list[Transition]:
        """Judge every region as of `now`; return the regions whose status changed."""
        transitions = []
        for region, probes in self.probes.items():
            view = RegionView(region, probes, windows.region(region))
            assessments = {d.name: d.assess(view, now) for d in self.detectors}
            status = combine(assessments.values())
            reasons = tuple(r for a in assessments.values() for r in a.reasons)
            previous = self.verdicts.get(region)
            since = previous.since if previous is not None and previous.status == status else now
            verdict = Verdict(region, status, reasons, {n: a.evidence for n, a in assessments.items()}, since, now)
            self.verdicts[region] = verdict
            if previous is None or previous.status != status:
                transitions.append(Transition(region, previous.status if previous else None, verdict))
        return transitions
