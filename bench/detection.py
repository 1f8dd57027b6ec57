"""Detection, closed loop: how fast each method names a region at fault, how often it names one that
is not, and how many extra probes the daemon's suspicion spends to get there.

Run:  make bench       (or: .venv/bin/python bench/detection.py [--seeds 20] [--days 7] [--jobs 2]
                            [--only TEXT] [--setups 1x1s,3x1s,1x10s,3x10s])

A simulated world (`controller/demo/streams.py`: 3 regions, 2 probes; healthy results fail 0.1% of the
time, with per-(region, vantage) base latencies, log-normal jitter and rare spikes) answers probes on
virtual time. The probes are scheduled as the daemon schedules them: every target on its own grid
(`interval`, a random phase, the daemon's 10% jitter), extra runs between ticks decided by the
scheduler's own `next_run` and `Hurry`, each result delivered when its probe completes (a timeout
costs its 2 s). The daemon's judge (`detectors_for` with `policies/verdicts.yaml`, the shipped policy, not a
tuned copy) judges as the daemon's judge loop does (every second; every `suspicion.judge_every`
while a suspect is probed; at once when a failure arrives), then the daemon's `suspects` renews
the suspicions, each vantage's scheduler taking its own (as agents will). So suspicion-driven
probing runs exactly as in the daemon, without its sockets.

Four setups by default: 1 and 3 vantages, probes every 1 s and every 10 s. Beside regionshift, three
baselines see the same world at the fixed rate (they never probe harder):

- Route 53 style health check: /healthz only, each vantage a checker every 10 s, a checker turns
  unhealthy after 3 consecutive failures (or answers slower than 2 s) and healthy after 3 passes;
  the region is flagged while 18% or fewer of the checkers see it healthy.
- Flagger style analysis: every 60 s, the region's success ratio over the last 60 s (every probe
  and vantage pooled) against 99%, and its p99 latency against 500 ms; flagged after 5 failed
  checks (Flagger's `threshold`).
- Multi-window burn rate (99.9% objective): flagged while the bad ratio (failures and answers
  slower than 500 ms) over both the last hour and the last 5 minutes exceeds 14.4 x 0.1%. Its hour
  starts full of healthy history, so it is not slowed by an empty window.

Each failure scenario starts at 600 s (so latency baselines exist) and runs until every method has
named the region or 30 minutes have passed (a miss). `onset` is the delay from the fault's onset to
the first verdict naming the culprit; `first` is the delay from the arrival of the first faulty
result of the culprit (a failure, or for a latency fault its first slowed result), which no detector
can beat. `extra` is the extra probes run on suspicion, as a share of the scheduled ones: from
the onset until regionshift names the culprit (it is judged no further then; for a flapping fault,
to the end of the run), over the whole run where no region is at fault.
False alarms are verdicts naming a region not at fault (or the culprit before its fault), per
simulated day; the healthy row runs `--days` days. Figures are in simulated seconds, so they
do not depend on this machine; the wall time is printed only to say what the run cost.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.demo.streams import HEALTHY, PROBES, REGIONS, VANTAGES, Scenario, Stream, scenarios
from controller.judging.detectors import detectors_for
from controller.judging.suspicion import hold, judge_delay, suspects, wakes_judge
from controller.judging.verdicts import Judge
from controller.judging.windows import WindowStore
from controller.settings.loading import load_policy
from probes.scheduler import Hurry, next_run

if TYPE_CHECKING:
    from collections.abc import Callable

    from controller.settings.policy import VerdictPolicy
    from probes.results import Result

ONSET = 600.0
HORIZON = 1800.0  # after the onset
DAY = 86_400.0
TICK = 1.0  # the daemon's default judge tick
JITTER = 0.1  # the daemon's default scheduling jitter, a fraction of the interval
POLICY_FILE = Path(__file__).resolve().parent.parent / "policies" / "verdicts.yaml"
METHODS = ["regionshift", "route53 check", "flagger analysis", "burn rate 14.4"]


@dataclass(frozen=True, slots=True)
class Setup:
    vantages: int
    interval: float

    @property
    def name(self) -> str:
        return f"{self.vantages}x{self.interval:g}s"

    @classmethod
    def parse(cls, text: str) -> Setup:
        count, _, every = text.partition("x")
        return cls(int(count), float(every.removesuffix("s")))


class Method(Protocol):
    name: str

    def observe(self, result: Result) -> None: ...

    def flagged(self, now: float) -> set[str]: ...


class Ours:
    name = "regionshift"

    def __init__(self, policy: VerdictPolicy) -> None:
        self.windows = WindowStore(policy.history)
        self.judge = Judge(detectors_for(policy), dict.fromkeys(REGIONS, PROBES), policy)

    def observe(self, result: Result) -> None:
        self.windows.add(result)

    def flagged(self, now: float) -> set[str]:
        self.windows.trim(now)
        self.judge.judge(self.windows, now)
        return {r for r, v in self.judge.verdicts.items() if v.status in ("degraded", "unhealthy")}


class Route53Check:
    name = "route53 check"
    every, threshold, too_slow, healthy_share = 10, 3, 2.0, 0.18

    def __init__(self, vantages: tuple[str, ...]) -> None:
        self.vantages = vantages
        self.healthy = {(r, v): True for r in REGIONS for v in vantages}
        self.streak = dict.fromkeys(self.healthy, 0)  # consecutive results against the current state
        self.last = dict.fromkeys(self.healthy, -1)  # the 10-second slot last checked

    def observe(self, result: Result) -> None:
        key = (result.region, result.vantage)
        slot = int(result.started_at // self.every)
        if result.probe != "healthz" or slot == self.last[key]:
            return
        self.last[key] = slot
        passed = result.ok and result.latency <= self.too_slow
        if passed == self.healthy[key]:
            self.streak[key] = 0
            return
        self.streak[key] += 1
        if self.streak[key] >= self.threshold:
            self.healthy[key], self.streak[key] = passed, 0

    def flagged(self, now: float) -> set[str]:
        del now
        share = self.healthy_share
        return {r for r in REGIONS if sum(self.healthy[r, v] for v in self.vantages) / len(self.vantages) <= share}


class Flagger:
    name = "flagger analysis"
    interval, threshold, min_success, max_p99 = 60.0, 5, 0.99, 0.5

    def __init__(self) -> None:
        self.current: dict[str, list[Result]] = {r: [] for r in REGIONS}
        self.failed_checks = dict.fromkeys(REGIONS, 0)
        self.next_check: float | None = None

    def observe(self, result: Result) -> None:
        self.current[result.region].append(result)

    def flagged(self, now: float) -> set[str]:
        if self.next_check is None:
            self.next_check = now + self.interval
        if now >= self.next_check:
            self.next_check += self.interval
            for region, results in self.current.items():
                ok = sorted(r.latency for r in results if r.ok)
                success = len(ok) / len(results) if results else 1.0
                p99 = ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else 0.0
                if success < self.min_success or p99 > self.max_p99:
                    self.failed_checks[region] += 1
                self.current[region] = []
        return {r for r, n in self.failed_checks.items() if n >= self.threshold}


class BurnRate:
    name = "burn rate 14.4"
    objective, burn, long, short, too_slow = 0.999, 14.4, 3600, 300, 0.5

    def __init__(self, start: float, per_second: float) -> None:
        healthy_bad = per_second * 0.001
        # One-second buckets of (results, bad); the hour starts full of healthy history.
        self.buckets = {r: deque([(per_second, healthy_bad)] * self.long, maxlen=self.long) for r in REGIONS}
        self.totals = {r: [per_second * self.long, healthy_bad * self.long] for r in REGIONS}
        self.short_totals = {r: [per_second * self.short, healthy_bad * self.short] for r in REGIONS}
        self.second = int(start)
        self.pending = {r: [0, 0] for r in REGIONS}

    def observe(self, result: Result) -> None:
        pending = self.pending[result.region]
        pending[0] += 1
        pending[1] += (not result.ok) or result.latency > self.too_slow

    def flagged(self, now: float) -> set[str]:
        del now
        limit = self.burn * (1 - self.objective)
        out = set()
        for r in REGIONS:
            buckets, total, short = self.buckets[r], self.totals[r], self.short_totals[r]
            oldest, leaving = buckets[0], buckets[-self.short]
            buckets.append((self.pending[r][0], self.pending[r][1]))
            for i in (0, 1):
                total[i] += self.pending[r][i] - oldest[i]
                short[i] += self.pending[r][i] - leaving[i]
            self.pending[r] = [0, 0]
            if total[1] / total[0] > limit and short[1] / short[0] > limit:
                out.add(r)
        return out


@dataclass
class Outcome:
    detected_at: float | None = None  # seconds after the onset
    false_alarms: int = 0
    flips: int = 0  # the culprit's flag changing after it was first raised


@dataclass
class RunResult:
    scenario: str
    setup: str
    seconds: float
    first_fault: float | None = None  # seconds after the onset: the first faulty result's arrival
    scheduled: int = 0
    extra: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)


Key = tuple[str, str, str]  # region, probe, vantage


class ClosedLoop:
    """Virtual time: each target's next run decided as the scheduler decides it, results delivered
    when their probe completes, the judge and the suspicions every `TICK`."""

    def __init__(self, stream: Stream, setup: Setup, policy: VerdictPolicy, seed: int) -> None:
        self.stream = stream
        self.interval = setup.interval
        self.policy = policy
        self.rng = random.Random(seed ^ 0x5EED)
        self.keys: list[Key] = [(r, p, v) for r in stream.regions for p in stream.probes for v in stream.vantages]
        self.base = {k: self.rng.uniform(0, self.interval) for k in self.keys}  # start of each grid
        self.due = {k: self._jittered(self.base[k]) for k in self.keys}
        self.last_run = dict.fromkeys(self.keys, -math.inf)
        self.busy_until = dict.fromkeys(self.keys, 0.0)  # the scheduled run in flight ends
        self.extras = dict.fromkeys(self.keys, 0)  # extra runs in flight
        self.hurries: dict[Key, Hurry] = {}
        self.version = dict.fromkeys(self.keys, 0)
        self.queue: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.scheduled = self.extra = 0
        self.counting_from = 0.0  # probes run before this are not counted
        self.counting_until = math.inf  # nor after this
        for key in self.keys:
            self._plan(key, 0.0)

    def _jittered(self, base: float) -> float:
        return base + self.rng.uniform(-JITTER, JITTER) * self.interval

    def _push(self, at: float, kind: str, item: object) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, kind, item))

    def _plan(self, key: Key, now: float) -> None:
        """Queue the target's next run (a suspicion that changes replans it: the scheduler's wake)."""
        hurry = self.hurries.get(key)
        if hurry is not None and hurry.forgotten(now):
            del self.hurries[key]
            hurry = None
        free = max(now, self.busy_until[key])  # the target's loop waits for its scheduled run
        at, reason = next_run(hurry, self.last_run[key], self.due[key], free)
        if hurry is not None and reason == "suspicion" and self.extras[key] >= hurry.parallel:
            at, reason = self.due[key], "scheduled"  # the next extra waits for one to end
        self.version[key] += 1
        self._push(max(at, free), reason, (key, self.version[key]))

    def hasten(self, key: Key, now: float, hold: float, runs: int | None, seen: float | None) -> None:
        """The scheduler's `hasten`, for one vantage's target."""
        s = self.policy.suspicion
        hurry = self.hurries.get(key)
        if hurry is None:
            hurry = self.hurries[key] = Hurry(s.every, now + hold, s.budget)
        hurry.renew(s.every, now + hold, s.budget, runs, s.parallel, seen)
        self._plan(key, now)

    def run_until(
        self,
        until: float,
        deliver: list[tuple[float, Result]],
        wake_after: float | None,
        wakes: Callable[[Result], bool],
    ) -> float:
        """Run every probe due before `until`; append (arrival, result) for those that arrive by
        then. A result that `wakes` the judge (the daemon's `wakes_judge`: a failure that can
        change a verdict) arriving, with `wake_after` set, stops at max(its arrival,
        `wake_after`) instead. Returns the time reached."""
        while self.queue and self.queue[0][0] < until:
            at, _, kind, item = heapq.heappop(self.queue)
            if kind == "arrival":
                result = item
                deliver.append((at, result))  # type: ignore[arg-type]
                if wake_after is not None and wakes(result):  # type: ignore[arg-type]
                    until = min(until, max(at, wake_after))
                if result.reason == "suspicion":  # type: ignore[attr-defined]
                    key = (result.region, result.probe, result.vantage)  # type: ignore[attr-defined]
                    self.extras[key] -= 1
                    self._plan(key, at)  # an extra run ending frees a place for the next
                continue
            key, version = item  # type: ignore[misc]
            if version != self.version[key]:
                continue  # replanned since
            if kind == "suspicion" and not self.hurries[key].active(at):
                self._plan(key, at)  # over while it waited: the scheduler checks again too
                continue
            result = self.stream.answer(*key, at)
            counted = self.counting_from <= at < self.counting_until
            if kind == "suspicion":
                self.hurries[key].spend(at, result.started_at)  # planned with it, replanned if it ended
                self.extra += counted
                result = _replace_reason(result)
                self.extras[key] += 1
                self.last_run[key] = at
                self._push(at + result.latency, "arrival", result)
                self._plan(key, at)  # the loop goes on while the extra run is in flight
                continue
            self.scheduled += counted
            self.base[key] += self.interval
            behind = at + result.latency - self.base[key]
            if behind > 0:  # ticks missed while the run overran are skipped, as the daemon does
                self.base[key] += math.ceil(behind / self.interval) * self.interval
            self.due[key] = self._jittered(self.base[key])
            self.last_run[key] = at
            done = at + result.latency
            self.busy_until[key] = done
            self._push(done, "arrival", result)
            self._plan(key, done)  # the target's task decides again when its probe returns
        return until


def _replace_reason(result: Result) -> Result:
    return replace(result, reason="suspicion")


def faulty(scenario: Scenario, result: Result) -> bool:
    """A result the fault shaped: a failure after the onset, or any result of a slowed target."""
    if result.region != scenario.culprit:
        return False
    if scenario.latency_factor != 1.0:
        return True
    return not result.ok


def score(scenario: Scenario, outcome: Outcome, before: set[str], flagged: set[str], t: float) -> set[str]:
    """Count what a method's newly flagged regions mean: the detection, a flip or a false alarm."""
    for region in flagged - before:
        if region == scenario.culprit and t >= scenario.onset:
            if outcome.detected_at is None:
                outcome.detected_at = t - scenario.onset
            else:
                outcome.flips += 1
        else:
            outcome.false_alarms += 1
    if scenario.culprit in before - flagged and outcome.detected_at is not None:
        outcome.flips += 1
    return flagged


