"""Latency baselines: each (region, probe, vantage)'s usual latency, what the slowdown test
compares new results with.

A baseline is the weighted median, across slices of one verdict window each, of every slice's
slowdown quantile and median, over `slowdown.baseline` seconds of successful results ending one
verdict window ago (so a slowdown under way is not its own baseline). Each slice weighs the time
it covers of that span: a short or cut slice counts for what it covers, not as much as a full
one, and a slice probed harder on suspicion (five times the results during a fault) counts no
more than any other, so extra probes never hurry a slowdown into the baseline. A median across
slices, so a slowdown becomes the new normal only once it fills half the baseline's time, not
the 1 - quantile of it that a plain quantile would allow; one slice's own value, never a blend
of an old and a new normal.

Nothing follows the wall clock: slices start at each key's first result and a slice once
complete is summarised once. A young key (its complete slices hold fewer than
`min_baseline_samples` results) refreshes `REFRESHES` times a verdict window, at a share of that
interval that is its own (so keys seen first together refresh apart), and takes the older half
of what it has, so a fresh daemon judges slowdowns from its first `2 x min_baseline_samples`
results. A grown key's baseline is its complete slices alone and
changes only when one completes; the span of each key ends up to one more verdict window back, by
a fixed share of a window that is its own (`_phase`), so the keys a daemon started together do
not all summarise a slice in the same tick: a judge tick reads about keys / window-seconds slices,
not every key's at once. Baselines are saved in the state store (see `controller.state.baselines`)
and a restart starts from them until its own history suffices.
"""

from __future__ import annotations

import math
import zlib
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple

from controller.judging.findings import samples_since
from controller.judging.windows import LATENCY, OK

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from controller.judging.windows import Window, WindowKey
    from controller.settings.policy import VerdictPolicy

# How many times a verdict window each key's baseline is recomputed.
REFRESHES = 4
# Seconds before a grown key's slices change (one completes, or one leaves its span) from which its
# baseline is looked at again: the float arithmetic of the two may differ by far less.
BOUNDARY_MARGIN = 1e-3


# A baseline: (slow, median, floor, samples, at), read by the indices below. A plain tuple of
# numbers, not a NamedTuple: the garbage collector stops tracking a plain tuple of numbers once it
# has seen it, never an instance of a tuple subclass, and a daemon keeps one a series (10,000 at
# 10,000 series), each replaced once a verdict window: as NamedTuples they were a third of what
# every full collection walked, and the collections stopped the event loop 15 to 34 ms.
Baseline = tuple[float, float, float, int, float]
SLOW: Final = 0  # a successful sample slower than this counts as slow
MEDIAN: Final = 1
# The lower quartile of the slices' medians: the normal of the last `baseline` seconds that a
# slowdown has not taken over unless it fills three quarters of them. Peers are compared against
# it, so that a slowdown every region shares, which becomes the new median of each at a slightly
# different moment, never makes the one that has not flipped yet look worse.
FLOOR: Final = 2
SAMPLES: Final = 3  # successful results it was computed from
COMPUTED: Final = 4  # when it was computed


def baseline(slow: float, median: float, floor: float, samples: int, at: float) -> Baseline:
    return (slow, median, floor, samples, at)


class _Slice(NamedTuple):
    number: int  # counted from the key's first result
    samples: int
    slow: float
    median: float


class _Summaries:
    """One key's complete slices, summarised once, in slice order, as columns of numbers: ten
    thousand keys hold three hundred thousand of them (a baseline's half hour of one-minute
    slices). As a dict of tuples they took about 190 bytes each (57 MB), and as NamedTuples every
    garbage collection walked them; here a slice is 32 bytes the collector never sees."""

    __slots__ = ("_median", "_number", "_samples", "_slow")

    def __init__(self) -> None:
        self._number = array("q")  # the slice's number (`_Slice.number`), ascending
        self._samples = array("q")
        self._slow = array("d")
        self._median = array("d")

    def __contains__(self, number: int) -> bool:
        i = bisect_left(self._number, number)
        return i < len(self._number) and self._number[i] == number

    def __len__(self) -> int:
        return len(self._number)

    def keep(self, summary: _Slice) -> None:
        """Keep a complete slice's summary (in its place: a slice read late goes in before newer
        ones; one kept already is replaced)."""
        i = bisect_left(self._number, summary.number)
        if i < len(self._number) and self._number[i] == summary.number:
            self._samples[i], self._slow[i], self._median[i] = summary.samples, summary.slow, summary.median
            return
        self._number.insert(i, summary.number)
        self._samples.insert(i, summary.samples)
        self._slow.insert(i, summary.slow)
        self._median.insert(i, summary.median)

    def forget_before(self, first: int) -> None:
        """Forget the slices numbered before `first`."""
        i = bisect_left(self._number, first)
        if i:
            for column in (self._number, self._samples, self._slow, self._median):
                del column[:i]

    def slices(self, first: int, last: float = math.inf) -> list[_Slice]:
        """The kept slices numbered `first` to `last`, in order."""
        return [_Slice(*kept) for kept in zip(*self.columns(first, last), strict=True)]

    def columns(self, first: int, last: float) -> tuple[array[int], array[int], array[float], array[float]]:
        """The kept slices numbered `first` to `last`, in order, as columns: numbers, samples,
        slow quantiles, medians (what `Baselines._weighed` reads, no slice made)."""
        kept = self._between(first, last)
        return self._number[kept], self._samples[kept], self._slow[kept], self._median[kept]

    def missing(self, first: int, last: int) -> set[int]:
        """The slice numbers from `first` to `last` that are not kept."""
        return set(range(first, last + 1)).difference(self._number[self._between(first, last)])

    def _between(self, first: int, last: float) -> slice:
        """Where the kept slices numbered `first` to `last` are in the columns."""
        return slice(bisect_left(self._number, first), bisect_right(self._number, last))

    def samples_from(self, first: int) -> int:
        """How many results the kept slices numbered `first` on were summarised from."""
        return sum(self._samples[bisect_left(self._number, first) :])


