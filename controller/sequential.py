"""Sequential tests on yes/no outcomes: Wald's SPRT, restarted whenever it leans healthy
(Page's CUSUM), over the outcomes of one window.

Each outcome moves the log-likelihood ratio of "the bad ratio is `unacceptable`" against "it is
`acceptable`": a bad outcome adds ln(p1/p0), a good one adds ln((1-p1)/(1-p0)). The statistic
is the largest sum over any run of the newest outcomes, so old good outcomes cannot hide a
fault that started a moment ago, and the test decides as soon as that sum crosses
ln((1 - miss_rate) / false_alarm_rate): a region failing 40% of probes crosses it within a few probe rounds. This is the
small closed form the design notes name; nothing here needs a statistics package.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from controller.config import SequentialTest
    from controller.windows import Sample


class Event(NamedTuple):
    at: float
    vantage: str
    bad: bool


@dataclass(frozen=True, slots=True)
class Llr:
    bad: float  # added by a bad outcome: ln(p1/p0) > 0
    good: float  # added by a good outcome: ln((1-p1)/(1-p0)) < 0
    threshold: float  # ln((1 - miss_rate) / false_alarm_rate)

    @classmethod
    def of(cls, test: SequentialTest) -> Llr:
        p0, p1 = test.acceptable, test.unacceptable
        return cls(
            bad=math.log(p1 / p0),
            good=math.log((1 - p1) / (1 - p0)),
            threshold=math.log((1 - test.miss_rate) / test.false_alarm_rate),
        )

    def of_counts(self, events: int, bad: int) -> float:
        return bad * self.bad + (events - bad) * self.good


@dataclass(frozen=True, slots=True)
class Run:
    """The newest run of outcomes that carries the most evidence of a fault."""

    statistic: float  # log-likelihood ratio over the run; 0 when the window leans healthy
    threshold: float
    since: float | None  # time of the run's first outcome
    events: int
    bad: int
    by_vantage: dict[str, tuple[int, int]]  # vantage -> (outcomes, bad ones) within the run
    agreeing: tuple[str, ...]  # vantages whose own outcomes within the run lean towards a fault

    @property
    def tripped(self) -> bool:
        return self.statistic >= self.threshold

    @property
    def ratio(self) -> float:
        return self.bad / self.events if self.events else 0.0


QUIET = Run(0.0, math.inf, None, 0, 0, {}, ())


def cusum(events: Sequence[Event], llr: Llr) -> Run:
    """The CUSUM statistic over `events` (oldest first) and the run that makes it."""
    total = low = 0.0
    start = len(events)
    for i, event in enumerate(events):
        total += llr.bad if event.bad else llr.good
        if total <= low:  # ties move the start later: the shortest run with the most evidence
            low = total
            start = i + 1
    run = events[start:]
    counts: dict[str, list[int]] = {}
    for event in run:
        count = counts.setdefault(event.vantage, [0, 0])
        count[0] += 1
        count[1] += event.bad
    by_vantage = {v: (n, bad) for v, (n, bad) in counts.items()}
    agreeing = tuple(sorted(v for v, (n, bad) in by_vantage.items() if llr.of_counts(n, bad) > 0))
    return Run(
        statistic=total - low,
        threshold=llr.threshold,
        since=run[0].at if run else None,
        events=len(run),
        bad=sum(bad for _, bad in by_vantage.values()),
        by_vantage=by_vantage,
        agreeing=agreeing,
    )


def merge(samples: Mapping[str, Sequence[Sample]], bad: Callable[[str, Sample], bool | None]) -> list[Event]:
    """One time-ordered stream of outcomes from several vantages' samples (each oldest first).
    `bad(vantage, sample)` says whether a sample counts against the region; None leaves it out."""
    streams = (
        [Event(s.at, vantage, b) for s in seq if (b := bad(vantage, s)) is not None] for vantage, seq in samples.items()
    )
    return list(heapq.merge(*streams, key=attrgetter("at")))


def failed(_vantage: str, sample: Sample) -> bool:
    return not sample.ok
