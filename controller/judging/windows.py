"""Rolling windows of probe results, one per (region, probe, vantage).

A window keeps the last `span` seconds of outcomes and latencies and answers what detectors
ask: how many samples, what share succeeded, a latency quantile, how fresh the newest one is.
Time is passed in (the results' own wall-clock start times and a `now`), so the same windows
serve the daemon, the tests and the offline benchmarks.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterable

    from probes.results import Result

WindowKey = tuple[str, str, str]  # region, probe, vantage
# Samples one window keeps at most between two trims: a probe every 10 ms for 100 s. It bounds
# memory when results arrive faster than anyone trims; real probes never come near it.
MAX_SAMPLES = 10_000


class Sample(NamedTuple):
    at: float
    ok: bool
    latency: float
    error_class: str | None
    # Run on its schedule, not as an extra run on suspicion: "the last N results failed" counts
    # scheduled runs, so ten extra runs a second do not make three failures in a row of a 40%
    # fault look like a region that went down.
    scheduled: bool = True


@dataclass(frozen=True, slots=True)
class WindowStats:
    samples: int
    failures: int
    errors: dict[str, int]  # error class -> count
    latencies: tuple[float, ...]  # of successful samples, sorted

    @property
    def success_ratio(self) -> float:
        return (self.samples - self.failures) / self.samples if self.samples else math.nan

    def latency_quantile(self, q: float) -> float | None:
        """Nearest-rank quantile of successful latencies; None without any."""
        if not self.latencies:
            return None
        rank = max(1, math.ceil(q * len(self.latencies)))
        return self.latencies[rank - 1]

    @classmethod
    def pooled(cls, samples: Iterable[Sample]) -> WindowStats:
        samples = list(samples)
        latencies = sorted([s.latency for s in samples if s.ok])
        errors = (
            Counter(s.error_class or "unknown" for s in samples if not s.ok) if len(latencies) < len(samples) else {}
        )
        return cls(len(samples), len(samples) - len(latencies), dict(errors), tuple(latencies))


class Window:
    """The results of one (region, probe, vantage) over the last `span` seconds."""

    __slots__ = ("_failed_at", "_looked", "_samples", "_version", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._samples: deque[Sample] = deque()
        # When each kept sample that failed started, in order: failures are rare, so counting
        # them over a long span does not walk every sample (the error tests ask every tick).
        self._failed_at: deque[float] = deque()
        self._version = 0  # changes whenever the samples do
        # The last answer of `samples`: (now, span, version, samples).
        self._looked: tuple[float, float, int, list[Sample]] | None = None

    def add(self, result: Result) -> None:
        """Keep a result; only `trim(now)` forgets, so a result stamped ahead of the clock (a
        skewed agent) cannot push out samples that are still current."""
        sample = Sample(result.started_at, result.ok, result.latency, result.error_class, result.reason == "scheduled")
        self._version += 1
        # Results arrive nearly in order; one that is older than the newest goes in its place so
        # trimming from the left stays correct.
        if self._samples and sample.at < self._samples[-1].at:
            self._samples = deque(sorted([*self._samples, sample]))
        else:
            self._samples.append(sample)
        if not sample.ok:
            if self._failed_at and sample.at < self._failed_at[-1]:
                self._failed_at = deque(sorted([*self._failed_at, sample.at]))
            else:
                self._failed_at.append(sample.at)
        if len(self._samples) > MAX_SAMPLES:
            dropped = self._samples.popleft()
            if not dropped.ok:
                self._failed_at.popleft()

    def first_at(self) -> float | None:
        """When the oldest kept sample started; None without any."""
        return self._samples[0].at if self._samples else None

    def last_failure(self) -> float | None:
        """When the newest kept failure started; None without one."""
        return self._failed_at[-1] if self._failed_at else None

    def passes_since_failure(self, limit: int) -> int:
        """How many results passed after the newest failure, counting at most `limit` of them
        (a walk back from the newest that stops there: cheap however long the window)."""
        last = self.last_failure()
        count = 0
        for sample in reversed(self._samples):
            if count >= limit or (last is not None and sample.at <= last):
                break
            count += sample.ok
        return count

    def trim(self, now: float) -> None:
        horizon = now - self.span
        samples = self._samples
        while samples and samples[0].at <= horizon:
            samples.popleft()
            self._version += 1
        failed = self._failed_at
        while failed and failed[0] <= horizon:
            failed.popleft()

    def samples(self, now: float, span: float | None = None) -> list[Sample]:
        """Samples within (now - span, now], oldest first; `span` defaults to the window's own.
        Walks back from the newest sample only as far as the span reaches, so a short look at a
        window that keeps a long history costs what the short look holds, and remembers the
        answer (every detector asks the same in one judgement): the list is shared with the next
        caller asking the same; do not change it."""
        span = self.span if span is None else span
        looked = self._looked
        if looked is not None and looked[0] == now and looked[1] == span and looked[2] == self._version:
            return looked[3]
        horizon = now - span
        found = []
        for sample in reversed(self._samples):
            if sample.at <= horizon:
                break
            if sample.at <= now:
                found.append(sample)
        found.reverse()
        self._looked = (now, span, self._version, found)
        return found

    def failures(self, now: float, span: float | None = None) -> int:
        """How many of `samples(now, span)` failed, from the failure times alone."""
        horizon = now - (self.span if span is None else span)
        count = 0
        for at in reversed(self._failed_at):
            if at <= horizon:
                break
            count += at <= now
        return count

    def last_failed(self, n: int, now: float, span: float | None = None) -> bool:
        """Whether the newest `n` scheduled samples within (now - span, now] (and there are that
        many) all failed, and no sample (scheduled or extra) passed since the oldest of them."""
        count = 0
        horizon = now - (self.span if span is None else span)
        for sample in reversed(self._samples):
            if sample.at > now:
                continue
            if sample.ok or sample.at <= horizon:
                return False
            count += sample.scheduled
            if count >= n:
                return True
        return False

    def age(self, now: float) -> float | None:
        """Seconds since the newest sample at or before `now` (one stamped later does not count yet)."""
        for sample in reversed(self._samples):
            if sample.at <= now:
                return now - sample.at
        return None


class WindowStore:
    """All windows, created on first result."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._windows: dict[WindowKey, Window] = {}
        self._by_region: dict[str, dict[tuple[str, str], Window]] = {}

    def add(self, result: Result) -> None:
        key = (result.region, result.probe, result.vantage)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = Window(self.span)
            self._by_region.setdefault(result.region, {})[(result.probe, result.vantage)] = window
        window.add(result)

    def region(self, region: str) -> dict[tuple[str, str], Window]:
        """(probe, vantage) -> window for one region."""
        return self._by_region.get(region, {})

    def trim(self, now: float) -> None:
        for window in self._windows.values():
            window.trim(now)
