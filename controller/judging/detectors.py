"""The detectors: pure functions of one region's windows (and its peers') and the clock.

- `ThresholdDetector`: fixed limits (success ratio, latency objective, consecutive failures).
- `ErrorDetector`: a sequential test on each probe's outcomes against the acceptable error
  ratio; decides as soon as the evidence suffices.
- `SlowdownDetector`: a sequential test on latency against the region's own recent baseline,
  so a region 50% slower than usual is caught even far under any fixed objective.

Every finding must also hold for a quorum of the vantages (one vantage's bad path is not the
region's fault) and against the region's peers (the same probe in the other regions: a fault
every region shares is not held against one of them; its reasons say so instead). The probes
of a region combine one way in every detector: every probe failing is `unhealthy`, some
failing while others pass is `degraded` and named, probes not judged make it `unknown`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple

from scipy.stats import binom, mannwhitneyu

from controller.judging.sequential import Llr, Run, cusum, fails_more, failures, slower
from controller.judging.verdicts import Assessment, Detector, RegionView, Status
from controller.judging.windows import WindowStats

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from controller.judging.windows import Sample, Window
    from controller.settings.config import VerdictPolicy

# A peer with fewer results than this over the compared span is not compared.
MIN_PEER_SAMPLES = 5

BAD_STATES = frozenset({"failing", "degraded", "slow"})
# A probe in one of these states shows trouble, held against its region or not ("shared-down":
# its last results all failed, and so did its peers': not held, and not healthy either).
TROUBLE_STATES = BAD_STATES | {"shared", "shared-down"}
# A sequential test this far toward its threshold leans bad: the probe shows trouble even while
# nothing is held against it. For errors that is two close failures (one is noise); for latency,
# slow outcomes that also clear the effect size.
LEANING = 0.5


def detectors_for(policy: VerdictPolicy) -> list[Detector]:
    """The detectors the daemon runs, and the benchmark beside it."""
    return [ThresholdDetector(policy), ErrorDetector(policy), SlowdownDetector(policy)]


def fresh(windows: Mapping[str, Window], now: float, stale_after: float) -> dict[str, Window]:
    return {v: w for v, w in windows.items() if (age := w.age(now)) is not None and age <= stale_after}


def region_status(states: Mapping[str, str]) -> Status:
    """One region's status from its probes' states (failing, degraded, slow, unknown, ok, shared)."""
    values = set(states.values())
    if values == {"failing"}:
        return "unhealthy"
    if values & BAD_STATES:
        return "degraded"
    if values & {"unknown", "shared-down"}:
        return "unknown"
    return "healthy"


def quorum(policy: VerdictPolicy, vantages: int) -> int:
    """How many vantages must agree: the policy's quorum, or all of them when fewer report."""
    return max(1, min(policy.vantages.quorum, vantages))


def _since(samples: Iterable[Sample], since: float) -> list[Sample]:
    return [s for s in samples if s.at >= since]


@dataclass(frozen=True, slots=True)
class PeerCheck:
    """How one region compares with the other regions running the same probe."""

    compared: tuple[str, ...] = ()
    worse_than: tuple[str, ...] = ()  # significantly worse, by at least the effect size
    alike: tuple[str, ...] = ()  # elevated themselves: failing or slow more than a healthy peer
    detail: dict[str, Any] = field(default_factory=dict)
    # Significantly worse (by the effect size) than every compared peer's results pooled; None
    # when no peer has enough results to compare.
    apart: bool | None = None

    @property
    def shared(self) -> bool:
        """At least half of the peers show the same trouble: a shared cause (or the prober) is
        likelier than several regions failing apart, and evacuating one region would not help."""
        return bool(self.compared) and len(self.alike) * 2 >= len(self.compared)

    @property
    def regional(self) -> bool:
        """Fewer than half of the peers show the same trouble, and the region is significantly
        worse than the peers taken together (or there is none to compare with): the finding
        stands against this region. Pooled, because in the first seconds of a fault that every
        region shares, each peer has too few results of its own to look alike; pooled peers
        still tell a region failing 40% of probes apart within a few probe rounds."""
        return not self.shared and self.apart is not False

    @property
    def set_apart(self) -> bool:
        """Significantly worse than at least half of the peers (or no peers to compare): what
        a raw limit, which carries no test of its own, needs before it blames a region."""
        return self.regional and len(self.worse_than) * 2 >= len(self.compared)

    def text(self) -> str:
        if self.shared:
            return f"like {', '.join(self.alike)}: a shared cause"
        if not self.compared:
            return "no peer result yet to compare with" if self.apart is False else "no peer region to compare with"
        if self.apart is False:
            return f"not yet significantly worse than {', '.join(self.compared)} together"
        if self.worse_than:
            return f"worse than {', '.join(self.worse_than)}"
        return f"unlike {', '.join(sorted(set(self.compared) - set(self.alike)))}"

    def evidence(self) -> dict[str, Any]:
        return {
            "worse_than": list(self.worse_than),
            "alike": list(self.alike),
            "apart": self.apart,
            "peers": self.detail,
        }


