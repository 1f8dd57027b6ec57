"""Rolling windows of probe results, one per (region, probe, vantage).

A window keeps the last `span` seconds of outcomes and latencies and answers what detectors
ask: how many samples, what share succeeded, a latency quantile, how fresh the newest one is.
Time is passed in (the results' own wall-clock start times and a `now`), so the same windows
serve the daemon, the tests and the offline benchmarks.
"""

from __future__ import annotations

import gc
import math
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import Counter, deque
from dataclasses import dataclass
from itertools import compress, repeat
from itertools import count as serial_numbers
from operator import not_
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Mapping

    from probes.results import Result

WindowKey = tuple[str, str, str]  # region, probe, vantage
# Windows trimmed (or let go of their last look) between two yields of the steps that walk them
# all: at 10,000 series one walk without a break was 18 to 34 ms with the event loop stopped.
STEP_WINDOWS = 500
# Windows let go of their last look between two yields: letting go frees the sample tuples the
# look was made of, about 20 microseconds a window at 10,000 series (500 at once took 10 to 14 ms).
FORGET_WINDOWS = 100
# A window is trimmed about this often (seconds): a trim trims the next windows in turn, as many
# as the time since the last trim is a share of this (all of them after a pause this long). A
# window so holds a few seconds of results past its span, which no reader looks at (they read
# within a span up to it, by bisecting from its horizon), and a pass a second trims 1,250
# windows, not 10,000 (12 ms a pass at 10,000 series). By passes, not time, windows trimmed
# every 80 s (the bench's warm-up judges every 10th second) were compacted in bigger steps,
# and the allocator held 73 MB more at 10,000 series.
TRIM_SECONDS = 8.0
# Results that came late a window remembers for its span views (see `_SpanView`): out of order
# from parallel runs on suspicion, a few a pass; a view that missed more starts over.
LATE_KEPT = 32
_SERIALS = serial_numbers()
# The windows holding the answer of a `samples` look, whatever their store: what
# `WindowStore.forget_looks_steps` lets go of (a window may be in it twice, or already let go).
_LOOKED: list[Window] = []
# Samples one window keeps at most between two trims: a probe every 10 ms for 100 s. It bounds
# memory when results arrive faster than anyone trims; real probes never come near it.
MAX_SAMPLES = 10_000


# One kept result: (at, ok, latency, error_class, scheduled), read by the indices below. A plain
# tuple, not a NamedTuple: the garbage collector stops tracking a plain tuple of numbers and
# None once it has seen it, never an instance of a tuple subclass, and a daemon holding 10,000
# series keeps six million samples (one full collection of them took 760 ms, stalling the loop).
# `scheduled`: run on its schedule, not as an extra run on suspicion ("the last N results failed"
# counts scheduled runs, so ten extra runs a second do not make three failures in a row of a 40%
# fault look like a region that went down).
Sample = tuple[float, bool, float, str | None, bool]
AT: Final = 0
OK: Final = 1
LATENCY: Final = 2
ERROR_CLASS: Final = 3
SCHEDULED: Final = 4


@dataclass(frozen=True, slots=True)
class WindowStats:
    samples: int
    failures: int
    errors: dict[str, int]  # error class -> count
    # Of successful samples, sorted: every one, or (`of` with `top`) the slowest from a rank on.
    latencies: tuple[float, ...]

    @property
    def success_ratio(self) -> float:
        return (self.samples - self.failures) / self.samples if self.samples else math.nan

    def latency_quantile(self, q: float) -> float | None:
        """Nearest-rank quantile of successful latencies; None without any."""
        successes = self.samples - self.failures
        if not successes:
            return None
        rank = max(1, math.ceil(q * successes))
        below = successes - len(self.latencies)  # the fastest ones, not kept (see `of`)
        if rank <= below:
            raise ValueError(f"the {q} latency quantile is below the slowest latencies these stats kept")
        return self.latencies[rank - 1 - below]

    @classmethod
    def of(cls, windows: Iterable[Window], now: float, span: float, top: float = 0.0) -> WindowStats:
        """`pooled` of every window's samples within (now - span, now], from their span view
        (`span_view`: kept as results come and go, no walk over the samples) and, only where a
        result failed, the failed ones' error classes. With `top`, the latencies kept are only
        the slowest that `latency_quantile` needs for quantiles from `top` up (at the 0.9
        quantile, a tenth of them: what the threshold detector asks every pass)."""
        windows = tuple(windows)
        view = span_view(windows, now, span)
        samples, latencies = view.count(), view.latencies
        successes = len(latencies)
        failures = samples - successes
        errors: Counter[str] | None = None
        if failures:
            errors = Counter()
            for window in windows:
                errors.update(window.error_classes(now, span))
        keep = successes - max(1, math.ceil(top * successes)) + 1 if top > 0 else successes
        return cls(samples, failures, dict(errors) if errors else {}, tuple(latencies[successes - keep :]))

    @classmethod
    def pooled(cls, samples: Iterable[Sample]) -> WindowStats:
        samples = list(samples)
        latencies = sorted([s[LATENCY] for s in samples if s[OK]])
        errors = (
            Counter(s[ERROR_CLASS] or "unknown" for s in samples if not s[OK]) if len(latencies) < len(samples) else {}
        )
        return cls(len(samples), len(samples) - len(latencies), dict(errors), tuple(latencies))


