"""Detection: how fast each method names a region at fault, and how often it names one that is not.

Run:  make bench       (or: .venv/bin/python bench/detection.py [--seeds 20] [--days 7] [--jobs 2])

Labelled result streams (`controller/demo/streams.py`: 3 regions, 2 probes, 3 vantages, each probe
every second per vantage; healthy results fail 0.1% of the time and jitter) are replayed, on
simulated time, through the daemon's own windows, detectors and judge (`detectors_for` with the
default policy in `policies/verdicts.yaml`, judged every second as the daemon does), and side by
side, on the same streams, through three baselines implemented here:

- Route 53 style health check: /healthz only, each vantage a checker every 10 s, a checker
  turns unhealthy after 3 consecutive failures (or answers slower than 2 s) and healthy after 3
  passes; the region is flagged while 18% or fewer of the checkers see it healthy.
- Flagger style analysis: every 60 s, the region's success ratio over the last 60 s (every
  probe and vantage pooled) against 99%, and its p99 latency against 500 ms; flagged after 5
  failed checks (Flagger's `threshold`).
- Multi-window burn rate (99.9% objective): flagged while the bad ratio (failures and answers
  slower than 500 ms) over both the last hour and the last 5 minutes exceeds 14.4 x 0.1%.
  Its hour starts full of healthy history, so it is not slowed by an empty window.

Each failure scenario starts at 600 s (so latency baselines exist) and runs until every method
has named the region or 30 minutes have passed (a miss). Delays are from the fault's onset to
the first verdict naming the culprit. False alarms are verdicts naming a region not at fault
(or the culprit before its fault), per simulated day; the healthy row runs `--days` days.
Figures are in simulated seconds, so they do not depend on this machine; the wall time is
printed beside them only to say what the run cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.demo.streams import HEALTHY, PROBES, REGIONS, VANTAGES, Scenario, Stream, scenarios
from controller.judging.detectors import detectors_for
from controller.judging.verdicts import Judge
from controller.judging.windows import WindowStore
from controller.settings.loading import load_policy

if TYPE_CHECKING:
    from controller.settings.policy import VerdictPolicy
    from probes.results import Result

ONSET = 600.0
HORIZON = 1800.0  # after the onset
DAY = 86_400.0
POLICY_FILE = Path(__file__).resolve().parent.parent / "policies" / "verdicts.yaml"


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

    def __init__(self) -> None:
        self.healthy = {(r, v): True for r in REGIONS for v in VANTAGES}
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
        return {r for r in REGIONS if sum(self.healthy[r, v] for v in VANTAGES) / len(VANTAGES) <= self.healthy_share}


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

    def __init__(self, start: float) -> None:
        per_second = len(PROBES) * len(VANTAGES)
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
    seconds: float
    outcomes: dict[str, Outcome] = field(default_factory=dict)


def run(scenario: Scenario, seed: int, duration: float, policy: VerdictPolicy) -> RunResult:
    stream = Stream(scenario, seed=seed)
    methods: list[Method] = [Ours(policy), Route53Check(), Flagger(), BurnRate(stream.start)]
    outcomes = {m.name: Outcome() for m in methods}
    previous: dict[str, set[str]] = {m.name: set() for m in methods}
    onset = stream.start + scenario.onset
    tick = stream.start + 1.0
    seconds = 0.0
    observe_flaps = scenario.flap is not None
    for result in stream.results(duration):
        while result.started_at >= tick:
            seconds = tick - stream.start
            for m in methods:
                outcome = outcomes[m.name]
                if outcome.detected_at is not None and not observe_flaps:
                    continue
                now_flagged = m.flagged(tick)
                for region in now_flagged - previous[m.name]:
                    if region == scenario.culprit and tick >= onset:
                        if outcome.detected_at is None:
                            outcome.detected_at = tick - onset
                        else:
                            outcome.flips += 1
                    else:
                        outcome.false_alarms += 1
                if scenario.culprit in previous[m.name] - now_flagged and outcome.detected_at is not None:
                    outcome.flips += 1
                previous[m.name] = now_flagged
            tick += 1.0
            if scenario.culprit and not observe_flaps and all(o.detected_at is not None for o in outcomes.values()):
                return RunResult(scenario.name, seconds, outcomes)
        for m in methods:
            if outcomes[m.name].detected_at is None or observe_flaps:
                m.observe(result)
    return RunResult(scenario.name, seconds, outcomes)


def _job(args: tuple[Scenario, int, float]) -> RunResult:
    scenario, seed, duration = args
    return run(scenario, seed, duration, policy())


def policy() -> VerdictPolicy:
    return load_policy([POLICY_FILE])[0].verdicts


def table(results: list[RunResult], order: list[str], methods: list[str]) -> str:
    by_scenario: dict[str, list[RunResult]] = {}
    for r in results:
        by_scenario.setdefault(r.scenario, []).append(r)
    lines = [
        f"{'scenario':<28} {'method':<17} {'median':>7} {'worst':>7} {'missed':>7} {'false/day':>10} {'flips':>6}",
    ]
    for name in order:
        runs = by_scenario.get(name, [])
        days = sum(r.seconds for r in runs) / DAY
        for method in methods:
            outcomes = [r.outcomes[method] for r in runs]
            delays = [o.detected_at for o in outcomes if o.detected_at is not None]
            has_culprit = name not in (HEALTHY.name, *NO_CULPRIT)
            median = f"{statistics.median(delays):.0f}s" if delays else "-"
            worst = f"{max(delays):.0f}s" if delays else "-"
            missed = f"{len(outcomes) - len(delays)}/{len(outcomes)}" if has_culprit else ""
            false = sum(o.false_alarms for o in outcomes) / days if days else 0.0
            flips = str(sum(o.flips for o in outcomes)) if name.startswith("flapping") else ""
            lines.append(
                f"{name:<28} {method:<17} {median if has_culprit else '':>7} {worst if has_culprit else '':>7} "
                f"{missed:>7} {false:>10.2f} {flips:>6}"
            )
    return "\n".join(lines)


NO_CULPRIT = tuple(s.name for s in scenarios() if s.culprit is None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="runs per scenario (default 20)")
    parser.add_argument("--days", type=float, default=7.0, help="simulated days of healthy noise (default 7)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", help="run only scenarios whose name contains this")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.days < 0 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1, --days not negative")

    chosen = [s for s in scenarios() if not args.only or args.only in s.name]
    jobs = [(scenario, seed, ONSET + HORIZON) for scenario in chosen for seed in range(args.seeds)]
    if not args.only or args.only in HEALTHY.name:
        whole_days, rest = divmod(args.days * DAY, DAY)
        jobs += [(HEALTHY, 10_000 + i, DAY) for i in range(int(whole_days))]
        if rest:
            jobs.append((HEALTHY, 20_000, rest))
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_job, sorted(jobs, key=lambda j: -j[2]), chunksize=1))
    wall = time.perf_counter() - started
    order = [s.name for s in chosen] + ([HEALTHY.name] if any(r.scenario == HEALTHY.name for r in results) else [])
    methods = ["regionshift", "route53 check", "flagger analysis", "burn rate 14.4"]
    print(
        f"detection: {args.seeds} seeds per scenario, {args.days:g} simulated days healthy, "
        "3 regions x 2 probes x 3 vantages, 1 probe/s each"
    )
    print(table(results, order, methods))
    simulated = sum(r.seconds for r in results)
    print(f"simulated {simulated / 3600:.1f} h in {wall:.0f} s wall on {args.jobs} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