def run(scenario: Scenario, seed: int, setup: Setup, duration: float, policy: VerdictPolicy) -> RunResult:
    stream = Stream(scenario, seed=seed, interval=setup.interval, vantages=VANTAGES[: setup.vantages])
    loop = ClosedLoop(stream, setup, policy, seed)
    if scenario.culprit is not None:
        loop.counting_from = scenario.onset  # the load a fault draws; healthy rows count it all
    ours = Ours(policy)
    per_second = len(PROBES) * setup.vantages / setup.interval
    methods: list[Method] = [ours, Route53Check(stream.vantages), Flagger(), BurnRate(stream.start, per_second)]
    outcomes = {m.name: Outcome() for m in methods}
    previous: dict[str, set[str]] = {m.name: set() for m in methods}
    baseline_tick = {m.name: 0.0 for m in methods}
    result_of = RunResult(scenario.name, setup.name, 0.0, outcomes=outcomes)
    onset = scenario.onset
    observe_flaps = scenario.flap is not None
    suspicion = policy.suspicion
    held = hold(TICK, suspicion)

    def wakes(result: Result) -> bool:
        return wakes_judge(result, ours.judge.verdicts, ours.judge.set_aside)

    t = 0.0
    suspecting = False
    while t < duration:
        # The daemon's judge loop: the next pass after its delay, or sooner when a failure
        # arrives, but never sooner than `judge_every` after the last.
        delay = judge_delay(TICK, suspecting, suspicion)
        wake_after = t + min(delay, suspicion.judge_every) if suspicion.enabled else None
        arrived: list[tuple[float, Result]] = []
        t = loop.run_until(t + delay, arrived, wake_after, wakes)
        for at, result in arrived:
            started = result.started_at - stream.start
            fault = scenario.active(result.region, result.probe, result.vantage, started)
            if fault and started >= onset and result_of.first_fault is None and faulty(scenario, result):
                result_of.first_fault = at - onset
            for m in methods:
                watching = outcomes[m.name].detected_at is None or observe_flaps
                if watching and (m is ours or result.reason == "scheduled"):
                    m.observe(result)
        now = stream.start + t
        for m in methods:
            outcome = outcomes[m.name]
            if outcome.detected_at is not None and not observe_flaps:
                continue
            if m is not ours:
                if now < baseline_tick[m.name]:
                    continue  # the baselines keep their own one-second clock
                baseline_tick[m.name] = math.floor(now) + TICK
            previous[m.name] = score(scenario, outcome, previous[m.name], m.flagged(now), t)
        if outcomes[ours.name].detected_at is not None and not observe_flaps:
            # Ours named the culprit and is no longer fed or judged: its suspects would be
            # those of that moment for the rest of the run. The load it drew ends here.
            loop.counting_until = min(loop.counting_until, t)
            found = {}
        else:
            found = suspects(ours.windows, ours.judge.probes, ours.judge.verdicts, now, policy, ours.judge.set_aside)
        for key, wanted in found.items():
            loop.hasten(key, t, held, wanted.runs, wanted.seen)
        suspecting = bool(found)
        result_of.seconds = t
        if scenario.culprit and not observe_flaps and all(o.detected_at is not None for o in outcomes.values()):
            break
    result_of.scheduled, result_of.extra = loop.scheduled, loop.extra
    return result_of