# Trimmed samples are dropped from the front of a window's columns in one go once this many pile
# up and they are an eighth of them: a trim is a bisect, not a pop per sample, and a window holds
# at most a seventh more than it keeps (a move of 8 KB every 86 s, for a window of 600). What the
# columns hold at most is what the process keeps: the allocator does not give back what a
# compaction frees. With 256 and a quarter, a 600-sample window grew to 856 before it was
# compacted, and RSS at 1,000 series grew 23 MB over the interpreter's, against 18 MB now.
COMPACT_AFTER = 64
COMPACT_SHARE = 8

# Error classes, each kept once: a window keeps each sample's class as its number here (0: none),
# in the low seven bits of one byte whose high bit (`EXTRA`) marks an extra run. Probes name a
# handful; a result's class is at most 32 characters (`probes.wire`), and past `MAX_CLASSES`
# distinct ones (never, from real probes) a new one is kept as "other".
_CLASSES: list[str | None] = [None, "other"]
_CLASS_NUMBERS: dict[str | None, int] = {None: 0, "other": 1}
MAX_CLASSES = 128
EXTRA: Final = 0x80
CLASS_BITS: Final = 0x7F

# Latencies are kept in microseconds, in single precision: whole microseconds up to 2**24 (16.7 s)
# are exact, so a latency given to the microsecond reads back as the same float (n / 1e6 is the
# float nearest n microseconds); longer ones (a replication lag) to seven significant digits, and
# an infinite one stays infinite. Half the memory of a double, at 6,000,000 samples a daemon holds.
US: Final = 1e6
EXACT_US: Final = 2**24


def _stored(latency: float) -> float:
    """A latency in seconds as its column keeps it (see `US`)."""
    us = latency * US
    return round(us) if -EXACT_US < us < EXACT_US else us


_seconds = US.__rtruediv__  # a kept latency in seconds


def _class_number(error_class: str | None) -> int:
    number = _CLASS_NUMBERS.get(error_class)
    if number is None:
        if len(_CLASSES) >= MAX_CLASSES:
            return 1
        number = _CLASS_NUMBERS[error_class] = len(_CLASSES)
        _CLASSES.append(error_class)
    return number


# A span view this many seconds behind is started over rather than moved on (see `span_view`): a
# move costs a sorted insertion and a deletion per result, starting over one sort of the span's
# latencies, about what a move over 8 s of results costs (5 vantages, a result a second each).
REBUILD_AFTER = 8.0

# Up to this many samples are read one by one (the newest few, each tick), more by slicing the
# columns at once.
FEW = 4


