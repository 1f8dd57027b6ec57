"""The slowdown detector: a sequential test on latency against the region's own recent baseline,
so a region 50% slower than usual is caught even far under any fixed objective.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from scipy.stats import mannwhitneyu

from controller.judging.baselines import MEDIAN, SLOW, Baseline, Baselines
from controller.judging.findings import (
    LEANING,
    SequentialDetector,
    run_evidence,
    vantages_text,
)
from controller.judging.peers import MIN_PEER_SAMPLES, PeerCheck, pooled_apart
from controller.judging.sequential import Llr, cusum, slower_of

if TYPE_CHECKING:
    from collections.abc import Generator, Mapping

    from controller.judging.verdicts import RegionView
    from controller.judging.windows import Window
    from controller.settings.policy import VerdictPolicy


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
        self._threshold = round(self.llr.threshold, 3)  # as evidence shows it
        self.baselines = baselines if baselines is not None else Baselines(policy)
        # The baselines each probe's evidence shows, as last shown, with the limits they set: the
        # same map again while they are unchanged (most passes). A new map each pass was two
        # containers per probe that the collection after the pass walked (4,000 at 10,000 series).
        self._shown: dict[
            tuple[str, str], tuple[tuple[tuple[str, Baseline], ...], dict[str, Any], dict[str, float]]
        ] = {}
        # Where the screen last stood below where anything starts, by (region, probe): the
        # baselines then, when, the fresh vantages, their windows' `slow_added`, the screen, and
        # their `slow_restarts` (while the same, each screen carried on at the same limit). A
        # slow outcome adds at most `llr.bad` to it, and nothing else raises it (a result that
        # came late, or the screen's limit lost, counts as slow: see `Window.add`), so while
        # that many more would still leave it below, the screen need not look (`_probe_steps`):
        # it then answers at most that, and looks when it could be more.
        self._quiet: dict[
            tuple[str, str],
            tuple[
                tuple[tuple[str, Baseline], ...],
                float,
                tuple[str, ...],
                int,
                float,
                int,
            ],
        ] = {}

    def _screen(self, windows: Mapping[str, Window], limits: Mapping[str, float], now: float) -> float:
        """At least the slowdown statistic of the windows with a limit over the verdict window (what the
        test `cusum(slower_of(...))` finds), as the sum of each window's own plain CUSUM of its
        slow outcomes (`Window.slow_cusum`). A run of the pooled outcomes is, at each vantage, a
        run of that vantage's outcomes, so its sum is at most the sum of their best runs; and a
        plain CUSUM, which never forgets, is at least the best run ending at its newest outcome
        within any span. Carried on over each window's new results: a few numbers a window, no
        sample made. It stays below where anything starts for all but a few healthy probes (2.7%
        of passes at 1,000 series, five vantages, the shipped test): only those pay for the test,
        which walks the window. Before the screen, the pooled statistic itself was followed as
        results came (every vantage's outcomes in time order, a sliding CUSUM a probe): a fifth of
        a judge pass at 10,000 series, and 2,000 objects every full garbage collection walked."""
        span, bad, good = self.policy.window, self.llr.bad, self.llr.good
        bound = 0.0
        for vantage, limit in limits.items():
            bound += windows[vantage].slow_cusum(now, span, limit, bad, good)
        return bound

    def _probe_steps(
        self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]
    ) -> Generator[None, None, tuple[str, str | None]]:
        """One probe's test, yielding before each part that takes long (the full test over the
        window, the run's medians against the baselines, the peers): at 10,000 series a probe
        whose screen leans was one step of 1 to 4 ms."""
        p = self.policy
        windows = view.fresh_of(probe, now, p.stale_after)
        # The vantages with a baseline, and it: the same baselines (each kept until recomputed),
        # the same map and limits as last shown.
        region = view.region
        shown = self.baselines.of_each(region, probe, windows, now)
        last = self._shown.get((region, probe))
        if last is None or last[0] != shown:
            last = self._shown[region, probe] = (
                shown,
                {v: {"slow": round(b[SLOW], 4), "median": round(b[MEDIAN], 4)} for v, b in shown},
                {v: b[SLOW] for v, b in shown},
            )
        evidence["baseline"] = last[1]
        limits = last[2]
        if not limits:
            return "ok", None
        # The effect size is looked at from where suspicion starts (see judging.suspicion).
        start = min(LEANING, p.suspicion.slow_fraction) if p.suspicion.enabled else LEANING
        # The screen as it stood, and what slow outcomes came since could have added at most.
        slow = sum([windows[v].slow_added for v in limits])
        restarts = sum([windows[v].slow_restarts for v in limits])
        quiet = self._quiet.get((region, probe))
        if (
            quiet is not None
            and quiet[0] is shown
            and quiet[1] <= now
            and quiet[5] == restarts  # no screen started over since (another limit, a late result)
            and quiet[2] == tuple(windows)
        ):
            bound = quiet[4] + (slow - quiet[3]) * self.llr.bad
            if bound < start * self.llr.threshold:
                evidence.update(llr_at_most=round(bound, 3), threshold=self._threshold)
                return "ok", None
        bound = self._screen(windows, limits, now)
        # Results stamped after `now` are not in the screen or the test yet, but counted already.
        ahead = any(w.stamped_after(now) for w in windows.values())
        restarts = sum([windows[v].slow_restarts for v in limits])  # the screen's own, if any
        if bound < start * self.llr.threshold:  # the test could not reach where anything starts
            evidence.update(llr_at_most=round(bound, 3), threshold=self._threshold)
            if not ahead:
                self._quiet[region, probe] = (shown, now, tuple(windows), slow, bound, restarts)
            return "ok", None
        self._quiet.pop((region, probe), None)
        yield  # results that come meanwhile are in the test and counted after `slow`: more, not less
        with_base = {v: windows[v] for v in limits}
        run = cusum(slower_of(with_base, limits, now, p.window), self.llr)
        evidence.update(run_evidence(run, now))
        if run.statistic / run.threshold < start:
            # The test's statistic is a bound as the screen is (a slow outcome adds at most
            # `llr.bad`, nothing else raises it), and tighter: it stands for the screen until
            # slow outcomes could take it to where anything starts.
            if not ahead:
                self._quiet[region, probe] = (shown, now, tuple(windows), slow, run.statistic, restarts)
            return "ok", None
        if run.since is None:
            return "ok", None
        since = run.since
        yield
        mine, _ = self.baselines.relative(view.region, probe, with_base, since, now)
        effect = statistics.median(mine) if mine else 1.0
        evidence["relative_median"] = round(effect, 3)
        if effect < 1 + p.slowdown.min_effect:  # slower than usual, but not by enough to count
            return "ok", None
        evidence["slower"] = True  # by the effect size: what makes a suspect (with the statistic)
        leaning = run.statistic / run.threshold >= LEANING and self._beyond_quorum(run, len(limits))
        if not (run.tripped or leaning):
            return "ok", None
        evidence["leaning"] = True
        if not run.tripped:
            return "ok", None
        yield
        what = (
            f"{probe}: {run.bad} of {run.events} results slower than usual in the last "
            f"{now - since:.0f}s, median {effect:.2f}x its baseline, from {vantages_text(run)}"
        )
        return self._finding(
            view, what, run, len(limits), lambda: self._vs_peers(view, probe, since, now), "slow", evidence
        )

    def _vs_peers(self, view: RegionView, probe: str, since: float, now: float) -> PeerCheck:
        """Each region against its baseline's floor (see `baselines.FLOOR`); a peer slower than its
        own floor by the effect size, or slower than usual beyond noise, is alike."""
        p = self.policy
        windows = view.fresh_of(probe, now, p.stale_after)
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
                name, probe, peer.fresh_of(probe, now, p.stale_after), since, now, floor=True
            )
            compared.append(name)
            pooled.extend(theirs)
            if len(theirs) < MIN_PEER_SAMPLES or len(mine) < MIN_PEER_SAMPLES:
                continue
            is_worse, p_value, their_median = worse(theirs)
            detail[name] = {"relative_median": round(their_median, 3), "p_value": round(p_value, 6)}
            if is_worse:
                worse_than.append(name)
            # The peer is slower than its own floor by the effect size, or slower than usual beyond
            # noise and not by far less than this region: a peer 15% slower (its count of slow
            # results over the test's threshold) excused a region three times as slow, worse than
            # it beyond doubt, as "a shared cause" for a whole +200% fault.
            slower = self.llr.of_counts(len(theirs), slow) > 0 and not is_worse
            if slower or their_median >= 1 + p.slowdown.min_effect:
                alike.append(name)
        apart = pooled_apart(min(len(pooled), len(mine)), lambda: worse(pooled)[0])
        return PeerCheck(tuple(compared), tuple(worse_than), tuple(alike), detail, apart)
