"""Latency baselines: each (region, probe, vantage)'s usual latency, what the slowdown test
compares new results with.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, NamedTuple

from controller.judging.findings import (
    samples_since,
)
from controller.judging.windows import WindowStats

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.judging.windows import Sample, Window
    from controller.settings.policy import VerdictPolicy


class Baseline(NamedTuple):
    slow: float  # a successful sample slower than this counts as slow
    median: float


class Baselines:
    """Each (region, probe, vantage)'s usual latency, from its successful results over
    `baseline` seconds ending one verdict window before the last refresh, cut into verdict-window
    slices: the median across slices of each slice's slowdown quantile (and of its median). A
    slowdown so becomes the new normal only once it fills half the baseline, not the
    1 - quantile of it a plain quantile would allow. Refreshed once per verdict window."""

    def __init__(self, policy: VerdictPolicy) -> None:
        self.policy = policy
        self._refreshed: float | None = None
        self._cache: dict[int, Baseline | None] = {}

    def of(self, window: Window, now: float) -> Baseline | None:
        p = self.policy
        refreshed = math.floor(now / p.window) * p.window
        if refreshed != self._refreshed:
            self._cache.clear()
            self._refreshed = refreshed
        key = id(window)
        if key not in self._cache:
            self._cache[key] = self._compute(window.samples(refreshed - p.window, p.slowdown.baseline))
        return self._cache[key]

    def _compute(self, samples: list[Sample]) -> Baseline | None:
        p = self.policy
        slices: dict[int, list[Sample]] = {}
        for s in samples:
            slices.setdefault(math.floor(s.at / p.window), []).append(s)
        slows, medians, count = [], [], 0
        for part in slices.values():
            stats = WindowStats.pooled(part)
            if stats.latencies:
                slows.append(stats.latency_quantile(p.slowdown.quantile) or 0.0)
                medians.append(statistics.median(stats.latencies))
                count += len(stats.latencies)
        if count < p.slowdown.min_baseline_samples:
            return None
        # median_low: always one slice's own value, never a blend of an old and a new normal.
        return Baseline(statistics.median_low(slows), statistics.median_low(medians))

    def relative(self, windows: Mapping[str, Window], since: float, now: float) -> tuple[list[float], int]:
        """Successful latencies since `since`, each divided by its vantage's baseline median, and
        how many of them were slower than usual."""
        out: list[float] = []
        slow = 0
        for w in windows.values():
            base = self.of(w, now)
            if base is not None:
                latencies = [s.latency for s in samples_since(w.samples(now, self.policy.window), since) if s.ok]
                out.extend(latency / base.median for latency in latencies)
                slow += sum(latency > base.slow for latency in latencies)
        return out, slow