@dataclass(slots=True)
class _Key:
    anchor: float  # the key's first result: slices are counted from it
    summaries: _Summaries = field(default_factory=_Summaries)
    phase: float = 0.0  # seconds: how much further back than `window` a grown key's span ends
    baseline: Baseline | None = None
    refreshed: float = -math.inf
    grown: tuple[int, int] | None = None  # a grown key's (first, last complete) slice, as computed
    # From when until before when `now` leaves `grown` as it is (see `Baselines._grown`).
    grown_from: float = math.inf
    grown_until: float = -math.inf


class Baselines:
    """Every key's baseline, refreshed on its own schedule; `stored` ones (from a previous run)
    stand in until a key's own history suffices, for as long as they are not older than the
    baseline span itself."""

    def __init__(self, policy: VerdictPolicy, stored: Mapping[WindowKey, Baseline] | None = None) -> None:
        self.policy = policy
        self.stored: dict[WindowKey, Baseline] = dict(stored or {})
        self._keys: dict[WindowKey, _Key] = {}
        # What `of_each` last answered for a (region, probe): its vantages, from and until when
        # every one of them is a grown key between two slice changes (so `of` would answer the
        # same), the answer, and the era it was found in.
        self._each: dict[
            tuple[str, str], tuple[tuple[str, ...], float, float, tuple[tuple[str, Baseline], ...], int]
        ] = {}
        # The clock of the last look, and how many times a look came with an earlier one: within
        # an era the clock never goes back, so a key looked at (by `of_each` or not) after an
        # answer was found, and before its `until`, was looked at within the range it had then.
        self._now = -math.inf
        self._era = 0

    def of_each(
        self, region: str, probe: str, windows: Mapping[str, Window], now: float
    ) -> tuple[tuple[str, Baseline], ...]:
        """(vantage, baseline) for each of a probe's windows that has one (`of`), in their order.
        Answered again, with no look at any key, while the vantages are the same and every one
        is a grown key between two slice changes (`_grown`'s range), and the clock has not gone
        back since (a look at a later time, say a peer's, may have moved a key's range on): most
        passes at most probes. At 10,000 series the slowdown detector asked `of` of every
        window, every pass: 10,000 looks that each found the same baseline."""
        self._look_at(now)
        vantages = tuple(windows)
        last = self._each.get((region, probe))
        if last is not None and last[0] == vantages and last[1] <= now < last[2] and last[4] == self._era:
            return last[3]
        each = tuple([(v, b) for v, w in windows.items() if (b := self.of((region, probe, v), w, now)) is not None])
        start, until = -math.inf, math.inf
        for vantage in vantages:
            state = self._keys.get((region, probe, vantage))
            if state is None or state.grown is None or state.baseline is None:
                until = -math.inf  # young (or none): `of` looks again every pass
                break
            start, until = max(start, state.grown_from), min(until, state.grown_until)
        self._each[region, probe] = (vantages, start, until, each, self._era)
        return each

    def _look_at(self, now: float) -> None:
        """A look at `now`: one earlier than the last starts a new era (the clock went back: what
        `of_each` found before may not hold)."""
        if now < self._now:
            self._era += 1
        self._now = now

    def of(self, key: WindowKey, window: Window, now: float) -> Baseline | None:
        self._look_at(now)
        p = self.policy
        state = self._keys.get(key)
        if state is None:
            first = window.first_at()
            if first is None:
                return self._stored(key, now)
            state = self._keys[key] = _Key(anchor=first, phase=_phase(key, p.window))
        if state.grown is not None:
            if state.grown_from <= now < state.grown_until and state.baseline is not None:
                return state.baseline  # `_grown`'s first look, here: most looks at most keys
            grown = self._grown(state, window, now)
            if grown is not None:
                state.baseline = grown
                return grown
            # Its complete slices over the grown span (further back by the phase) do not hold
            # enough yet: it stays young, and keeps its young baseline, until they do.
            state.grown, state.grown_until = None, -math.inf
        every = p.window / REFRESHES
        if now - state.refreshed >= every:
            # The first look at a key counts as a refresh a share of `every` ago that is its own
            # (its phase's): keys a daemon sees first in the same tick (all of them, at a start)
            # then refresh in different ticks, not all together every `every` seconds. At
            # 10,000 young keys that tick took 0.5 to 1.1 s, four times the others.
            first_look = math.isinf(state.refreshed)
            state.refreshed = now - (every * state.phase / p.window if first_look else 0.0)
            state.baseline = self._compute(state, window, now)
        return state.baseline or self._stored(key, now)

    def current(self) -> dict[WindowKey, Baseline]:
        """Every key's baseline computed from its own history (what the store saves)."""
        return {k: s.baseline for k, s in self._keys.items() if s.baseline is not None}

    def _stored(self, key: WindowKey, now: float) -> Baseline | None:
        stored = self.stored.get(key)
        if stored is None or now - stored[COMPUTED] > self.policy.slowdown.baseline:
            return None
        return stored

    def _compute(self, state: _Key, window: Window, now: float) -> Baseline | None:
        p = self.policy
        span = p.window
        end = now - min(span, max(0.0, now - state.anchor) / 2)  # a young key: the older half
        first = math.floor((end - p.slowdown.baseline - state.anchor) / span)
        last_complete = math.floor((end - state.anchor) / span) - 1
        held = self._held(state, window, first)
        # Only slices not summarised yet are read: the newest (partial) one, and any complete one
        # a refresh has not seen (one look at the window from the first of them on).
        # A slice whose results the window no longer holds (the key went unjudged for a while,
        # or the daemon started since) stays missing: it is not read again.
        missing = next((i for i in range(max(held, 0), last_complete + 1) if i not in state.summaries), None)
        first_read = last_complete + 1 if missing is None else missing
        start = max(state.anchor + first_read * span, end - p.slowdown.baseline)
        # A slice summarised already, or a result before the span (by index: one rounding), is left.
        after = max(start - 1.0, end - p.slowdown.baseline)
        grouped = self._by_slice(window, after, end, state.anchor, lambda i: i >= first_read)
        slices = [s for s in state.summaries.slices(first) if s.number not in grouped]
        for index, group in grouped.items():
            summary = self._summary(index, group)
            if summary is not None:
                slices.append(summary)
                if index <= last_complete:
                    state.summaries.keep(summary)
        count = sum(s.samples for s in slices)
        if count < p.slowdown.min_baseline_samples:
            return None
        if state.summaries.samples_from(first) >= p.slowdown.min_baseline_samples:
            state.grown = (-1, -1)  # its complete slices suffice from now on (see `_grown`)
            state.grown_until = -math.inf
        numbers, slows, medians = [s.number for s in slices], [s.slow for s in slices], [s.median for s in slices]
        return self._weighed(numbers, slows, medians, end, state.anchor, count, now)

    def _grown(self, state: _Key, window: Window, now: float) -> Baseline | None:
        """A grown key's baseline: its complete slices, over the span ending `window + phase`
        back; recomputed only when a slice completes or leaves the span (two floors a call else)."""
        if state.grown_from <= now < state.grown_until:  # no slice completed or left (most looks)
            return state.baseline
        p = self.policy
        span = p.window
        end = now - span - state.phase
        first = math.floor((end - p.slowdown.baseline - state.anchor) / span)
        last_complete = math.floor((end - state.anchor) / span) - 1
        # Until the next slice completes or leaves, less a margin for the floors' rounding there.
        state.grown_from = now
        state.grown_until = (
            min(
                now + (state.anchor + (last_complete + 2) * span - end),
                now + (state.anchor + (first + 1) * span - (end - p.slowdown.baseline)),
            )
            - BOUNDARY_MARGIN
        )
        if state.grown == (first, last_complete):
            return state.baseline
        state.grown = (first, last_complete)
        held = self._held(state, window, first)
        # The slice that has just completed (and any other the window still holds that no look
        # has summarised: a key left unjudged while its vantage was stale), each read once.
        missing = state.summaries.missing(held, last_complete)
        if missing:
            start, stop = state.anchor + min(missing) * span, state.anchor + (last_complete + 1) * span
            for index, group in self._by_slice(window, start - 1.0, stop, state.anchor, missing.__contains__).items():
                if (summary := self._summary(index, group)) is not None:
                    state.summaries.keep(summary)
        numbers, samples, slows, medians = state.summaries.columns(first, last_complete)
        count = sum(samples)
        if count < p.slowdown.min_baseline_samples:
            return None
        end = state.anchor + (last_complete + 1) * span
        return self._weighed(numbers, slows, medians, end, state.anchor, count, now)

    def _held(self, state: _Key, window: Window, first: int) -> int:
        """Forget the summaries of slices before `first`; the first slice the window still holds
        whole (or `first`)."""
        state.summaries.forget_before(first)
        oldest = window.first_at()
        return first if oldest is None else max(first, math.ceil((oldest - state.anchor) / self.policy.window))

    def _by_slice(
        self, window: Window, after: float, end: float, anchor: float, keep: Callable[[int], bool]
    ) -> dict[int, list[float]]:
        """The latencies of the successes among the window's samples within (after, end], by
        slice (counted from `anchor`), of the slices that `keep`; a slice with samples but no
        success maps to an empty list. Callers read from a second before a slice starts: float
        time is coarse, and the slice index says."""
        return window.latencies_by_slice(after, end, anchor, self.policy.window, keep)

    def _weighed(
        self,
        numbers: Sequence[int],
        slows: Sequence[float],
        medians: Sequence[float],
        end: float,
        anchor: float,
        count: int,
        now: float,
    ) -> Baseline:
        """The baseline of the slices numbered `numbers` (with their slow quantiles and medians),
        each weighing the time it covers of the span ending `end`."""
        p = self.policy
        span = p.window
        start_of = end - p.slowdown.baseline
        weights = [min(end, at + span) - max(start_of, at) for n in numbers for at in (anchor + n * span,)]
        by_median = _ranked(medians, weights)
        return baseline(
            _weighted_quantile(slows, _ranked(slows, weights), 0.5),
            _weighted_quantile(medians, by_median, 0.5),
            _weighted_quantile(medians, by_median, 0.25),
            count,
            now,
        )

    def _summary(self, index: int, successes: Iterable[float]) -> _Slice | None:
        latencies = sorted(successes)
        if not latencies:
            return None
        return _Slice(
            index,
            len(latencies),
            latencies[_rank(self.policy.slowdown.quantile, len(latencies)) - 1],
            latencies[(len(latencies) - 1) // 2],
        )

    def relative(
        self, region: str, probe: str, windows: Mapping[str, Window], since: float, now: float, *, floor: bool = False
    ) -> tuple[list[float], int]:
        """Successful latencies since `since`, each divided by its vantage's baseline median (or
        its floor, to compare with peers), and how many of them were slower than usual."""
        out: list[float] = []
        slow = 0
        for vantage, w in windows.items():
            base = self.of((region, probe, vantage), w, now)
            if base is not None:
                latencies = [s[LATENCY] for s in samples_since(w.samples(now, self.policy.window), since) if s[OK]]
                normal = base[FLOOR] if floor else base[MEDIAN]
                out.extend(latency / normal for latency in latencies)
                slow += sum(latency > base[SLOW] for latency in latencies)
        return out, slow


def _rank(q: float, n: int) -> int:
    """Which of `n` sorted results (from 1) is a slice's `q` quantile: the one whose median share
    of the distribution below it is `q` at least. The median of the k-th of n is at about
    (k - 1/3) / (n + 1/3) (of a Beta(k, n + 1 - k)), and the baseline is a median across slices.
    The nearest rank, ceil(q n), is the 54th of 60 at q = 0.9, whose median is the 88.9th
    percentile: healthy results were then "slow" 11% of the time, not the 10% the slowdown test
    takes as acceptable, and its false alarms came several times as often as its level allows
    (one a day at 1 probe/s in `bench/detection.py`). Capped at the slowest result: the largest
    of 6 (a slice at a 10 s interval) has its median at the 89th percentile."""
    return min(n, max(1, math.ceil(q * (n + 1 / 3) + 1 / 3)))


def _phase(key: WindowKey, span: float) -> float:
    """A share of `span` that is the key's own and the same in every run (not `hash`)."""
    return span * (zlib.crc32("/".join(key).encode()) / 2**32)


def _ranked(values: Sequence[float], weights: list[float]) -> tuple[list[int], list[float]]:
    """The indices of `values` from the lowest (in their order where equal), and their weights
    in that order (what `_weighted_quantile` walks)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order, [weights[i] for i in order]


def _weighted_quantile(values: Sequence[float], ranked: tuple[list[int], list[float]], q: float) -> float:
    """The value (one slice's own) below which a share `q` of the covered time lies, `ranked`
    by `_ranked`."""
    order, weights = ranked
    target = sum(weights) * q
    running = 0.0
    for i, weight in zip(order, weights, strict=True):
        running += weight
        if running >= target:
            return float(values[i])
    return float(values[order[-1]])  # pragma: no cover - slices are never empty here
