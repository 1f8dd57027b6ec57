"""Runs every probe on its own schedule and hands each `Result` to a sink.

Each probe has a task of its own that runs, waits for its next tick, and runs again, so a probe
never overlaps itself and a slow or hanging target delays nobody else. A semaphore bounds how many
probes are in flight overall. Ticks follow a fixed grid (start + k * interval) moved by a small
random jitter, so probes neither drift nor fire in lockstep; ticks missed while a run overran are
skipped and counted, not run in a burst.

A target under suspicion (`hasten`) is probed faster between its ticks: every `every` seconds at
most, within a budget of extra runs per minute, until the suspicion ends or has had the runs it
asked for. Extra runs are real runs, marked `reason="suspicion"`; the grid of scheduled ticks is not
moved by them. Up to `parallel` extra runs of one suspect may be in flight at once (HTTP and TCP
probes), so a far target's latency does not cap how fast its evidence comes (a 210 ms target run
one at a time gives under 5 results a second), and they may take half of the in-flight bound at
most: scheduled runs always have the other half. A scheduled run never overlaps another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from probes.kinds.http import HttpProber
from probes.kinds.tcp import TcpProber
from probes.spec import CloudWatchLagProbe, HttpProbe, PostgresLagProbe, TcpProbe

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from probes.kinds.cloudwatch import CloudWatchLagProber
    from probes.kinds.replication import PostgresLagProber
    from probes.results import Result, RunReason

    Prober = HttpProber | TcpProber | PostgresLagProber | CloudWatchLagProber
log = structlog.get_logger("regionshift.probes")

# How long past its own timeout a probe may run before the scheduler gives up on it: probe kinds
# enforce their timeout themselves, this only guards against a bug in one of them.
OVERRUN_GRACE = 1.0


def make_prober(
    spec: HttpProbe | TcpProbe | PostgresLagProbe | CloudWatchLagProbe, region: str, vantage: str
) -> Prober:
    if isinstance(spec, HttpProbe):
        return HttpProber(spec, region, vantage)
    if isinstance(spec, TcpProbe):
        return TcpProber(spec, region, vantage)
    # The lag kinds load their clients (asyncpg, boto3) only when a plan has one: an agent that
    # probes HTTP and TCP stays small.
    if isinstance(spec, PostgresLagProbe):
        from probes.kinds.replication import PostgresLagProber  # noqa: PLC0415

        return PostgresLagProber(spec, region, vantage)
    if isinstance(spec, CloudWatchLagProbe):
        from probes.kinds.cloudwatch import CloudWatchLagProber  # noqa: PLC0415

        return CloudWatchLagProber(spec, region, vantage)
    raise TypeError(f"no prober for {type(spec).__name__}")  # pragma: no cover - union is closed


@dataclass(slots=True)
class ProbeStats:
    runs: int = 0
    missed_ticks: int = 0
    in_flight: int = 0
    extra_runs: int = 0  # runs on suspicion, beyond the scheduled ones


@dataclass(slots=True)
class Hurry:
    """A suspicion on one target: extra runs every `every` seconds until `until` (loop time), at
    most `budget` extra runs in any 60 s, `left` more at most (None: as many as `until` allows),
    `parallel` of them in flight at once. It outlives its suspicion while its runs of the last
    60 s are remembered, so a suspicion that lapses and comes back neither starts its budget
    afresh nor forgets what it has run."""

    every: float
    until: float
    budget: int
    left: int | None = None
    parallel: int = 1
    spent: deque[float] = field(default_factory=deque)  # loop times of the extra runs in the last 60 s
    started: deque[float] = field(default_factory=deque)  # and their results' start times, the same ones

    def renew(
        self, every: float, until: float, budget: int, runs: int | None, parallel: int, seen: float | None = None
    ) -> None:
        """A newer ask replaces the older one's pace and count; its end is the later of the two.
        `runs` counts what the asker still needs from the results it has seen, the newest of
        which started at `seen` (the prober's clock): runs started after that are on their way
        and count against it."""
        self.every, self.until, self.budget, self.parallel = every, max(self.until, until), budget, parallel
        coming = 0 if seen is None else sum(1 for at in self.started if at > seen)
        self.left = None if runs is None else max(0, runs - coming)

    def active(self, now: float) -> bool:
        return now < self.until and (self.left is None or self.left > 0)

    def forgotten(self, now: float) -> bool:
        """Over, and no run of the last 60 s left to remember."""
        self._forget(now)
        return not self.active(now) and not self.spent

    def spend(self, at: float, started_at: float) -> None:
        """Count one extra run started at `at` (loop time), its result stamped `started_at`."""
        self.spent.append(at)
        self.started.append(started_at)
        if self.left is not None:
            self.left = max(0, self.left - 1)

    def _forget(self, now: float) -> None:
        while self.spent and self.spent[0] <= now - 60.0:
            self.spent.popleft()
            self.started.popleft()

    def next_extra(self, last_run: float, now: float) -> float | None:
        """When the next extra run is due, or None when the suspicion is over, has had the runs
        it asked for or its budget is spent."""
        self._forget(now)
        if not self.active(now):
            return None
        if len(self.spent) >= self.budget:
            return self.spent[0] + 60.0 if self.spent[0] + 60.0 < self.until else None
        return max(now, last_run + self.every)


def next_run(hurry: Hurry | None, last_run: float, due: float, now: float) -> tuple[float, RunReason]:
    """When a target runs next and why: an extra run on suspicion when one falls before its
    scheduled tick `due`, else that tick. The scheduler and the closed-loop detection benchmark
    (`bench/detection.py`) both decide with this."""
    extra = hurry.next_extra(last_run, now) if hurry is not None else None
    if extra is None or extra >= due:
        return due, "scheduled"
    return extra, "suspicion"


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def run_guarded(prober: Prober) -> Result:
    """One run; a prober that overruns or raises still yields a failed `Result`, never an exception."""
    started_at = time.time()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(prober.spec.timeout + OVERRUN_GRACE):
            return await prober()
    except TimeoutError:
        error_class, error = "timeout", f"probe overran its {prober.spec.timeout:g}s timeout"
    except Exception as exc:  # one probe's bug must not stop the others
        log.exception("probe raised", region=prober.subject.region, probe=prober.subject.probe)
        error_class, error = "internal", f"{type(exc).__name__}: {exc}"
    return prober.subject.result(
        started_at, {"total": time.perf_counter() - start}, error_class=error_class, error=error
    )


# How far a run moves from its tick, either way, as a fraction of the interval: the agents' (and
# the default of `controller.jitter`).
JITTER = 0.1


class Scheduler:
    def __init__(
        self,
        probers: Sequence[Prober],
        sink: Callable[[Result], None],
        *,
        max_concurrency: int = 64,
        jitter: float = JITTER,
        rng: random.Random | None = None,
    ) -> None:
        self.probers = list(probers)
        self.sink = sink
        self.jitter = jitter
        self.stats = ProbeStats()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._hurries: dict[tuple[str, str], Hurry] = {}
        self._extras: dict[tuple[str, str], int] = {}  # extra runs in flight, by target
        self._extra_slots = asyncio.Semaphore(max(1, max_concurrency // 2))
        # Targets whose extra runs may overlap: their kind says its runs share nothing (a lag
        # prober keeps its database connections between runs; it never does).
        self._overlap = {(p.subject.region, p.subject.probe) for p in self.probers if getattr(p, "overlaps", False)}
        self._group: asyncio.TaskGroup | None = None
        # What each target's task waits on between runs: settled at its tick by a timer, or early by
        # `hasten`. A future and a timer, as `asyncio.sleep` uses: a wait under `asyncio.timeout`
        # raised and caught a cancellation at every tick (a third of an agent's scheduling cost).
        self._waiters: dict[tuple[str, str], asyncio.Future[None]] = {}

    def hasten(
        self,
        region: str,
        probe: str,
        *,
        every: float,
        hold: float,
        budget: int,
        runs: int | None = None,
        parallel: int = 1,
        seen: float | None = None,
    ) -> None:
        """Probe this target every `every` seconds (on top of its ticks) for the next `hold`
        seconds, `runs` more times at most (None: no count), at most `budget` extra runs a minute
        and `parallel` at once (HTTP and TCP probes; others one at a time); called again, the
        suspicion is extended and its count replaced: the caller counts what it still needs from
        the results it has seen, the newest of which started at `seen`, and the runs started
        since count against it."""
        key = (region, probe)
        until = asyncio.get_running_loop().time() + hold
        hurry = self._hurries.get(key)
        if hurry is None:
            hurry = self._hurries[key] = Hurry(every, until, budget)
        hurry.renew(every, until, budget, runs, parallel if key in self._overlap else 1, seen)
        self._wake(key)

    def _wake(self, key: tuple[str, str]) -> None:
        waiter = self._waiters.get(key)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def hastened(self) -> set[tuple[str, str]]:
        """The targets under suspicion now."""
        now = asyncio.get_running_loop().time()
        return {key for key, hurry in self._hurries.items() if hurry.active(now)}

    async def run(self) -> None:
        """Probe forever (until cancelled)."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            for prober in self.probers:
                subject = prober.subject
                group.create_task(self._loop(prober), name=f"probe:{subject.region}/{subject.probe}")

    async def _loop(self, prober: Prober) -> None:
        loop = asyncio.get_running_loop()
        interval = prober.spec.interval
        key = (prober.subject.region, prober.subject.probe)
        # Spread first runs over one interval so that probes added together do not fire together.
        base = loop.time() + self._rng.uniform(0, interval)
        last_run = -math.inf
        while True:
            due = base + self._rng.uniform(-self.jitter, self.jitter) * interval
            while True:  # extra runs on suspicion, until the scheduled tick is nearer
                hurry = self._hurries.get(key)
                if hurry is not None and hurry.forgotten(loop.time()):
                    del self._hurries[key]
                    hurry = None
                at, reason = next_run(hurry, last_run, due, loop.time())
                if hurry is None or reason == "scheduled" or self._extras.get(key, 0) >= hurry.parallel:
                    await self._until(key, due)  # a new suspicion, or an extra run ending, wakes it early
                    if loop.time() >= due:
                        break
                    continue
                await asyncio.sleep(max(0.0, at - loop.time()))
                if not hurry.active(loop.time()) or self._extras.get(key, 0) >= hurry.parallel:
                    continue  # renewed meanwhile with less, or over
                hurry.spend(loop.time(), time.time())
                last_run = loop.time()
                self._start_extra(prober, key)
            last_run = loop.time()
            await self._run_one(prober)
            base += interval
            behind = loop.time() - base
            if behind > 0:
                missed = math.ceil(behind / interval)
                self.stats.missed_ticks += missed
                base += missed * interval

    def _start_extra(self, prober: Prober, key: tuple[str, str]) -> None:
        """One extra run beside the target's loop, which goes on deciding meanwhile."""
        assert self._group is not None  # noqa: S101 - only the loop `run` starts calls this
        self._extras[key] = self._extras.get(key, 0) + 1

        async def extra() -> None:
            try:
                async with self._extra_slots:  # scheduled runs always have the other half
                    await self._run_one(prober, "suspicion")
            finally:
                self._extras[key] -= 1
                self._wake(key)

        self._group.create_task(extra(), name=f"probe:{key[0]}/{key[1]}:extra")

    async def _until(self, key: tuple[str, str], due: float) -> None:
        """Wait until `due` (loop time), or until `hasten` wakes this target."""
        loop = asyncio.get_running_loop()
        waiter = self._waiters[key] = loop.create_future()
        timer = loop.call_at(due, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._waiters.get(key) is waiter:
                del self._waiters[key]

    async def _run_one(self, prober: Prober, reason: RunReason = "scheduled") -> None:
        async with self._slots:
            self.stats.in_flight += 1
            try:
                result = await run_guarded(prober)
            finally:
                self.stats.in_flight -= 1
        if reason != "scheduled":
            result = dataclasses.replace(result, reason=reason)
            self.stats.extra_runs += 1  # counted with the run, as the metrics count its result
        self.stats.runs += 1
        try:
            self.sink(result)
        except Exception:
            log.exception("result sink raised", region=result.region, probe=result.probe)


async def run_once(probers: Sequence[Prober], max_concurrency: int = 64) -> list[Result]:
    """Every probe once, concurrently within the bound; results in the order of `probers`."""
    slots = asyncio.Semaphore(max_concurrency)

    async def one(prober: Prober) -> Result:
        async with slots:
            return await run_guarded(prober)

    return list(await asyncio.gather(*(one(p) for p in probers)))
