"""The threshold detector: fixed limits (success ratio, latency objective, consecutive failures)."""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import TYPE_CHECKING, Any

from scipy.stats import binom

from controller.judging.findings import (
    BAD_STATES,
    TROUBLE_STATES,
    Quiet,
    classes_text,
    errors_text,
    held_text,
    names,
    quiet,
    quiet_evidence,
    quiet_until,
    quorum,
    region_status,
    run_start,
    still_quiet,
    unconfirmed,
)
from controller.judging.peers import PeerCheck, errors_vs_peers, slower_vs_peers, wider_trouble
from controller.judging.sequential import Llr, fails_more
from controller.judging.verdicts import Assessment, RegionView, finish
from controller.judging.windows import AT, OK, WindowStats, span_view

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable, Mapping

    from controller.judging.windows import Window
    from controller.settings.policy import VerdictPolicy


class ThresholdDetector:
    """Success ratio and latency quantile per probe against the policy's fixed thresholds.

    Every vantage's fresh results for a probe are pooled. A probe whose last `down_after`
    results failed at every fresh vantage is failing at once, whatever its window's ratio (a
    region that went down must not wait for its window to fill with failures). A probe with no
    fresh result, or with fewer than `min_samples`, is not judged. The region is `unhealthy` when every judged probe
    is below `unhealthy_below` (and none is unjudged), `degraded` when any probe is below
    `degraded_below` or slower than the latency objective, `unknown` when any probe is not
    judged, and `healthy` only when every probe was judged and passed.
    """

    name = "threshold"

    def __init__(self, policy: VerdictPolicy) -> None:
        self.policy = policy
        self.llr = Llr.of(policy.errors[0])  # whose steps say whether a peer fails too
        self.q_name = f"latency_p{round(policy.latency.quantile * 100):d}"  # the quantile's name in evidence
        self._quiet: dict[tuple[str, str], Quiet] = {}  # (region, probe) -> what it found nothing at

    def assess(self, view: RegionView, now: float) -> Assessment:
        return finish(self.steps(view, now))

    def steps(self, view: RegionView, now: float) -> Generator[None, None, Assessment]:
        """`assess`, yielding between probes (see `Detector`)."""
        if not view.probes:
            # A region probed only by kinds other detectors judge (replication lag) has nothing
            # for this one to say; a region with no probe of any kind has no results at all.
            if view.windows:
                return Assessment("healthy")
            return Assessment("unknown", ("no probes configured for this region",))
        states: dict[str, str] = {}
        reasons: list[str] = []
        evidence: dict[str, Any] = {}
        for probe in view.probes:
            yield
            state, reason, evidence[probe] = self._quietly(view, probe, now)
            states[probe] = state
            if reason:
                reasons.append(f"{probe}: {reason}")
        troubles = frozenset(p for p, state in states.items() if state in TROUBLE_STATES)
        # Every probe down, at least one of them held against this region: the region is down,
        # even where a peer happens to fail one of the same probes (that probe alone would be
        # a shared cause, not the region as a whole).
        down = all(e.get("consecutive_failures") for e in evidence.values())
        if down and "failing" not in states.values():
            check = self._down_as_a_whole(view, now)
            if check is not None:  # every probe's reason says it, in place of its own "not held"
                states = dict.fromkeys(states, "failing")
                reasons = [r for r in reasons if r.split(": ", 1)[0] not in evidence]
                for probe in view.probes:
                    evidence[probe]["peers"] = check.evidence()
                    found = evidence[probe]
                    failed = _run_text(self.policy, found["vantages"], found["failures"], found.get("errors") or {})
                    reasons.append(f"{probe}: {failed}, down as a whole, {check.text()}")
        if down and "failing" in states.values():
            states = dict.fromkeys(states, "failing")
        return Assessment(region_status(states), tuple(reasons), evidence, troubles)

    def _down_as_a_whole(self, view: RegionView, now: float) -> PeerCheck | None:
        """A region whose every probe is down is a shared cause only when every peer fails too,
        not half of them: two regions of three refusing every request were each the other's
        "shared cause", never evacuated, and two thirds of the traffic stayed on them while the
        third answered. (Half stands for a probe down alone: under a fault every region shares,
        one that failed three in a row while a peer happened to answer was blamed.) Whether it
        fails significantly more than a peer pools every probe's run: a region down at one
        vantage shows it after `down_after` results, where one probe alone needs four or five.
        The check of the first probe that this sets apart; None when none."""
        p = self.policy
        runs = {}
        for probe in view.probes:
            windows = view.fresh_of(probe, now, p.stale_after)
            runs[probe] = (windows, run_start(windows.values(), now, p.window, p.down_after))
        for probe in runs:
            check = self._down_peers(view, probe, runs, now, every=True)
            if check.set_apart:
                return check
        return None

    def _quietly(self, view: RegionView, probe: str, now: float) -> tuple[str, str | None, dict[str, Any]]:
        """`_probe`, or what it found last where that holds (`Quiet`): it found nothing; no
        result since failed or took longer than the objective (those are all that can break it
        while its figures last: `_quiet_until`); the same vantages are fresh."""
        p = self.policy
        fresh = view.fresh_of(probe, now, p.stale_after)
        count = sum([w.failed_added + w.over_watch for w in fresh.values()])
        key = (view.region, probe)
        last = self._quiet.get(key)
        if last is not None and still_quiet(last, fresh, now, count):
            evidence = quiet_evidence(last, now)
            evidence["last_result_age"] = round(view.newest_age(probe, now, p.stale_after) or 0.0, 3)
            return "ok", None, evidence
        state, reason, evidence = self._probe(view, probe, now)
        until = self._quiet_until(view, probe, fresh, now, evidence) if state == "ok" and reason is None else now
        if until > now:
            for window in fresh.values():  # from now on, a result slower than it is counted
                if window.watch == -math.inf or window.watch > p.latency.threshold:
                    window.watch = p.latency.threshold  # lowered only (another objective may watch)
            self._quiet[key] = quiet(now, until, fresh, count, evidence)
        else:
            self._quiet.pop(key, None)
        return state, reason, evidence

    def _quiet_until(
        self, view: RegionView, probe: str, fresh: Mapping[str, Window], now: float, evidence: Mapping[str, Any]
    ) -> float:
        """Until when a probe found `ok` stays so while no result fails or takes longer than the
        objective (`now` when it may not): the failures and the successes over the objective
        counted now are the most it can have, and its success ratio, count and latency quantile
        hold while enough of its results are within the window. Whichever comes first of that
        and `quiet_until`."""
        p = self.policy
        if not fresh:
            return now
        latencies = span_view(tuple(fresh.values()), now, p.window).latencies  # `_probe` moved it to `now`
        over = len(latencies) - bisect_right(latencies, p.latency.threshold)  # at most that many, from now on
        failures = evidence.get("failures") or 0
        needed = max(p.min_samples, math.ceil(failures / (1 - p.degraded_below)) if p.degraded_below < 1 else 0)
        while (needed - failures) / needed < p.degraded_below:  # the ratio `_limits` compares, exactly
            needed += 1
        if over:
            # The quantile is over the objective when more successes are than rank it
            # (`WindowStats.latency_quantile`): with `over` of them, enough successes keep it under
            # (about over / (1 - quantile), the policy's quantile being below 1).
            successes = max(over, int(over / (1 - p.latency.quantile)) - 2)
            while successes - max(1, math.ceil(p.latency.quantile * successes)) < over:
                successes += 1
            needed = max(needed, successes + failures)
        newest: list[float] = []
        for window in fresh.values():
            newest.extend(window.starts_within(now - p.window, now, needed))
        if len(newest) < needed:
            return now
        newest.sort()
        # Absent new results, `needed` of them are within the window while the needed-th newest is;
        # and a failure or a slow success stamped after `now`, counted already, is not read yet.
        until = min(quiet_until(now, view.region, probe, self.name), newest[-needed] + p.window)
        for window in fresh.values():
            ahead = window.first_flagged_after(now, p.latency.threshold)
            if ahead is not None:
                until = min(until, ahead)
        return until

    def _probe(self, view: RegionView, probe: str, now: float) -> tuple[str, str | None, dict[str, Any]]:
        state, reason, evidence = self._of(view, probe, now)
        if state not in BAD_STATES:
            return state, reason, evidence
        p = self.policy
        windows = view.fresh_of(probe, now, p.stale_after)
        if evidence.get("consecutive_failures"):
            # Every fresh vantage saw the run (a quorum by construction); the peers must be
            # answering where this region fails, or it is a shared cause, not this region. A
            # probe whose results all fail is never healthy, though: not held, it is unknown.
            # The peers are looked at over twice the span of the last `down_after` failures: a
            # fault every region shares fails each at random, and a peer that happened to
            # answer a few times in a row would otherwise vouch for a shared fault's first seconds.
            start = run_start(windows.values(), now, p.window, p.down_after)
            down = self._down_peers(view, probe, {probe: (windows, start)}, now)
            evidence["peers"] = down.evidence()
            if not down.set_apart:
                return (
                    ("shared-down" if down.shared else "unknown"),
                    f"{reason}, {down.limit_text()}, not held",
                    evidence,
                )
            return state, f"{reason}, {down.text()}", evidence
        # A ratio or latency finding must hold at a quorum of vantages and set the region apart.
        agreeing = sorted(v for v, w in windows.items() if self._limits({v: w}, now, w.age(now))[0] == state)
        needed = quorum(p, len(windows))
        if len(agreeing) < needed:
            seen = f"seen alone at {', '.join(agreeing)}" if agreeing else "seen at no vantage alone"
            return "ok", f"{reason}: {seen}, {needed} vantages needed, not held", evidence
        if state == "slow":
            peers = self._slow_peers(view, probe, now)
        else:
            peers = errors_vs_peers(view, probe, now - p.window, now, p, self.llr, p.window)
        evidence["peers"] = peers.evidence()
        if not peers.set_apart:  # a raw limit has no test of its own: the peers supply it
            found = unconfirmed(view, peers, state, never_healthy=state == "failing")
            return found, f"{reason}, {peers.limit_text()}{held_text(view, found, state)}", evidence
        return state, reason, evidence

    def _down_peers(
        self,
        view: RegionView,
        probe: str,
        runs: Mapping[str, tuple[Mapping[str, Window], float]],
        now: float,
        *,
        every: bool = False,
    ) -> PeerCheck:
        """Peers on `probe` against this region's run of failures: `runs` maps `probe` (and, for
        a region down as a whole, its other probes) to the region's fresh windows and when its
        last `down_after` failures began. A peer is alike when it failed on `probe` over twice
        the span of those (which slides as an outage goes on, so one stray failure of a peer
        holds nothing for long), or when its failures over the verdict window are more than a
        healthy target's noise (binomial tail at the acceptable ratio under
        `peers.significance`); either after leaving out its quorum - 1 vantages that fail most,
        as a vantage's own bad path is not the peer's trouble. A peer that is not alike is one
        this region is worse than only when the region's whole runs of failures (since each
        vantage's last success) fail significantly more than the peer's results over twice
        their spans (Fisher's test at `peers.significance`, with `min_error_ratio`): under a
        fault every region shares, three failures in a row at one vantage beside two peers that
        happened to answer six times each is a chance of about one in 500 a second, and it was
        blamed. `apart` pools the peers that are not alike. A peer with no result in the span
        cannot vouch and is not compared; when peers run the probe but none can vouch yet,
        nothing is held (`apart` False) until they report. A peer whose trouble is wider
        (`wider_trouble`: it fails another probe that this region answers) is left out."""
        p = self.policy
        significance, ratio = p.peers.significance, p.peers.min_error_ratio
        # The whole run of failures since each vantage's last success, not only the last
        # `down_after`, against the peers' results over twice its span: a probe down for a
        # minute is that much evidence (its last three beside the peers' six answers never
        # were, 1 in 84, and a single-probe region at one vantage was held only by its error
        # test). Whether a peer failed too is asked over twice the span of the last
        # `down_after` only, so one stray failure of a peer holds nothing for long.
        whole = {o: _failed_in_a_row(windows.values(), now, p.window) for o, (windows, _s) in runs.items()}
        failed_run = sum(count for count, _at in whole.values())
        mine = (failed_run, failed_run)
        since = runs[probe][1] - (now - runs[probe][1])
        compared: list[str] = []
        worse_than: list[str] = []
        alike: list[str] = []
        left_out: list[str] = []
        detail: dict[str, Any] = {}
        pooled = [0, 0]
        running = 0
        for name, peer in sorted(view.peers.items()):
            if probe not in peer.probes:
                continue
            running += 1
            other = wider_trouble(view, peer, probe, since, now, p, p.window, self.llr.acceptable)
            if other is not None:  # down as a whole: its failures here say nothing of a shared cause
                left_out.append(name)
                detail[name] = {"left_out": other}
                continue
            looks = {o: self._peer_look(peer, o, start - (now - start), now) for o, (_n, start) in whole.items()}
            recent, failed, noise = self._peer_look(peer, probe, since, now)
            if not recent:
                continue
            compared.append(name)
            theirs = (sum(look[0] for look in looks.values()), sum(look[1] for look in looks.values()))
            worse, p_value = fails_more(mine, theirs, significance, ratio)
            detail[name] = {
                "samples": recent,
                "failures": failed,
                "window_p": round(noise, 6),
                "p_value": round(p_value, 6),
            }
            if failed or noise < significance:
                alike.append(name)
                continue
            pooled[0] += theirs[0]
            pooled[1] += theirs[1]
            if worse:
                worse_than.append(name)
        if pooled[0]:  # the peers that answer, together (one down too is alike, not a contrast)
            apart: bool | None = fails_more(mine, (pooled[0], pooled[1]), significance, ratio)[0]
        elif compared:
            apart = None  # every peer compared is alike: `shared` says it
        else:
            apart = False if running > len(left_out) else None
        return PeerCheck(
            tuple(compared), tuple(worse_than), tuple(alike), detail, apart, left_out=tuple(left_out), every=every
        )

    def _peer_look(self, peer: RegionView, probe: str, since: float, now: float) -> tuple[int, int, float]:
        """A peer's results on `probe` since `since`, its failures among them, and how likely its
        failures over the verdict window are as a healthy target's noise (binomial tail at the
        acceptable ratio); all after leaving out its quorum - 1 vantages that fail it most.
        (0, 0, 1.0) for a probe the peer does not run."""
        p = self.policy
        windows = peer.fresh_of(probe, now, p.stale_after) if probe in peer.probes else {}
        samples = {v: w.samples(now, p.window) for v, w in windows.items()}
        ranked = sorted(samples, key=lambda v: -sum(not s[OK] for s in samples[v]))
        kept = ranked[quorum(p, len(samples)) - 1 :] if samples else []
        recent = [s for v in kept for s in samples[v] if s[AT] >= since]
        window = [s for v in kept for s in samples[v]]
        bad = sum(not s[OK] for s in window)
        noise = float(binom.sf(bad - 1, len(window), self.llr.acceptable)) if window else 1.0
        return len(recent), sum(not s[OK] for s in recent), noise

    def _slow_peers(self, view: RegionView, probe: str, now: float) -> PeerCheck:
        """Peers over the same fixed objective, by the count of results over its threshold: a
        peer breaking the objective too is alike."""

        def alike(name: str) -> bool:
            return self._of(view.peers[name], probe, now)[0] == "slow"

        return slower_vs_peers(view, probe, now, self.policy, alike)

    def _of(self, view: RegionView, probe: str, now: float) -> tuple[str, str | None, dict[str, Any]]:
        """`_limits` of one probe of a region."""
        stale_after = self.policy.stale_after
        return self._limits(view.fresh_of(probe, now, stale_after), now, view.newest_age(probe, now, stale_after))

    def _limits(
        self, fresh_windows: Mapping[str, Window], now: float, newest_age: float | None
    ) -> tuple[str, str | None, dict[str, Any]]:
        """One probe's state against the fixed limits, from its fresh windows (`windows.fresh_look`) and the
        age of its newest result at any vantage (`RegionView.newest_age`)."""
        p = self.policy
        evidence: dict[str, Any] = {
            "vantages": names(fresh_windows),
            "last_result_age": round(newest_age, 3) if newest_age is not None else None,
        }
        if not fresh_windows:
            what = f"no result in the last {p.stale_after:g}s" if newest_age is not None else "no result yet"
            return "unknown", what, evidence
        stats = WindowStats.of(fresh_windows.values(), now, p.window, top=p.latency.quantile)
        quantile = stats.latency_quantile(p.latency.quantile)
        q_name = self.q_name
        evidence.update(
            samples=stats.samples,
            failures=stats.failures,
            success_ratio=round(stats.success_ratio, 4) if stats.samples else None,
        )
        if stats.errors:  # by class, when any: a dict in it would have the collector walk it
            evidence["errors"] = stats.errors
        evidence[q_name] = round(quantile, 4) if quantile is not None else None
        if all(w.last_failed(p.down_after, now, p.window) for w in fresh_windows.values()):
            evidence["consecutive_failures"] = True
            return "failing", _run_text(p, fresh_windows, stats.failures, stats.errors), evidence
        if stats.samples < p.min_samples:
            return "unknown", f"only {stats.samples} of {p.min_samples} results needed to judge", evidence
        ratio = stats.success_ratio
        if ratio < p.degraded_below:  # said only when it is (a pass judges thousands of probes)
            # One decimal where the whole percent would read as the limit ("95% ... below 95%").
            shown = (
                f"{ratio:.0%}"
                if f"{ratio:.0%}" not in (f"{p.degraded_below:.0%}", f"{p.unhealthy_below:.0%}")
                else f"{ratio:.1%}"
            )
            summary = (
                f"{shown} of {stats.samples} probes succeeded over {p.window:g}s "
                f"from {', '.join(sorted(fresh_windows))}{errors_text(stats)}"
            )
            if ratio < p.unhealthy_below:
                return "failing", f"{summary}, below {p.unhealthy_below:.0%}", evidence
            return "degraded", f"{summary}, below {p.degraded_below:.0%}", evidence
        if quantile is not None and quantile > p.latency.threshold:
            return (
                "slow",
                f"{q_name} {quantile * 1000:.0f}ms over {p.window:g}s exceeds {p.latency.threshold * 1000:.0f}ms",
                evidence,
            )
        return "ok", None, evidence


def _run_text(policy: VerdictPolicy, vantages: Iterable[str], failures: int, errors: Mapping[str, int]) -> str:
    """'the last 3 results from controller all failed (status x3)', of a probe whose last
    `down_after` results failed at every fresh vantage; errors beyond the run are said to be the
    window's ('status x52 in 60s')."""
    beyond = policy.window if failures > policy.down_after else None
    failed = f"the last {policy.down_after} results from {', '.join(sorted(vantages))} all failed"
    return failed + classes_text(errors, beyond)


def _failed_in_a_row(windows: Iterable[Window], now: float, span: float) -> tuple[int, float]:
    """How many of the windows' newest samples within (now - span, now] failed in a row (since
    each one's last success), and when the oldest of them started (`now` when none)."""
    count, start = 0, now
    for window in windows:
        for sample in reversed(window.samples(now, span)):
            if sample[OK]:
                break
            count += 1
            start = min(start, sample[AT])
    return count, start
