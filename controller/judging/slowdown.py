"""The slowdown detector: a sequential test on latency against the region's own recent baseline,
so a region 50% slower than usual is caught even far under any fixed objective.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

from scipy.stats import mannwhitneyu

from controller.judging.baselines import Baselines
from controller.judging.findings import (
    LEANING,
    SequentialDetector,
    fresh,
    run_evidence,
    vantages_text,
)
from controller.judging.peers import MIN_PEER_SAMPLES, PeerCheck, pooled_apart
from controller.judging.sequential import Llr, SlidingCusum, cusum, slower

if TYPE_CHECKING:
    from controller.judging.verdicts import RegionView
    from controller.judging.windows import Window, WindowKey
    from controller.settings.policy import VerdictPolicy


class _Track:
    """One key's slow outcomes against one limit, followed as results come (see `_bound`)."""

    __slots__ = ("added", "ahead", "cusum", "late", "limit", "window")

    def __init__(self, window: Window, limit: float, span: float) -> None:
        self.window, self.limit = window, limit
        self.cusum = SlidingCusum(span)
        self.added, self.late, self.ahead = window.added, window.late, -math.inf


class SlowdownDetector(SequentialDetector):
    """Sequential test of each probe's latency against its own baseline: a successful result
    slower than the baseline's quantile is a 'slow' outcome, expected at 1 - quantile when
    nothing changed. A probe is slow when the test trips, a quorum of vantages agree, its
    median is `min_effect` above its baseline, and a rank test (Mann-Whitney U, one-sided) finds
    it slower than its peers by that effect too, each relative to its own baseline."""

    name = "slowdown"

    def __init__(self, policy: VerdictPolicy, baselines: Baselines | None = None) -> None:
        self.policy = policy
        self.llr = Llr.of(policy.slowdown)
        self.baselines = baselines if baselines is not None else Baselines(policy)
        self._tracks: dict[WindowKey, _Track] = {}

    def _bound(self, key: WindowKey, window: Window, limit: float, now: float) -> float:
        """At least the slowdown statistic of one vantage's results over the verdict window,
        kept as results come: O(new results), where the test itself walks the window. The
        pooled statistic is at most the sum of the vantages' (a run of the pooled outcomes is
        one run of each vantage's), so a probe whose sum stays under what could matter needs
        no test this tick. Followed anew when the baseline's limit moves (once a verdict
        window) or a result came late; infinite while a result is stamped ahead of `now`."""
        track = self._tracks.get(key)
        if track is not None and track.limit == limit and track.late == window.late and track.window is window:
            new = window.newest(window.added - track.added)
        else:
            track = self._tracks[key] = _Track(window, limit, self.policy.window)
            new = window.after(now - self.policy.window)
        cusum_, bad, good = track.cusum, self.llr.bad, self.llr.good
        for sample in new:
            track.ahead = max(track.ahead, sample.at)
            if sample.ok:
                cusum_.add(sample.at, bad if sample.latency > limit else good)
        track.added = window.added
        return math.inf if track.ahead > now else cusum_.statistic(now)

    def _probe(self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]) -> tuple[str, str | None]:
        p = self.policy
        windows = fresh(view.windows_of(probe), now, p.stale_after)
        base = {
            v: b for v, w in windows.items() if (b := self.baselines.of((view.region, probe, v), w, now)) is not None
        }
        evidence["baseline"] = {v: {"slow": round(b.slow, 4), "median": round(b.median, 4)} for v, b in base.items()}
        if not base:
            return "ok", None
        # The effect size is looked at from where suspicion starts (see judging.suspicion).
        start = min(LEANING, p.suspicion.slow_fraction) if p.suspicion.enabled else LEANING
        bound = sum(self._bound((view.region, probe, v), windows[v], b.slow, now) for v, b in base.items())
        if bound < start * self.llr.threshold:  # the test could not reach where anything starts
            evidence.update(llr_at_most=round(bound, 3), threshold=round(self.llr.threshold, 3))
            return "ok", None
        run = cusum(
            slower({v: windows[v].samples(now, p.window) for v in base}, {v: b.slow for v, b in base.items()}),
            self.llr,
        )
        evidence.update(run_evidence(run, now))
        if run.statistic / run.threshold < start or run.since is None:
            return "ok", None
        since = run.since
        mine, _ = self.baselines.relative(view.region, probe, {v: windows[v] for v in base}, since, now)
        effect = statistics.median(mine) if mine else 1.0
        evidence["relative_median"] = round(effect, 3)
        if effect < 1 + p.slowdown.min_effect:  # slower than usual, but not by enough to count
            return "ok", None
        evidence["slower"] = True  # by the effect size: what makes a suspect (with the statistic)
        leaning = run.statistic / run.threshold >= LEANING and self._beyond_quorum(run, len(base))
        if not (run.tripped or leaning):
            return "ok", None
        evidence["leaning"] = True
        if not run.tripped:
            return "ok", None
        what = (
            f"{probe}: {run.bad} of {run.events} results slower than usual in the last "
            f"{now - since:.0f}s, median {effect:.2f}x its baseline, from {vantages_text(run)}"
        )
        return self._finding(
            view, what, run, len(base), lambda: self._vs_peers(view, probe, since, now), "slow", evidence
        )

    def _vs_peers(self, view: RegionView, probe: str, since: float, now: float) -> PeerCheck:
        """Each region against its baseline's floor (see `Baseline.floor`); a peer slower than its
        own floor by the effect size, or slower than usual beyond noise, is alike."""
        p = self.policy
        windows = fresh(view.windows_of(probe), now, p.stale_after)
        mine, _ = self.baselines.relative(view.region, probe, windows, since, now, floor=True)

        def worse(theirs: list[float]) -> tuple[bool, float, float]:
            p_value = float(mannwhitneyu(mine, theirs, alternative="greater").pvalue)
            their_median = statistics.median(theirs)
            ratio = statistics.median(mine) / their_median
            return p_value < p.peers.significance and ratio >= 1 + p.slowdown.min_effect, p_value, their_median

        compared, worse_than, alike, detail = [], [], [], {}
        pooled: list[float] = []
        for name, peer in sorted(view.peers.items()):
            if probe not in peer.probes:
                continue
            theirs, slow = self.baselines.relative(
                name, probe, fresh(peer.windows_of(probe), now, p.stale_after), since, now, floor=True
            )
            compared.append(name)
            pooled.extend(theirs)
            if len(theirs) < MIN_PEER_SAMPLES or len(mine) < MIN_PEER_SAMPLES:
                continue
            if self.llr.of_counts(len(theirs), slow) > 0 or statistics.median(theirs) >= 1 + p.slowdown.min_effect:
                alike.append(name)  # the peer is slower than usual too, or than its own floor
            is_worse, p_value, their_median = worse(theirs)
            detail[name] = {"relative_median": round(their_median, 3), "p_value": round(p_value, 6)}
            if is_worse:
                worse_than.append(name)
        apart = pooled_apart(min(len(pooled), len(mine)), lambda: worse(pooled)[0])
        return PeerCheck(tuple(compared), tuple(worse_than), tuple(alike), detail, apart)
