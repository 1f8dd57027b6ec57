"""Labelled synthetic result streams: the same `Result` records probes produce, generated for
several regions, probes and vantages, with a known fault starting at a known time.

The detection benchmark (`bench/detection.py`) replays these through the daemon's detectors
and through the baselines it compares them with; the detector tests use them for streams
with known answers. Healthy results fail 0.1% of the time at random and have per-(region,
vantage) base latencies (geography), log-normal jitter and rare spikes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from probes.results import Result

if TYPE_CHECKING:
    from collections.abc import Iterator

REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")
PROBES = ("healthz", "api")
VANTAGES = ("controller", "agent-us-east-1", "agent-eu-west-1")
HEALTHY_ERROR_RATIO = 0.001
TIMEOUT = 2.0  # seconds; what a region that does not answer costs a probe
SPIKE_RATIO = 0.005  # share of healthy results with a latency spike (GC pause, retransmit)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A fault: from `onset` (seconds after the stream starts), results of the affected
    regions, probes and vantages fail with `error_ratio` (timeouts when `down`) and take
    `latency_factor` times as long; with `flap`, the fault is on for `flap` seconds, off for
    as long, and so on; with `shared_before`, every region has it for that long before the onset
    (a fault every region shared, then one region that did not come back). `culprit` is the
    region a detector should name (None: no region)."""

    name: str
    culprit: str | None = None
    regions: tuple[str, ...] = ()
    probes: tuple[str, ...] = PROBES
    vantages: tuple[str, ...] = VANTAGES
    error_ratio: float = 0.0
    latency_factor: float = 1.0
    down: bool = False
    flap: float | None = None
    onset: float = 600.0
    shared_before: float = 0.0

    def active(self, region: str, probe: str, vantage: str, t: float) -> bool:
        if self.onset - self.shared_before <= t < self.onset:
            return probe in self.probes and vantage in self.vantages
        if t < self.onset or region not in self.regions or probe not in self.probes or vantage not in self.vantages:
            return False
        return self.flap is None or int((t - self.onset) // self.flap) % 2 == 0


HEALTHY = Scenario("healthy")


def scenarios(culprit: str = "eu-west-1") -> list[Scenario]:
    """The benchmark's scenarios, one region (`culprit`) at fault unless said otherwise."""
    one = (culprit,)
    return [
        Scenario("errors 40% on api", culprit, one, ("api",), error_ratio=0.40),
        Scenario("errors 15% on api", culprit, one, ("api",), error_ratio=0.15),
        Scenario("errors 5% on api", culprit, one, ("api",), error_ratio=0.05),
        Scenario("errors 2% on api", culprit, one, ("api",), error_ratio=0.02),
        Scenario("latency +50%", culprit, one, latency_factor=1.5),
        Scenario("latency +200%", culprit, one, latency_factor=3.0),
        Scenario("api path broken", culprit, one, ("api",), error_ratio=1.0),
        Scenario("region down", culprit, one, error_ratio=1.0, down=True),
        Scenario("flapping 40% (30s on/off)", culprit, one, ("api",), error_ratio=0.40, flap=30.0),
        Scenario("one vantage loses network", None, REGIONS, vantages=(VANTAGES[1],), error_ratio=1.0, down=True),
        Scenario("every region degrading", None, REGIONS, ("api",), error_ratio=0.10, latency_factor=2.0),
        Scenario("every region failing 5% on api", None, REGIONS, ("api",), error_ratio=0.05),
        Scenario("every region failing 40% on api", None, REGIONS, ("api",), error_ratio=0.40),
        Scenario("40% on api after a shared minute", culprit, one, ("api",), error_ratio=0.40, shared_before=60.0),
    ]


@dataclass
class Stream:
    """Results of every (region, probe, vantage), each probed every `interval` seconds at its
    own phase, in time order, from `start` for `duration` seconds."""

    scenario: Scenario = HEALTHY
    seed: int = 0
    start: float = 1_700_000_000.0
    interval: float = 1.0
    regions: tuple[str, ...] = REGIONS
    probes: tuple[str, ...] = PROBES
    vantages: tuple[str, ...] = VANTAGES
    _rng: random.Random = field(init=False)
    _base: dict[tuple[str, str, str], float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 - reproducible noise, not secrets

    def base_latency(self, region: str, probe: str, vantage: str) -> float:
        """Seconds: farther regions are slower, the API slower than /healthz."""
        distance = (self.regions.index(region) + self.vantages.index(vantage)) % len(self.regions)
        return (0.02 + 0.06 * distance) * (1.5 if probe == "api" else 1.0)

    def answer(self, region: str, probe: str, vantage: str, t: float) -> Result:
        """One probe of (region, probe, vantage) started `t` seconds into the stream, as the world
        answers it then: the closed-loop benchmark asks this whenever its scheduler runs a probe."""
        rng = self._rng
        key = (region, probe, vantage)
        base = self._base.get(key)
        if base is None:
            base = self._base[key] = self.base_latency(*key)
        latency = base * rng.lognormvariate(0.0, 0.15)
        if rng.random() < SPIKE_RATIO:
            latency *= rng.uniform(2.0, 5.0)
        error_ratio = HEALTHY_ERROR_RATIO
        down = False
        scenario = self.scenario
        if scenario.active(region, probe, vantage, t):
            latency *= scenario.latency_factor
            error_ratio = max(error_ratio, scenario.error_ratio)
            down = scenario.down
        ok = rng.random() >= error_ratio
        at = self.start + t
        if ok:
            return Result(region, probe, vantage, at, ok=True, latency=latency, status=200)
        if down:
            return Result(region, probe, vantage, at, ok=False, latency=TIMEOUT, error_class="timeout")
        return Result(region, probe, vantage, at, ok=False, latency=latency, status=503, error_class="status")

    def results(self, duration: float) -> Iterator[Result]:
        """Every key probed once per `interval` at its own phase, in time order (open loop)."""
        keys = [(r, p, v) for r in self.regions for p in self.probes for v in self.vantages]
        phases = sorted((self._rng.random() * self.interval, key) for key in keys)
        for tick in range(int(duration / self.interval)):
            for phase, key in phases:
                yield self.answer(*key, tick * self.interval + phase)