def _job(args: tuple[Scenario, int, Setup, float]) -> RunResult:
    scenario, seed, setup, duration = args
    return run(scenario, seed, setup, duration, policy())


def policy() -> VerdictPolicy:
    return load_policy([POLICY_FILE])[0].verdicts


def _seconds(values: list[float], pick: str) -> str:
    if not values:
        return "-"
    return f"{(statistics.median(values) if pick == 'median' else max(values)):.0f}s"


def table(results: list[RunResult], order: list[str], setups: list[Setup]) -> str:
    by_key: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        by_key.setdefault((r.scenario, r.setup), []).append(r)
    head = (
        f"{'scenario':<27} {'setup':<6} {'method':<17} {'onset med':>9} {'worst':>6} "
        f"{'first med':>9} {'worst':>6} {'missed':>7} {'false/day':>9} {'extra':>7} {'flips':>5}"
    )
    lines = [head]
    for name in order:
        has_culprit = name not in (HEALTHY.name, *NO_CULPRIT)
        for setup in setups:
            runs = by_key.get((name, setup.name), [])
            if not runs:
                continue
            days = sum(r.seconds for r in runs) / DAY
            extra = sum(r.extra for r in runs) / max(1, sum(r.scheduled for r in runs))
            for method in METHODS:
                outcomes = [r.outcomes[method] for r in runs]
                delays = [o.detected_at for o in outcomes if o.detected_at is not None]
                firsts = [
                    o.detected_at - r.first_fault
                    for r, o in zip(runs, outcomes, strict=True)
                    if o.detected_at is not None and r.first_fault is not None
                ]
                missed = f"{len(outcomes) - len(delays)}/{len(outcomes)}" if has_culprit else ""
                false = sum(o.false_alarms for o in outcomes) / days if days else 0.0
                flips = str(sum(o.flips for o in outcomes)) if name.startswith("flapping") else ""
                cells = [
                    _seconds(delays, "median"),
                    _seconds(delays, "worst"),
                    _seconds(firsts, "median"),
                    _seconds(firsts, "worst"),
                ]
                if not has_culprit:
                    cells = ["", "", "", ""]
                load = f"{extra:.1%}" if method == "regionshift" else ""
                lines.append(
                    f"{name:<27} {setup.name:<6} {method:<17} {cells[0]:>9} {cells[1]:>6} {cells[2]:>9} "
                    f"{cells[3]:>6} {missed:>7} {false:>9.2f} {load:>7} {flips:>5}"
                )
    return "\n".join(lines)