class _SpanView:
    """One span of some windows (a probe's, at its fresh vantages) followed as `now` moves on:
    the samples within (now - span, now] are, at each window, those from its `heads` to its
    `ends` (counted from the first sample the window ever kept: a compaction of its front moves
    nothing here), and `latencies` holds the successful ones' latencies, pooled and sorted.
    Moving on takes in the results that came late (each window keeps its last `LATE_KEPT`, see
    `Window.add`), adds the samples `now` has reached and drops those that left, one insort or
    one deletion each: O(new results) a look, not O(samples in the span), and one look a probe,
    not one a window. It names its windows by serial number, not by reference: a window keeps
    its view, and a view holding the window would be a cycle that outlives a store dropped
    after `gc.freeze`. The latencies and indices are arrays, not lists: a collection walks
    every float a list holds; an array it passes over unopened."""

    __slots__ = ("ends", "heads", "latencies", "marks", "now", "serials", "span")

    def __init__(self, windows: tuple[Window, ...], serials: tuple[int, ...], now: float, span: float) -> None:
        self.marks, self.heads, self.ends, self.latencies = array("q"), array("q"), array("q"), array("d")
        self.start(windows, serials, now, span)

    def start(self, windows: tuple[Window, ...], serials: tuple[int, ...], now: float, span: float) -> None:
        """Follow `windows` from `now` afresh, in the arrays it has: new ones would be objects
        the collector walks at every full collection until the next `gc.freeze` (at 10,000
        series, a view started over every 15 to 30 s a probe was 10,000 of them)."""
        self.serials, self.span, self.now = serials, span, now
        self.marks[:] = array("q", [w._layout for w in windows])  # noqa: SLF001 - the windows' own view
        heads, ends = array("q"), array("q")
        kept: list[float] = []
        for w in windows:
            at = w._at  # noqa: SLF001
            head = bisect_right(at, now - span, w._head)  # noqa: SLF001
            end = bisect_right(at, now, head)
            heads.append(w._dropped + head)  # noqa: SLF001
            ends.append(w._dropped + end)  # noqa: SLF001
            kept.extend(compress(w._latency[head:end], w._ok[head:end]))  # noqa: SLF001
        self.heads[:], self.ends[:] = heads, ends
        self.latencies[:] = array("d", map(_seconds, sorted(kept)))

    def count(self) -> int:
        """How many samples are within the span, failed or not."""
        return sum(self.ends) - sum(self.heads)

    def move(self, windows: tuple[Window, ...], now: float) -> bool:
        """Move on to `now`; False when it must start over instead: the clock went back, a window
        took more results late than it remembers since the last look, or was trimmed past it."""
        if now < self.now:
            return False
        marks, heads, ends, latencies = self.marks, self.heads, self.ends, self.latencies
        horizon = now - self.span
        for i, w in enumerate(windows):
            if w._layout != marks[i] and not self._take_late(i, w):  # noqa: SLF001
                return False
            at, ok, latency, dropped = w._at, w._ok, w._latency, w._dropped  # noqa: SLF001
            head = heads[i] - dropped
            if head < w._head:  # noqa: SLF001 - trimmed past (and maybe dropped): start over
                return False
            end = ends[i] - dropped
            while end < len(at) and at[end] <= now:
                if ok[end]:
                    insort(latencies, latency[end] / US)
                end += 1
            ends[i] = end + dropped
            while head < end and at[head] <= horizon:
                if ok[head]:
                    del latencies[bisect_left(latencies, latency[head] / US)]
                head += 1
            heads[i] = head + dropped
        self.now = now
        return True

    def _take_late(self, i: int, w: Window) -> bool:
        """Window `i`'s results that came late since the last look, in turn, each by where it
        went (its index moved what followed by one): before the span's samples, it moves both
        ends on; among them, it is counted (one as old as the span's horizon then is dropped
        again by `move`, by its start time); after them (where results added since the last
        look may be as old as it), it is left to `move`. False when the window no longer
        remembers them all."""
        start = self.marks[i] - w._late_first  # noqa: SLF001
        if start < 0:
            return False
        late_index, late_ok, late_latency = w._late_index, w._late_ok, w._late_latency  # noqa: SLF001
        heads, ends = self.heads, self.ends
        for k in range(start, len(late_index)):
            index = late_index[k]
            if index < heads[i]:
                heads[i] += 1
                ends[i] += 1
            elif index < ends[i]:
                ends[i] += 1
                if late_ok[k]:
                    insort(self.latencies, late_latency[k] / US)
        self.marks[i] = w._layout  # noqa: SLF001
        return True


def span_view(windows: tuple[Window, ...], now: float, span: float) -> _SpanView:
    """The span view of `windows` at `now` (read its `count()` and `latencies`, the view's own:
    do not change them). Followed from the last look while the same windows are asked with the
    same span and `now` only moves on; started over otherwise. Kept by the first window: a
    window is of one probe, and its fresh vantages are the same set pass after pass; a window
    asked alone (a vantage of a probe found bad, every pass while it is) keeps that view apart."""
    serials = tuple([w._serial for w in windows])  # noqa: SLF001
    first = windows[0] if windows else None
    alone = len(windows) == 1
    view = (first._alone if alone else first._view) if first is not None else None  # noqa: SLF001
    if view is None or view.serials != serials or view.span != span:
        view = _SpanView(windows, serials, now, span)
        if first is not None and alone:
            first._alone = view  # noqa: SLF001
        elif first is not None:
            first._view = view  # noqa: SLF001
    elif now - view.now > REBUILD_AFTER or not view.move(windows, now):  # further behind than starting over costs
        view.start(windows, serials, now, span)
    return view