def _pooled(samples: int, test: Callable[[], bool]) -> bool | None:
    """The pooled comparison: None without any peer result (nothing to compare with: the
    finding stands), False while there are too few to tell (a run a second old waits a moment)."""
    if samples == 0:
        return None
    return samples >= MIN_PEER_SAMPLES and test()


def errors_vs_peers(
    view: RegionView, probe: str, since: float, now: float, policy: VerdictPolicy, llr: Llr, span: float
) -> PeerCheck:
    """Fisher's exact test (one-sided) of this region's failures against each peer's since
    `since` (within `span`), with an effect size: worse means significant and `min_error_ratio`
    times theirs. A peer is alike when its own failures lean bad on the test `llr` steps."""

    def counts(v: RegionView) -> tuple[int, int]:
        samples = [
            s for w in fresh(v.windows_of(probe), now, policy.stale_after).values() for s in w.samples(now, span)
        ]
        recent = _since(samples, since)
        return len(recent), sum(not s.ok for s in recent)

    n, bad = counts(view)
    if n == 0:
        return PeerCheck()

    def worse(theirs: int, their_bad: int) -> tuple[bool, float]:
        return fails_more((n, bad), (theirs, their_bad), policy.peers.significance, policy.peers.min_error_ratio)

    compared, worse_than, alike, detail = [], [], [], {}
    total, total_bad = 0, 0
    for name, peer in sorted(view.peers.items()):
        if probe not in peer.probes:
            continue
        pn, pbad = counts(peer)
        compared.append(name)
        total, total_bad = total + pn, total_bad + pbad
        if pn < MIN_PEER_SAMPLES:
            continue
        if llr.of_counts(pn, pbad) > 0:  # the peer fails more often than a healthy one would
            alike.append(name)
        is_worse, p_value = worse(pn, pbad)
        detail[name] = {"error_ratio": round(pbad / pn, 4), "samples": pn, "p_value": round(p_value, 6)}
        if is_worse:
            worse_than.append(name)
    apart = _pooled(total, lambda: worse(total, total_bad)[0])
    return PeerCheck(tuple(compared), tuple(worse_than), tuple(alike), detail, apart)


class Baseline(NamedTuple):
    slow: float  # a successful sample slower than this counts as slow
    median: float


class Baselines:
    """Each (region, probe, vantage)'s usual latency, from its successful results over
    `baseline` seconds ending one verdict window before the last refresh, cut into verdict-window
    slices: the median across slices of each slice's slowdown quantile (and of its median). A
    slowdown so becomes the new normal only once it fills half the baseline, not the
    1 - quantile of it a plain quantile would allow. Refreshed once per verdict window."""

    def __init__(self, policy: VerdictPolicy) -> None:
        self.policy = policy
        self._refreshed: float | None = None
        self._cache: dict[int, Baseline | None] = {}

    def of(self, window: Window, now: float) -> Baseline | None:
        p = self.policy
        refreshed = math.floor(now / p.window) * p.window
        if refreshed != self._refreshed:
            self._cache.clear()
            self._refreshed = refreshed
        key = id(window)
        if key not in self._cache:
            self._cache[key] = self._compute(window.samples(refreshed - p.window, p.slowdown.baseline))
        return self._cache[key]

    def _compute(self, samples: list[Sample]) -> Baseline | None:
        p = self.policy
        slices: dict[int, list[Sample]] = {}
        for s in samples:
            slices.setdefault(math.floor(s.at / p.window), []).append(s)
        slows, medians, count = [], [], 0
        for part in slices.values():
            stats = WindowStats.pooled(part)
            if stats.latencies:
                slows.append(stats.latency_quantile(p.slowdown.quantile) or 0.0)
                medians.append(statistics.median(stats.latencies))
                count += len(stats.latencies)
        if count < p.slowdown.min_baseline_samples:
            return None
        # median_low: always one slice's own value, never a blend of an old and a new normal.
        return Baseline(statistics.median_low(slows), statistics.median_low(medians))

    def relative(self, windows: Mapping[str, Window], since: float, now: float) -> tuple[list[float], int]:
        """Successful latencies since `since`, each divided by its vantage's baseline median, and
        how many of them were slower than usual."""
        out: list[float] = []
        slow = 0
        for w in windows.values():
            base = self.of(w, now)
            if base is not None:
                latencies = [s.latency for s in _since(w.samples(now, self.policy.window), since) if s.ok]
                out.extend(latency / base.median for latency in latencies)
                slow += sum(latency > base.slow for latency in latencies)
        return out, slow