NO_CULPRIT = tuple(s.name for s in scenarios() if s.culprit is None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="runs per scenario and setup (default 20)")
    parser.add_argument("--days", type=float, default=7.0, help="simulated days of healthy noise a setup (default 7)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", help="run only scenarios whose name contains this")
    parser.add_argument(
        "--setups", default="1x1s,3x1s,1x10s,3x10s", help="VANTAGESxINTERVAL, comma-separated (default: all four)"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.days < 0 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1, --days not negative")
    try:
        setups = [Setup.parse(s) for s in args.setups.split(",")]
    except ValueError:
        parser.error(f"--setups: {args.setups!r} is not like 1x1s,3x10s")
    if any(not 1 <= s.vantages <= len(VANTAGES) or s.interval <= 0 for s in setups):
        parser.error(f"--setups: 1 to {len(VANTAGES)} vantages, an interval above 0")

    chosen = [s for s in scenarios() if not args.only or args.only in s.name]
    jobs = [(sc, seed, setup, ONSET + HORIZON) for sc in chosen for setup in setups for seed in range(args.seeds)]
    if not args.only or args.only in HEALTHY.name:
        whole_days, rest = divmod(args.days * DAY, DAY)
        for setup in setups:
            jobs += [(HEALTHY, 10_000 + i, setup, DAY) for i in range(int(whole_days))]
            if rest:
                jobs.append((HEALTHY, 20_000, setup, rest))
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_job, sorted(jobs, key=lambda j: -j[3]), chunksize=1))
    wall = time.perf_counter() - started
    order = [s.name for s in chosen] + ([HEALTHY.name] if any(r.scenario == HEALTHY.name for r in results) else [])
    print(
        f"detection, closed loop: {args.seeds} seeds per scenario and setup, {args.days:g} simulated days healthy "
        "a setup; 3 regions x 2 probes; setup = vantages x base interval"
    )
    print(table(results, order, setups))
    simulated = sum(r.seconds for r in results)
    print(f"simulated {simulated / 3600:.1f} h in {wall:.0f} s wall on {args.jobs} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