class Window:
    """The results of one (region, probe, vantage) over the last `span` seconds.

    Samples are kept in start-time order in columns: arrays of start times (doubles), outcomes,
    latencies (in microseconds, single precision: see `US`) and one byte for the error class (by
    number) and whether it ran on schedule, so a sample costs 14 bytes and nothing the garbage
    collector walks (as tuples, 150 bytes and a reference in a list every collection walked:
    1.2 GB at 10,000 series). A reader gets samples as tuples (`Sample`),
    made for what it asks. The trimmed ones before `_head` are dropped in batches. A look at a
    span is two bisects and a slice (C speed): what a judge tick costs per window does not grow
    with how much history the window holds.
    """

    __slots__ = (
        "_alone",
        "_at",
        "_dropped",
        "_failed_at",
        "_head",
        "_kind",
        "_late_first",
        "_late_index",
        "_late_latency",
        "_late_ok",
        "_latency",
        "_layout",
        "_looked",
        "_ok",
        "_serial",
        "_slow_now",
        "_slow_seen",
        "_slow_statistic",
        "_slow_tie_at",
        "_slow_tie_bad",
        "_version",
        "_view",
        "added",
        "failed_added",
        "over_watch",
        "slow_added",
        "slow_restarts",
        "slow_screen",
        "span",
        "watch",
    )

    def __init__(self, span: float) -> None:
        self.span = span
        self._at = array("d")  # when each sample started, in order
        self._ok = array("b")  # 1 for a success
        self._latency = array("f")
        self._kind = array("B")  # its error class's number (`_CLASSES`), `EXTRA` for an extra run
        self._head = 0  # the first kept sample; those before it are trimmed
        self._dropped = 0  # how many trimmed samples were dropped from the front of the columns
        self._layout = 0  # how many results came late (each moved the indices after it by one)
        # The last `LATE_KEPT` results that came late (where they went, counted as `_dropped`
        # counts; outcome; latency as kept), the first of them the `_late_first + 1`-th: what
        # a span view takes in (see `_SpanView`).
        self._late_index: array[int] = array("q")
        self._late_ok: array[int] = array("b")
        self._late_latency: array[float] = array("f")
        self._late_first = 0
        self._serial = next(_SERIALS)  # names the window in span views
        # When each kept sample that failed started, in order: failures are rare, so counting
        # them over a long span does not walk every sample (the error tests ask every tick).
        self._failed_at: deque[float] = deque()
        self._version = 0  # changes whenever the samples do
        # The last answer of `samples`: (now, span, version, samples).
        self._looked: tuple[float, float, int, list[Sample]] | None = None
        self.added = 0  # how many results were ever added
        # What tells a detector that found nothing here whether anything added since can change
        # that (see `findings.Quiet`), each counted as results are added: how many failed; how
        # many succeeded slower than `watch` (the latency objective, set by the threshold
        # detector; every success counts until then); how many succeeded slower than the slow
        # screen's limit (`slow_cusum`; every success while it has none).
        self.watch = -math.inf
        self.failed_added = 0
        self.over_watch = 0
        self.slow_added = 0
        self._view: _SpanView | None = None  # its probe's (see `span_view`)
        self._alone: _SpanView | None = None  # its own, when asked alone
        # The slow screen (`slow_cusum`): what it is carried as (limit, span, bad, good; None
        # to start over; read it, do not change it), how many times it started over or was
        # told to (while that count is the same, `slow_added` counted every success slower
        # than its limit), the clock then, how many of `added` it has seen, its statistic, and
        # the newest start time seen with what its slow outcomes added.
        self.slow_screen: tuple[float, float, float, float] | None = None
        self.slow_restarts = 0
        self._slow_now = -math.inf
        self._slow_seen = 0
        self._slow_statistic = 0.0
        self._slow_tie_at = math.nan
        self._slow_tie_bad = 0.0

    def __len__(self) -> int:
        return len(self._at) - self._head

    def _within(self, after: float, now: float) -> tuple[int, int]:
        """The indices from and to which samples started within (after, now]."""
        lo = bisect_right(self._at, after, self._head)
        return lo, bisect_right(self._at, now, lo)

    def _samples(self, lo: int, hi: int) -> list[Sample]:
        """The samples from index `lo` to `hi` of the columns, as tuples."""
        if hi - lo <= FEW:
            at, ok, latency, kind = self._at, self._ok, self._latency, self._kind
            return [
                (at[i], bool(ok[i]), latency[i] / US, _CLASSES[kind[i] & CLASS_BITS], not kind[i] & EXTRA)
                for i in range(lo, hi)
            ]
        kinds = self._kind[lo:hi]
        return list(
            zip(
                self._at[lo:hi],
                map(bool, self._ok[lo:hi]),
                map(_seconds, self._latency[lo:hi]),
                map(_CLASSES.__getitem__, map(CLASS_BITS.__and__, kinds)),
                map(not_, map(EXTRA.__and__, kinds)),
                strict=True,
            )
        )

    def add(self, result: Result) -> None:
        """Keep a result; only `trim(now)` forgets, so a result stamped ahead of the clock (a
        skewed agent) cannot push out samples that are still current."""
        at, ok = result.started_at, result.ok
        kind = _class_number(result.error_class) | (0 if result.reason == "scheduled" else EXTRA)
        self._version += 1
        self.added += 1
        # Results arrive nearly in order; one that is older than the newest goes in its place so
        # trimming from the front stays correct.
        if len(self) and at < self._at[-1]:
            i = kept = bisect_right(self._at, at, self._head)
            self._at.insert(i, at)
            self._ok.insert(i, ok)
            self._latency.insert(i, _stored(result.latency))
            self._kind.insert(i, kind)
            self._layout += 1  # the span views take it in (or start over)
            self._late_index.append(self._dropped + i)
            self._late_ok.append(ok)
            self._late_latency.append(self._latency[i])
            if len(self._late_index) > LATE_KEPT:
                for column in (self._late_index, self._late_ok, self._late_latency):
                    del column[: LATE_KEPT // 2]
                self._late_first += LATE_KEPT // 2
            self.slow_screen = None  # nor the slow screen's count of what it has seen
            self.slow_restarts += 1
        else:
            kept = len(self._at)
            self._at.append(at)
            self._ok.append(ok)
            self._latency.append(_stored(result.latency))
            self._kind.append(kind)
        if not ok:
            self.failed_added += 1
            if self._failed_at and at < self._failed_at[-1]:
                self._failed_at = deque(sorted([*self._failed_at, at]))
            else:
                self._failed_at.append(at)
        else:
            latency = self._latency[kept] / US  # as every reader reads it (see `US`), not as given
            if latency > self.watch:
                self.over_watch += 1
            screen = self.slow_screen
            if screen is None or latency > screen[0]:
                self.slow_added += 1
        if len(self) > MAX_SAMPLES:
            dropped_ok = self._ok[self._head]
            self._head += 1
            if not dropped_ok:
                self._failed_at.popleft()
            self._compact()

    def _compact(self) -> None:
        head = self._head
        if head >= COMPACT_AFTER and head * COMPACT_SHARE >= len(self._at):
            for column in (self._at, self._ok, self._latency, self._kind):
                del column[:head]
            self._dropped += head
            self._head = 0

    def newest(self, count: int) -> list[Sample]:
        """The last `count` samples kept, by start time (a result that came late may be among them)."""
        end = len(self._at)
        return self._samples(max(end - count, self._head), end)

    def slow_cusum(self, now: float, span: float, limit: float, bad: float, good: float) -> float:
        """A plain CUSUM of the successes' outcomes, `bad` for one slower than `limit` and `good`
        for the others, over the results within (now - span, now] when first asked, then carried
        on over the results added since the last look, up to the first started after `now`: what
        the slowdown detector's screen asks of every window, every pass (a few numbers a window
        kept here, no sample made; see `SlowdownDetector._screen`). A plain CUSUM never forgets:
        it is at least the best run of outcomes ending at its newest within any span it has
        followed. Results that share a start time may go in a test in another order (the slow
        ones last), so a run may start among them and take only their slow ones: the statistic is
        never below that. It starts over when asked with another limit, span or steps (a plain
        CUSUM at a limit below the baseline's climbs: at 15% below, a quarter of healthy probes
        were over where the slowdown test starts), when a result came late, when the clock went
        back, or when results were trimmed before they were carried. One screen a window: a
        daemon has one judge; two detectors with other tests asking in turn would each start it
        over at every look (right, and as slow as the test)."""
        at, ok, latency = self._at, self._ok, self._latency
        seen = self._slow_seen
        how = (limit, span, bad, good)
        if how != self.slow_screen or now < self._slow_now or not 0 <= self.added - seen <= len(at) - self._head:
            self.slow_screen = how
            self.slow_restarts += 1
            statistic, tie_at, tie_bad = 0.0, math.nan, 0.0
            seen = self.added - self.count_after(now - span, math.inf)
        else:
            statistic, tie_at, tie_bad = self._slow_statistic, self._slow_tie_at, self._slow_tie_bad
        for i in range(len(at) - (self.added - seen), len(at)):
            started = at[i]
            if started > now:  # stamped ahead of the clock: carried once the clock gets there
                break
            seen += 1
            if not ok[i]:
                continue  # failures are the error tests'
            if started != tie_at:
                tie_at, tie_bad = started, 0.0
            if latency[i] / US > limit:  # as `Sample` reads it
                tie_bad += bad
                statistic += bad
                if tie_bad > statistic:  # noqa: PLR1730 - max() without the call: every window, every pass
                    statistic = tie_bad
            else:
                statistic += good
                if tie_bad > statistic:  # noqa: PLR1730 - tie_bad is never negative: the statistic neither
                    statistic = tie_bad
        self._slow_now, self._slow_seen, self._slow_statistic = now, seen, statistic
        self._slow_tie_at, self._slow_tie_bad = tie_at, tie_bad
        return statistic

    def failure_cusum(self, now: float, span: float, good: float, bad: float) -> float:
        """A CUSUM (floored at zero) of the outcomes within (now - span, now], oldest first: `bad`
        for a failure, `good` for a success; read from the outcome column, no sample made (the
        suspects ask it of every window with a recent failure, every pass)."""
        lo, hi = self._within(now - span, now)
        statistic = 0.0
        for ok in self._ok[lo:hi]:
            statistic = max(0.0, statistic + (good if ok else bad))
        return statistic

    def first_flagged_after(self, now: float, over: float = math.inf) -> float | None:
        """When the first kept sample started after `now` that failed, or succeeded slower than
        `over`; None without one. Counted when added (`failed_added`, `over_watch`), such a
        result is not within what a look at `now` reads: a look that found nothing holds only
        until the clock reaches it."""
        at, ok, latency = self._at, self._ok, self._latency
        for i in range(bisect_right(at, now, self._head), len(at)):
            if not ok[i] or latency[i] / US > over:
                return at[i]
        return None

    def stamped_after(self, now: float) -> bool:
        """Whether a kept sample started after `now` (an agent's clock ahead of this one)."""
        return len(self) > 0 and self._at[-1] > now

    def first_at(self) -> float | None:
        """When the oldest kept sample started; None without any (a window is trimmed about every
        `TRIM_SECONDS`, see `WindowStore.trim_steps`: it may be that far past the span)."""
        return self._at[self._head] if len(self) else None

    def last_failure(self) -> float | None:
        """When the newest kept failure started; None without one."""
        return self._failed_at[-1] if self._failed_at else None

    def passes_since_failure(self, limit: int) -> int:
        """How many results passed after the newest failure, counting at most `limit` of them
        (a walk back from the newest that stops there: cheap however long the window)."""
        last = self.last_failure()
        at, ok = self._at, self._ok
        count = 0
        for i in range(len(at) - 1, self._head - 1, -1):
            if count >= limit or (last is not None and at[i] <= last):
                break
            count += ok[i]
        return count

    def results_since_slower(self, latency: float, limit: int, since: float) -> int | None:
        """How many results came after the newest success slower than `latency` started at or
        after `since`; None when none is among the newest `limit` (a walk back that stops there).
        The newest alone first: the judge asks this of every window on every pass."""
        at, ok, latencies = self._at, self._ok, self._latency
        if self._head >= len(at) or limit <= 0:
            return None
        newest = len(at) - 1
        if at[newest] < since:
            return None
        if ok[newest] and latencies[newest] / US > latency:
            return 0
        if limit == 1:
            return None
        for count, i in enumerate(range(newest, self._head - 1, -1)):
            if count >= limit or at[i] < since:
                return None
            if ok[i] and latencies[i] / US > latency:
                return count
        return None

    def trim(self, now: float) -> None:
        horizon = now - self.span
        head = bisect_right(self._at, horizon, self._head)
        if head != self._head:
            self._version += 1
            self._head = head
            self._compact()
        failed = self._failed_at
        while failed and failed[0] <= horizon:
            failed.popleft()

    def samples(self, now: float, span: float | None = None) -> list[Sample]:
        """Samples within (now - span, now], oldest first; `span` defaults to the window's own.
        Remembers the answer (every detector asks the same in one judgement): the list is
        shared with the next caller asking the same; do not change it."""
        span = self.span if span is None else span
        looked = self._looked
        if looked is not None and looked[0] == now and looked[1] == span and looked[2] == self._version:
            return looked[3]
        found = self._samples(*self._within(now - span, now))
        if looked is None:
            _LOOKED.append(self)
        self._looked = (now, span, self._version, found)
        return found

    def forget_looks(self) -> None:
        """Let go of the last `samples` answer (see `WindowStore.forget_looks`)."""
        self._looked = None

    def failures(self, now: float, span: float | None = None) -> int:
        """How many of `samples(now, span)` failed, from the failure times alone."""
        return len(self.failure_times(now, self.span if span is None else span))

    def failed_within(self, after: float, now: float) -> bool:
        """Whether a kept sample that started within (after, now] failed."""
        for at in reversed(self._failed_at):
            if at <= after:
                return False
            if at <= now:
                return True
        return False

    def failure_times(self, now: float, span: float) -> list[float]:
        """When each failure within (now - span, now] started, oldest first."""
        horizon = now - span
        found = []
        for at in reversed(self._failed_at):
            if at <= horizon:
                break
            if at <= now:
                found.append(at)
        found.reverse()
        return found

    def latencies_by_slice(
        self, after: float, end: float, anchor: float, width: float, keep: Callable[[int], bool]
    ) -> dict[int, list[float]]:
        """The latencies of the successes within (after, end], by slice (`floor((at - anchor) /
        width)`), of the slices that `keep`; a slice whose samples all failed maps to an empty
        list. Read from the columns, no sample made: what the latency baselines summarise. A
        slice's samples are one run (start times are in order, and so their slices): a bisect
        finds where the next starts, then the slice of the samples on either side of it says
        exactly (float time may put one a rounding off the boundary the bisect looked for)."""
        lo, hi = self._within(after, end)
        at, ok, latency = self._at, self._ok, self._latency
        grouped: dict[int, list[float]] = {}
        floor = math.floor
        while lo < hi:
            index = floor((at[lo] - anchor) / width)
            stop = bisect_left(at, anchor + (index + 1) * width, lo, hi)
            while stop < hi and floor((at[stop] - anchor) / width) == index:
                stop += 1
            while stop > lo + 1 and floor((at[stop - 1] - anchor) / width) != index:
                stop -= 1
            if keep(index):
                grouped[index] = list(map(_seconds, compress(latency[lo:stop], ok[lo:stop])))
            lo = stop
        return grouped

    def outcomes(self, now: float, span: float, vantage: str) -> list[tuple[float, str, bool]]:
        """(start, `vantage`, failed) for each sample within (now - span, now], oldest first,
        read from the columns: what the error tests walk (see `sequential.failures_of`)."""
        lo, hi = self._within(now - span, now)
        return list(zip(self._at[lo:hi], repeat(vantage), map(not_, self._ok[lo:hi]), strict=False))

    def latency_outcomes(self, now: float, span: float, vantage: str, limit: float) -> list[tuple[float, str, bool]]:
        """(start, `vantage`, slower than `limit`) for each success within (now - span, now],
        oldest first, read from the columns: what the slowdown test walks."""
        lo, hi = self._within(now - span, now)
        at, ok, latency = self._at[lo:hi], self._ok[lo:hi], self._latency[lo:hi]
        return [(a, vantage, lat / US > limit) for a, good, lat in zip(at, ok, latency, strict=True) if good]

    def error_classes(self, now: float, span: float) -> list[str]:
        """The error class of each failure within (now - span, now] ("unknown" for none), read
        from the columns (the threshold detector asks every pass of every window that failed)."""
        lo, hi = self._within(now - span, now)
        ok, kind = self._ok, self._kind
        found: list[str] = []
        while True:
            try:
                lo = ok.index(0, lo, hi)
            except ValueError:
                return found
            found.append(_CLASSES[kind[lo] & CLASS_BITS] or "unknown")
            lo += 1

    def starts_until(self, now: float) -> tuple[array[float], int, int]:
        """The start-time column, and the indices from and to which the kept samples started at
        or before `now`: `count_after(at, now)` is `end - bisect_right(column, at, start, end)`
        for any `at` up to `now`, one bisect (the error tests ask it of every failure time)."""
        end = bisect_right(self._at, now, self._head)
        return self._at, self._head, end

    def starts_within(self, after: float, now: float, count: int) -> array[float]:
        """When the newest `count` samples within (after, now] started (fewer when fewer are)."""
        lo, hi = self._within(after, now)
        return self._at[max(lo, hi - count) : hi]

    def count_after(self, at: float, now: float) -> int:
        """How many samples started within (at, now]."""
        lo, hi = self._within(at, now)
        return hi - lo  # hi is found from lo on: never below it

    def last_failed(self, n: int, now: float, span: float | None = None) -> bool:
        """Whether the newest `n` scheduled samples within (now - span, now] (and there are that
        many) all failed, and no sample (scheduled or extra) passed since the oldest of them."""
        count = 0
        horizon = now - (self.span if span is None else span)
        at, ok, kind = self._at, self._ok, self._kind
        for i in range(len(at) - 1, self._head - 1, -1):
            if at[i] > now:
                continue
            if ok[i] or at[i] <= horizon:
                return False
            count += not kind[i] & EXTRA
            if count >= n:
                return True
        return False

    def age(self, now: float) -> float | None:
        """Seconds since the newest sample at or before `now` (one stamped later does not count
        yet); None without one within the window's span."""
        at = self._at
        if self._head < len(at) and at[-1] <= now:  # the usual case: nothing stamped ahead
            age = now - at[-1]
        else:
            newest = bisect_right(at, now, self._head)
            if newest == self._head:
                return None
            age = now - at[newest - 1]
        return age if age < self.span else None


def failure_times_in(windows: Iterable[Window], now: float, span: float) -> list[float]:
    """Every window's `failure_times(now, span)`, together and sorted: a look at each one's newest
    failure, its times only where that is within the span (the error tests and the vantage check
    ask it of every probe, every pass, and most windows have no failure that recent)."""
    horizon = now - span
    times: list[float] = []
    for window in windows:
        failed = window._failed_at  # noqa: SLF001 - the module's own windows
        if failed and failed[-1] > horizon:
            times.extend(window.failure_times(now, span))
    times.sort()
    return times


def failures_in(windows: Iterable[Window], now: float, span: float) -> int:
    """`Window.failures(now, span)` summed over the windows."""
    return len(failure_times_in(windows, now, span))


def any_failed_within(windows: Iterable[Window], after: float, now: float) -> bool:
    """Whether any of the windows kept a failure that started within (after, now]
    (`Window.failed_within`), looking first at each one's newest failure."""
    for window in windows:
        failed = window._failed_at  # noqa: SLF001 - the module's own windows
        if failed and failed[-1] > after and window.failed_within(after, now):
            return True
    return False


def fresh_look(windows: Mapping[str, Window], now: float, stale_after: float) -> tuple[dict[str, Window], float | None]:
    """The windows (name -> window) with a result at most `stale_after` old at `now`, and the age
    of the newest result at any of them (fresh or not; None without one): one look at each."""
    fresh: dict[str, Window] = {}
    newest = None
    for name, window in windows.items():
        at = window._at  # noqa: SLF001 - `age`'s usual case, without the call: every window, every pass
        if window._head < len(at) and at[-1] <= now and now - at[-1] < window.span:  # noqa: SLF001
            age: float | None = now - at[-1]
        else:
            age = window.age(now)
        if age is None:
            continue
        if newest is None or age < newest:
            newest = age
        if age <= stale_after:
            fresh[name] = window
    return fresh, newest


class WindowStore:
    """All windows, created on first result."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._windows: dict[WindowKey, Window] = {}
        self._by_region: dict[str, dict[tuple[str, str], Window]] = {}
        self._by_probe: dict[str, dict[str, dict[str, Window]]] = {}  # region -> probe -> vantage -> window
        self._frozen = 0  # how many windows there were at the last `gc.freeze` (see `trim`)
        self._freezes = 0  # how many trims from now on freeze
        self._trim_next = 0  # the window whose turn it is (see `trim_steps`)
        self._trimmed_at = -math.inf  # when the last trim was
        # By region, the windows that took a failure since `failed_lately` last found their
        # newest one older than it asks about, and what it was last asked (now, within).
        self._failed: dict[str, dict[tuple[str, str], Window]] = {}
        self._failed_asked: dict[str, tuple[float, float]] = {}
        # What a reader keeps between passes about these windows, by the reader's name (the
        # suspects' look for results far slower than usual: `suspicion._far_slower`).
        self.notes: dict[str, Any] = {}

    def add(self, result: Result) -> None:
        key = (result.region, result.probe, result.vantage)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = Window(self.span)
            self._by_region.setdefault(result.region, {})[(result.probe, result.vantage)] = window
            self._by_probe.setdefault(result.region, {}).setdefault(result.probe, {})[result.vantage] = window
        window.add(result)
        if not result.ok:
            self._failed.setdefault(result.region, {})[result.probe, result.vantage] = window

    def count(self) -> int:
        """How many windows there are: (region, probe, vantage) series with a result."""
        return len(self._windows)

    def region(self, region: str) -> dict[tuple[str, str], Window]:
        """(probe, vantage) -> window for one region."""
        return self._by_region.get(region, {})

    def failed_lately(self, region: str, now: float, within: float) -> list[tuple[tuple[str, str], Window]]:
        """(probe, vantage) and window, in the order `region` gives them, for each of the
        region's windows whose newest kept failure started at most `within` before `now` (or
        after it: stamped ahead of the clock). Only the windows that failed since a look found
        their newest failure older are looked at (the suspects ask every pass; most of 10,000
        windows have not failed in the last half minute); every window is, when the clock went
        back or `within` grew since the last look."""
        asked = self._failed_asked.get(region)
        self._failed_asked[region] = (now, within)
        if asked is not None and (now < asked[0] or within > asked[1]):
            self._failed[region] = {k: w for k, w in self.region(region).items() if w._failed_at}  # noqa: SLF001
        failed = self._failed.get(region)
        if not failed:
            return []
        found = []
        for key, window in list(failed.items()):
            times = window._failed_at  # noqa: SLF001 - its newest failure, as `last_failure` reads it
            if not times or now - times[-1] > within:
                del failed[key]
            else:
                found.append((key, window))
        found.sort(key=lambda kept: kept[1]._serial)  # noqa: SLF001 - created in the region's order
        return found

    def by_probe(self, region: str) -> dict[str, dict[str, Window]]:
        """probe -> vantage -> window for one region."""
        return self._by_probe.get(region, {})

    def forget_looks(self) -> None:
        """`forget_looks_steps` at once."""
        for _ in self.forget_looks_steps():
            pass

    def forget_looks_steps(self) -> Generator[None, None, None]:
        """Let every window go of the last `samples` answer it remembers: the judge does this
        when a judgement is done. Those answers are lists of samples (ten thousand windows hold
        six million references in them), and a list alive between two judgements is a container
        every garbage collection walks. Only the windows that hold one are looked at (`_LOOKED`:
        most probes are quiet, and their windows were not read). Yields every `FORGET_WINDOWS`
        windows, and first."""
        yield
        while _LOOKED:
            batch = _LOOKED[-FORGET_WINDOWS:]
            del _LOOKED[-FORGET_WINDOWS:]
            for window in batch:
                window.forget_looks()
            yield

    def trim(self, now: float) -> None:
        """`trim_steps` at once."""
        for _ in self.trim_steps(now):
            pass

    def trim_steps(self, now: float) -> Generator[None, None, None]:
        """Forget what is older than the span at the next windows in turn (the share of them
        that the time since the last trim is of `TRIM_SECONDS`), and keep the windows out of
        the collector's sight; yields every `STEP_WINDOWS` windows (a result may come in meanwhile:
        a window trimmed already keeps it, one not yet trims it only if it is that old).

        A window lives as long as the daemon and holds minutes of samples: a full garbage
        collection walks every one of them (six million at 10,000 series: 394 ms with the event
        loop stopped, every second or third tick, as each tick's evidence is promoted). So once
        windows have been created since the last trim, every object alive is moved to the
        permanent generation (`gc.freeze`), and again at the next trim (after a judgement has
        made what the detectors keep for the new windows): collections then walk only what was
        made since. Garbage is collected first, as a freeze would keep unreachable cycles for
        good (a collection then walks only what is not frozen yet: quick). What is frozen is
        still freed when nothing refers to it; only a cycle among objects alive at a freeze that
        dies later is never collected, and freezes happen only as windows appear (the first
        seconds after start, a configuration change, a new agent)."""
        if len(self._windows) != self._frozen:
            self._frozen = len(self._windows)
            self._freezes = 2
        if self._freezes:
            self._freezes -= 1
            gc.collect()
            gc.freeze()
        windows = list(self._windows.values())
        since, self._trimmed_at = now - self._trimmed_at, now
        share = since / TRIM_SECONDS if 0 < since < TRIM_SECONDS else 1.0
        start, many = self._trim_next % max(1, len(windows)), math.ceil(share * len(windows))
        self._trim_next = start + many
        turn = windows[start : start + many] + windows[: max(0, start + many - len(windows))]
        for count, window in enumerate(turn, 1):
            window.trim(now)
            if count % STEP_WINDOWS == 0:
                yield
