"""The error-rate detector: sequential tests of each probe's failures against the acceptable error
ratio; it decides as soon as the evidence suffices.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from controller.judging.findings import (
    BAD_STATES,
    LEANING,
    Quiet,
    SequentialDetector,
    quiet,
    quiet_evidence,
    quiet_until,
    run_evidence,
    still_quiet,
    vantages_text,
)
from controller.judging.peers import errors_vs_peers
from controller.judging.sequential import Llr, cusum, failure_cusum_bound, failures_of
from controller.judging.windows import failures_in

if TYPE_CHECKING:
    from controller.judging.verdicts import RegionView
    from controller.settings.policy import VerdictPolicy

# A fault is over when the last verdict window leans healthy, and that window holds at least
# this many results: at a 10 s interval one window is 6 results, and a 40% fault shows none in
# three of them one time in five, so a flapping fault was "over" (and the region back) again
# and again (44 verdict flips in 8 runs of 30 minutes, one vantage).
OVER_AFTER = 20


class ErrorDetector(SequentialDetector):
    """Sequential tests (CUSUM) of each probe's failures, every fresh vantage pooled, against
    the policy's acceptable and unacceptable error ratios, each over its own horizon. A probe
    fails when one test's evidence crosses its threshold, a quorum of vantages agree, and the
    region is worse than its peers. The tests run in the policy's order; the first that holds
    decides, so a big fault is named by the fast test and a small one by the patient test."""

    name = "errors"

    def __init__(self, policy: VerdictPolicy) -> None:
        self.policy = policy
        self.tests = [(test, Llr.of(test), policy.horizon(test)) for test in policy.errors]
        self._quiet: dict[tuple[str, str], Quiet] = {}  # (region, probe) -> what it found nothing at

    def _probe(self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]) -> tuple[str, str | None]:
        p = self.policy
        windows = view.fresh_of(probe, now, p.stale_after)
        if not windows:
            return "unknown", None
        # Found nothing at its last look, and no failure since: still nothing (no test's statistic
        # grows without a failure: successes lower it, and results leaving a horizon take runs away).
        count = sum([w.failed_added for w in windows.values()])
        key = (view.region, probe)
        last = self._quiet.get(key)
        if last is not None and still_quiet(last, windows, now, count):
            evidence.update(quiet_evidence(last, now))
            return "ok", None
        outcome: tuple[str, str | None] = ("ok", None)
        best = 0.0
        # Nothing from before the region's last recovery: one stray failure after it must not
        # bring back the last fault's verdict on that fault's old failures (a patient test's
        # horizon holds them for minutes after the fault has stopped).
        since_recovery = math.inf if view.cleared_at is None else now - view.cleared_at
        for test, llr, full in self.tests:
            horizon = min(full, since_recovery)
            bad = failures_in(windows.values(), now, horizon)
            floor = LEANING if test is self.tests[0][0] else 1.0  # the quick test says what leans
            matters = floor * llr.threshold
            if bad * llr.bad < matters:  # even every failure in a row could not matter
                continue
            if failure_cusum_bound(windows.values(), now, horizon, llr, matters) < matters:
                continue  # the failures are too far apart to matter (without walking the results)
            events = failures_of(windows, now, horizon)
            run = cusum(events, llr)
            leans = run.statistic / run.threshold >= floor and self._beyond_quorum(run, len(windows))
            if run.statistic / run.threshold > best:
                best = run.statistic / run.threshold
                evidence.update(run_evidence(run, now), acceptable=test.acceptable, unacceptable=test.unacceptable)
            if not run.tripped or run.since is None:
                if leans:
                    evidence["leaning"] = True
                continue
            # A fault that has stopped is not held: a long run's evidence would otherwise take
            # as long to fade as it took to build. The last verdict window (`OVER_AFTER` results
            # at least) must still lean bad.
            in_window = sum(1 for e in events if e[0] > now - p.window)
            recent = [e[2] for e in events[-max(in_window, OVER_AFTER) :]]
            if full > p.window and llr.of_counts(len(recent), sum(recent)) <= 0:
                # Over, and no trouble either: a fault every region shared, never held against
                # one, kept its probe "leaning" for the patient test's 10 minutes, and a restore
                # waited all that while on "a shared cause" between regions healthy for minutes.
                what = f"{probe}: fault over ({run.bad} failures in the last {now - run.since:.0f}s"
                outcome = ("ok", f"{what}, but the last {len(recent)} results lean healthy)")
                continue
            if leans:
                evidence["leaning"] = True
            since = run.since
            what = (
                f"{probe}: {run.bad} of {run.events} probes failed in the last {now - since:.0f}s "
                f"({run.ratio:.1%}; acceptable {test.acceptable:.1%}) from {vantages_text(run)}"
            )
            state = "failing" if run.ratio >= 1 - p.unhealthy_below else "degraded"
            outcome = self._finding(
                view,
                what,
                run,
                len(windows),
                lambda: errors_vs_peers(view, probe, since, now, p, llr, horizon),  # noqa: B023 - called at once
                state,
                evidence,
            )
            if outcome[0] in BAD_STATES or outcome[0] == "shared":
                break
        evidence.setdefault("llr", 0.0)
        if outcome == ("ok", None) and not evidence.get("leaning"):
            # Until the clock reaches a failure stamped after `now` (counted already, not read yet).
            ahead = [at for w in windows.values() if (at := w.first_flagged_after(now)) is not None]
            until = min([quiet_until(now, view.region, probe, self.name), *ahead])
            self._quiet[key] = quiet(now, until, windows, count, evidence)
        else:
            self._quiet.pop(key, None)
        return outcome