def _reason_vantages(run: Run) -> str:
    return ", ".join(f"{v} {bad}/{n}" for v, (n, bad) in sorted(run.by_vantage.items()))


def _run_evidence(run: Run, now: float) -> dict[str, Any]:
    return {
        "llr": round(run.statistic, 3),
        "threshold": round(run.threshold, 3),
        "since": round(now - run.since, 3) if run.since is not None else None,
        "events": run.events,
        "bad": run.bad,
    }


class _SequentialDetector:
    """What the sequential detectors share: one pass over the region's probes, and how a
    tripped test becomes a finding (a quorum of vantages, then the peers)."""

    name: str
    policy: VerdictPolicy

    def assess(self, view: RegionView, now: float) -> Assessment:
        states: dict[str, str] = {}
        reasons: list[str] = []
        evidence: dict[str, Any] = {}
        for probe in view.probes:
            evidence[probe] = {}
            states[probe], reason = self._probe(view, probe, now, evidence[probe])
            if reason:
                reasons.append(reason)
        troubles = frozenset(p for p, state in states.items() if state in TROUBLE_STATES or evidence[p].get("leaning"))
        return Assessment(region_status(states), tuple(reasons), evidence, troubles)

    def _probe(self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]) -> tuple[str, str | None]:
        raise NotImplementedError

    def _beyond_quorum(self, run: Run, vantages: int) -> bool:
        """Whether the run still shows beyond the quorum - 1 vantages that see most of it: what
        a probe needs to show trouble, so that one vantage's bad path marks no region."""
        return run.beyond(quorum(self.policy, vantages) - 1)[1] < self.policy.vantages.agree_level

    def _finding(
        self,
        view: RegionView,
        what: str,
        run: Run,
        vantages: int,
        peers: Callable[[], PeerCheck],
        state: str,
        evidence: dict[str, Any],
    ) -> tuple[str, str]:
        needed = quorum(self.policy, vantages)
        left_out, tail = run.beyond(needed - 1)
        evidence["quorum"] = {"needed": needed, "left_out": list(left_out), "p_rest": round(tail, 6)}
        if tail >= self.policy.vantages.agree_level:
            return "ok", f"{what}: not seen beyond {', '.join(left_out)} (quorum {needed}), not held"
        check = peers()
        evidence["peers"] = check.evidence()
        if not check.regional:
            return ("shared" if check.shared else "ok"), f"{what}, {check.text()}, not held against {view.region}"
        return state, f"{what}, {check.text()}"


