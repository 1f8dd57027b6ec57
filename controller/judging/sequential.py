"""Sequential tests on yes/no outcomes: Wald's SPRT, restarted whenever it leans healthy
(Page's CUSUM), over the outcomes of one window.

Each outcome moves the log-likelihood ratio of "the bad ratio is `unacceptable`" against "it is
`acceptable`": a bad outcome adds ln(p1/p0), a good one adds ln((1-p1)/(1-p0)). The statistic
is the largest sum over any run of the newest outcomes, so old good outcomes cannot hide a
fault that started a moment ago, and the test decides as soon as that sum crosses
ln((1 - miss_rate) / false_alarm_rate): a region failing 40% of probes crosses it within a
few probe rounds. This is the small closed form the design notes name; nothing here needs a
statistics package, except the binomial tail of the quorum check (do the vantages other than
the worst one(s) show the fault too?) and Fisher's exact test of one failure count against
another's (`fails_more`).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import binom, fisher_exact

from controller.judging.windows import AT, LATENCY, OK, failure_times_in

if TYPE_CHECKING:
    from array import array
    from collections.abc import Iterable, Mapping, Sequence

    from controller.judging.windows import Sample, Window
    from controller.settings.policy import SequentialTest


# One outcome: when, from which vantage, and whether it counts against the region. Plain
# tuples, sorted by time: the judge builds thousands of them every second.
Event = tuple[float, str, bool]


@dataclass(frozen=True, slots=True)
class Llr:
    bad: float  # added by a bad outcome: ln(p1/p0) > 0
    good: float  # added by a good outcome: ln((1-p1)/(1-p0)) < 0
    threshold: float  # ln((1 - miss_rate) / false_alarm_rate)
    acceptable: float  # p0: the bad ratio of a healthy target

    @classmethod
    def of(cls, test: SequentialTest) -> Llr:
        p0, p1 = test.acceptable, test.unacceptable
        return cls(
            bad=math.log(p1 / p0),
            good=math.log((1 - p1) / (1 - p0)),
            threshold=math.log((1 - test.miss_rate) / test.false_alarm_rate),
            acceptable=p0,
        )

    def of_counts(self, events: int, bad: int) -> float:
        return bad * self.bad + (events - bad) * self.good


@dataclass(frozen=True, slots=True)
class Run:
    """The newest run of outcomes that carries the most evidence of a fault."""

    statistic: float  # log-likelihood ratio over the run; 0 when the window leans healthy
    threshold: float
    acceptable: float  # the test's healthy bad ratio
    since: float | None  # time of the run's first outcome
    events: int
    bad: int
    by_vantage: dict[str, tuple[int, int]]  # vantage -> (outcomes, bad ones) within the run

    @property
    def tripped(self) -> bool:
        return self.statistic >= self.threshold

    @property
    def ratio(self) -> float:
        return self.bad / self.events if self.events else 0.0

    def beyond(self, dropped: int) -> tuple[tuple[str, ...], float]:
        """The quorum check: leave out the `dropped` vantages with the most bad outcomes in the
        run (the ones a broken network path would be) and return them, with the chance that the
        other vantages' outcomes would hold at least as many bad ones from a healthy target
        (binomial tail at the acceptable ratio; 1.0 when no vantage is left)."""
        ranked = sorted(self.by_vantage, key=lambda v: (-self.by_vantage[v][1], self.by_vantage[v][0], v))
        rest = [self.by_vantage[v] for v in ranked[dropped:]]
        n, bad = sum(c[0] for c in rest), sum(c[1] for c in rest)
        return tuple(ranked[:dropped]), float(binom.sf(bad - 1, n, self.acceptable)) if n else 1.0


def cusum(events: Sequence[Event], llr: Llr) -> Run:
    """The CUSUM statistic over `events` (oldest first) and the run that makes it: the largest
    sum of the newest outcomes, which is the last total less the lowest running total."""
    bad, good = llr.bad, llr.good
    totals = list(accumulate([bad if e[2] else good for e in events], initial=0.0))
    low = min(totals)
    start = len(totals) - 1 - totals[::-1].index(low)  # the latest low: the shortest run
    run = events[start:]
    counts: dict[str, list[int]] = {}
    for _, vantage, is_bad in run:
        count = counts.setdefault(vantage, [0, 0])
        count[0] += 1
        count[1] += is_bad
    by_vantage = {v: (n, b) for v, (n, b) in counts.items()}
    return Run(
        statistic=totals[-1] - low,
        threshold=llr.threshold,
        acceptable=llr.acceptable,
        since=run[0][0] if run else None,
        events=len(run),
        bad=sum(b for _, b in by_vantage.values()),
        by_vantage=by_vantage,
    )


def failure_cusum_bound(
    windows: Iterable[Window], now: float, span: float, llr: Llr, enough: float = math.inf
) -> float:
    """At least the CUSUM statistic of the failures of `windows` pooled (the statistic `cusum`
    of `failures` gives) over (now - span, now], from the failure times and two bisects per
    window and failure: no walk over the samples. The run that makes the statistic starts at a
    failure, so the largest of bad x the failures since each failure time and good x the passes
    after it is the statistic (a little more where results share that time exactly). The error
    tests skip the full test while this stays below what could matter: a healthy probe's few
    noise failures over a 10 minute horizon no longer cost a walk over its thousands of results.
    The newest failures are looked at first, and the look stops once the bound reaches `enough`
    (what it is compared with): a path where everything fails gets there within a few failures,
    where looking at each of its thousands took as many bisects of every window. It stops too,
    below `enough`, once no older failure can get there: a run from an older failure holds at
    most every failure and at least the passes after the newer one (a healthy vantage's few noise
    failures over a hundred probes: the newest one alone, not a bisect of every window for each).
    What it answers then is that most, still at least the statistic. The windows are read (one
    bisect each) only until their passes after the newest failure settle that: a vantage's
    hundred probes at a probe a second, the failure seconds old, settle it within a few."""
    kept = list(windows)
    times = failure_times_in(kept, now, span)
    if not times:
        return 0.0
    every = len(times) * llr.bad  # a run holding every failure, at most
    stops = enough < math.inf  # with no `enough` given, the statistic itself is asked for
    columns: list[tuple[array[float], int, int]] = []
    unread = iter(kept)
    best = 0.0
    for i in range(len(times) - 1, -1, -1):
        at = times[i]
        if i and times[i - 1] == at:
            continue
        since = len(times) - i  # failures at or after `at`
        after = len(times) - bisect_right(times, at)
        passes = sum(end - bisect_right(column, at, start, end) for column, start, end in columns) - after
        for window in unread:  # read at the newest failure: as few as settle it, or every one
            if stops and every + passes * llr.good < enough:  # the passes read so far, at least
                return max(best, every + passes * llr.good)
            column, start, end = window.starts_until(now)
            columns.append((column, start, end))
            passes += end - bisect_right(column, at, start, end)
        best = max(best, since * llr.bad + passes * llr.good)
        if best >= enough:
            break
        most = every + passes * llr.good  # any run from an older failure, at most
        if stops and most < enough:
            return max(best, most)
    return best


def fails_more(
    mine: tuple[int, int], theirs: tuple[int, int], significance: float, min_ratio: float
) -> tuple[bool, float]:
    """Whether `mine` (results, failures) fails significantly more often than `theirs`
    (Fisher's exact test, one-sided, at `significance`) and at least `min_ratio` times their
    ratio; and the p-value."""
    (n, bad), (their_n, their_bad) = mine, theirs
    table = np.array([[bad, n - bad], [their_bad, their_n - their_bad]])
    p_value = float(fisher_exact(table, alternative="greater").pvalue)
    return p_value < significance and bad * their_n >= min_ratio * their_bad * n, p_value


def failures(samples: Mapping[str, Sequence[Sample]]) -> list[Event]:
    """Every sample as an outcome, bad when it failed, from several vantages in time order."""
    events = [(s[AT], vantage, not s[OK]) for vantage, seq in samples.items() for s in seq]
    events.sort()  # each vantage's run is in order already: Timsort merges them
    return events


def failures_of(windows: Mapping[str, Window], now: float, span: float) -> list[Event]:
    """`failures` of every window's samples within (now - span, now] (name -> window), read from
    the windows' columns without making a tuple of each sample."""
    events: list[Event] = []
    for name, window in windows.items():
        events.extend(window.outcomes(now, span, name))
    events.sort()
    return events


def slower_of(windows: Mapping[str, Window], limits: Mapping[str, float], now: float, span: float) -> list[Event]:
    """`slower` of every window's samples within (now - span, now], read from the columns."""
    events: list[Event] = []
    for name, window in windows.items():
        events.extend(window.latency_outcomes(now, span, name, limits[name]))
    events.sort()
    return events


def slower(samples: Mapping[str, Sequence[Sample]], limits: Mapping[str, float]) -> list[Event]:
    """Successful samples as outcomes, bad when slower than their vantage's limit; failures are
    left to the error test."""
    events = [
        (s[AT], v, s[LATENCY] > limit) for v, seq in samples.items() for limit in (limits[v],) for s in seq if s[OK]
    ]
    events.sort()
    return events