class ErrorDetector(_SequentialDetector):
    """Sequential tests (CUSUM) of each probe's failures, every fresh vantage pooled, against
    the policy's acceptable and unacceptable error ratios, each over its own horizon. A probe
    fails when one test's evidence crosses its threshold, a quorum of vantages agree, and the
    region is worse than its peers. The tests run in the policy's order; the first that holds
    decides, so a big fault is named by the fast test and a small one by the patient test."""

    name = "errors"

    def __init__(self, policy: VerdictPolicy) -> None:
        self.policy = policy
        self.tests = [(test, Llr.of(test), policy.horizon(test)) for test in policy.errors]

    def _probe(self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]) -> tuple[str, str | None]:
        p = self.policy
        windows = fresh(view.windows_of(probe), now, p.stale_after)
        if not windows:
            return "unknown", None
        outcome: tuple[str, str | None] = ("ok", None)
        best = 0.0
        for test, llr, horizon in self.tests:
            bad = sum(w.failures(now, horizon) for w in windows.values())
            floor = LEANING if test is self.tests[0][0] else 1.0  # the quick test says what leans
            if bad * llr.bad < floor * llr.threshold:  # even every failure in a row could not matter
                continue
            events = failures({v: w.samples(now, horizon) for v, w in windows.items()})
            run = cusum(events, llr)
            if run.statistic / run.threshold >= floor and self._beyond_quorum(run, len(windows)):
                evidence["leaning"] = True
            if run.statistic / run.threshold > best:
                best = run.statistic / run.threshold
                evidence.update(_run_evidence(run, now), acceptable=test.acceptable, unacceptable=test.unacceptable)
            if not run.tripped or run.since is None:
                continue
            # A fault that has stopped is not held: a long run's evidence would otherwise take
            # as long to fade as it took to build. The last verdict window must still lean bad.
            recent = [e[2] for e in events if e[0] > now - p.window]
            if horizon > p.window and llr.of_counts(len(recent), sum(recent)) <= 0:
                what = f"{probe}: {run.bad} failures over {now - run.since:.0f}s, the last {p.window:g}s lean healthy"
                outcome = ("ok", f"{what}: over")
                continue
            since = run.since
            what = (
                f"{probe}: {run.bad} of {run.events} probes failed in the last {now - since:.0f}s "
                f"({run.ratio:.1%}; acceptable {test.acceptable:.1%}) from {_reason_vantages(run)}"
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
        return outcome


class SlowdownDetector(_SequentialDetector):
    """Sequential test of each probe's latency against its own baseline: a successful result
    slower than the baseline's quantile is a 'slow' outcome, expected at 1 - quantile when
    nothing changed. A probe is slow when the test trips, a quorum of vantages agree, its
    median is `min_effect` above its baseline, and a rank test (Mann-Whitney U, one-sided) finds
    it slower than its peers by that effect too, each relative to its own baseline."""

    name = "slowdown"

    def __init__(self, policy: VerdictPolicy) -> None:
        self.policy = policy
        self.llr = Llr.of(policy.slowdown)
        self.baselines = Baselines(policy)

    def _probe(self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]) -> tuple[str, str | None]:
        p = self.policy
        windows = fresh(view.windows_of(probe), now, p.stale_after)
        base = {v: b for v, w in windows.items() if (b := self.baselines.of(w, now)) is not None}
        evidence["baseline"] = {v: {"slow": round(b.slow, 4), "median": round(b.median, 4)} for v, b in base.items()}
        if not base:
            return "ok", None
        run = cusum(
            slower({v: windows[v].samples(now, p.window) for v in base}, {v: b.slow for v, b in base.items()}),
            self.llr,
        )
        evidence.update(_run_evidence(run, now))
        leaning = run.statistic / run.threshold >= LEANING and self._beyond_quorum(run, len(base))
        if not (run.tripped or leaning) or run.since is None:
            return "ok", None
        since = run.since
        mine, _ = self.baselines.relative({v: windows[v] for v in base}, since, now)
        effect = statistics.median(mine) if mine else 1.0
        evidence["relative_median"] = round(effect, 3)
        if effect < 1 + p.slowdown.min_effect:  # slower than usual, but not by enough to count
            return "ok", None
        evidence["leaning"] = True
        if not run.tripped:
            return "ok", None
        what = (
            f"{probe}: {run.bad} of {run.events} results slower than usual in the last "
            f"{now - since:.0f}s, median {effect:.2f}x its baseline, from {_reason_vantages(run)}"
        )
        return self._finding(
            view, what, run, len(base), lambda: self._vs_peers(view, probe, mine, since, now), "slow", evidence
        )

    def _vs_peers(self, view: RegionView, probe: str, mine: list[float], since: float, now: float) -> PeerCheck:
        p = self.policy

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
            theirs, slow = self.baselines.relative(fresh(peer.windows_of(probe), now, p.stale_after), since, now)
            compared.append(name)
            pooled.extend(theirs)
            if len(theirs) < MIN_PEER_SAMPLES or len(mine) < MIN_PEER_SAMPLES:
                continue
            if self.llr.of_counts(len(theirs), slow) > 0:  # the peer is slower than usual too
                alike.append(name)
            is_worse, p_value, their_median = worse(theirs)
            detail[name] = {"relative_median": round(their_median, 3), "p_value": round(p_value, 6)}
            if is_worse:
                worse_than.append(name)
        apart = _pooled(min(len(pooled), len(mine)), lambda: worse(pooled)[0])
        return PeerCheck(tuple(compared), tuple(worse_than), tuple(alike), detail, apart)


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

    def assess(self, view: RegionView, now: float) -> Assessment:
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
            state, reason, evidence[probe] = self._probe(view, probe, now)
            states[probe] = state
            if reason:
                reasons.append(f"{probe}: {reason}")
        troubles = frozenset(p for p, state in states.items() if state in TROUBLE_STATES)
        # Every probe down, at least one of them held against this region: the region is down,
        # even where a peer happens to fail one of the same probes (that probe alone would be
        # a shared cause, not the region as a whole).
        down = all(e.get("consecutive_failures") for e in evidence.values())
        if down and "failing" in states.values():
            states = dict.fromkeys(states, "failing")
        return Assessment(region_status(states), tuple(reasons), evidence, troubles)

    def _probe(self, view: RegionView, probe: str, now: float) -> tuple[str, str | None, dict[str, Any]]:
        state, reason, evidence = self._limits(view.windows_of(probe), now)
        if state not in BAD_STATES:
            return state, reason, evidence
        p = self.policy
        windows = fresh(view.windows_of(probe), now, p.stale_after)
        if evidence.get("consecutive_failures"):
            # Every fresh vantage saw the run (a quorum by construction); the peers must be
            # answering where this region fails, or it is a shared cause, not this region. A
            # probe whose results all fail is never healthy, though: not held, it is unknown.
            # The peers are looked at over twice the span of the last `down_after` failures: a
            # fault every region shares fails each at random, and a peer that happened to
            # answer a few times in a row would otherwise vouch for a shared fault's first seconds.
            start = _run_start(windows.values(), now, p.window, p.down_after)
            down = self._down_peers(view, probe, start - (now - start), now)
            evidence["peers"] = down.evidence()
            if not down.set_apart:
                return ("shared-down" if down.shared else "unknown"), f"{reason}, {down.text()}, not held", evidence
            return state, f"{reason}, {down.text()}", evidence
        # A ratio or latency finding must hold at a quorum of vantages and set the region apart.
        agreeing = sorted(v for v, w in windows.items() if self._limits({v: w}, now)[0] == state)
        needed = quorum(p, len(windows))
        if len(agreeing) < needed:
            return "ok", f"{reason}: only {len(agreeing)} of {needed} vantages needed agree, not held", evidence
        if state == "slow":
            peers = self._slow_peers(view, probe, now)
        else:
            peers = errors_vs_peers(view, probe, now - p.window, now, p, self.llr, p.window)
        evidence["peers"] = peers.evidence()
        if not peers.set_apart:  # a raw limit has no test of its own: the peers supply it
            return (
                ("shared" if peers.shared else "ok"),
                f"{reason}, {peers.text()}, not held against {view.region}",
                evidence,
            )
        return state, reason, evidence

    def _down_peers(self, view: RegionView, probe: str, since: float, now: float) -> PeerCheck:
        """Peers since `since` (the caller's span slides as an outage goes on, so one stray
        failure of a peer holds nothing for long). A peer is alike when it failed in that span
        too, or when its failures over the verdict window are more than a healthy target's noise
        (binomial tail at the acceptable ratio under `peers.significance`); either after leaving
        out its quorum - 1 vantages that fail most, as a vantage's own bad path is not the
        peer's trouble. A peer with no result in
        the span cannot vouch and is not compared; when peers run the probe but none can vouch
        yet, nothing is held (`apart` False) until they report."""
        p = self.policy
        compared: list[str] = []
        clean: list[str] = []
        alike: list[str] = []
        detail: dict[str, Any] = {}
        running = 0
        for name, peer in sorted(view.peers.items()):
            if probe not in peer.probes:
                continue
            running += 1
            windows = fresh(peer.windows_of(probe), now, p.stale_after)
            samples = {v: w.samples(now, p.window) for v, w in windows.items()}
            if not any(s.at >= since for seq in samples.values() for s in seq):
                continue
            compared.append(name)
            # The quorum - 1 vantages that fail this peer most are left out, in both counts.
            ranked = sorted(samples, key=lambda v: -sum(not s.ok for s in samples[v]))
            kept = ranked[quorum(p, len(samples)) - 1 :]
            recent = [s for v in kept for s in samples[v] if s.at >= since]
            window = [s for v in kept for s in samples[v]]
            failed = sum(not s.ok for s in recent)
            bad = sum(not s.ok for s in window)
            noise = float(binom.sf(bad - 1, len(window), self.llr.acceptable)) if window else 1.0
            detail[name] = {"samples": len(recent), "failures": failed, "window_p": round(noise, 6)}
            (alike if failed or noise < p.peers.significance else clean).append(name)
        apart = False if running and not compared else None
        return PeerCheck(tuple(compared), tuple(clean), tuple(alike), detail, apart)

    def _slow_peers(self, view: RegionView, probe: str, now: float) -> PeerCheck:
        """Peers over the same fixed objective: the objective is absolute, so is the comparison."""
        compared: list[str] = []
        worse: list[str] = []
        alike: list[str] = []
        for name, peer in sorted(view.peers.items()):
            if probe not in peer.probes:
                continue
            state = self._limits(peer.windows_of(probe), now)[0]
            if state in ("ok", "slow"):
                compared.append(name)
                (alike if state == "slow" else worse).append(name)
        return PeerCheck(tuple(compared), tuple(worse), tuple(alike))

    def _limits(self, windows: Mapping[str, Window], now: float) -> tuple[str, str | None, dict[str, Any]]:
        p = self.policy
        fresh_windows = fresh(windows, now, p.stale_after)
        ages = [a for w in windows.values() if (a := w.age(now)) is not None]
        evidence: dict[str, Any] = {
            "vantages": sorted(fresh_windows),
            "last_result_age": round(min(ages), 3) if ages else None,
        }
        if not fresh_windows:
            what = f"no result in the last {p.stale_after:g}s" if ages else "no result yet"
            return "unknown", what, evidence
        stats = WindowStats.pooled(list(chain.from_iterable(w.samples(now, p.window) for w in fresh_windows.values())))
        quantile = stats.latency_quantile(p.latency.quantile)
        q_name = f"latency_p{round(p.latency.quantile * 100):d}"
        evidence.update(
            samples=stats.samples,
            failures=stats.failures,
            success_ratio=round(stats.success_ratio, 4) if stats.samples else None,
            errors=stats.errors,
        )
        evidence[q_name] = round(quantile, 4) if quantile is not None else None
        if all(w.last_failed(p.down_after, now, p.window) for w in fresh_windows.values()):
            evidence["consecutive_failures"] = True
            vantages = ", ".join(sorted(fresh_windows))
            return (
                "failing",
                f"the last {p.down_after} results from {vantages} all failed{_errors_text(stats)}",
                evidence,
            )
        if stats.samples < p.min_samples:
            return "unknown", f"only {stats.samples} of {p.min_samples} results needed to judge", evidence
        ratio = stats.success_ratio
        summary = (
            f"{ratio:.0%} of {stats.samples} probes succeeded over {p.window:g}s "
            f"from {', '.join(sorted(fresh_windows))}"
        )
        summary += _errors_text(stats)
        if ratio < p.unhealthy_below:
            return "failing", f"{summary}, below {p.unhealthy_below:.0%}", evidence
        if ratio < p.degraded_below:
            return "degraded", f"{summary}, below {p.degraded_below:.0%}", evidence
        if quantile is not None and quantile > p.latency.threshold:
            return (
                "slow",
                f"{q_name} {quantile * 1000:.0f}ms over {p.window:g}s exceeds {p.latency.threshold * 1000:.0f}ms",
                evidence,
            )
        return "ok", None, evidence


def _run_start(windows: Iterable[Window], now: float, span: float, last: int) -> float:
    """When the newest `last` failures in a row began: the oldest of them at any vantage."""
    start = now
    for window in windows:
        for count, sample in enumerate(reversed(window.samples(now, span))):
            if sample.ok or count >= last:
                break
            start = min(start, sample.at)
    return start


def _errors_text(stats: WindowStats) -> str:
    return " (" + ", ".join(f"{k} x{n}" for k, n in sorted(stats.errors.items())) + ")" if stats.errors else ""
