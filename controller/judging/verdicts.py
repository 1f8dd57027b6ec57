"""Verdicts: what regionshift believes about each region, and why.

A `Detector` is a pure function of one region's windows and the clock that returns an
`Assessment` (status, reasons, evidence). The `Judge` runs every detector on every region,
combines their assessments into one `Verdict` per region and remembers since when each
verdict holds. Statistical detectors (sequential tests, peer comparison, vantage quorum) plug
in beside `ThresholdDetector` through the same interface.

`unknown` is never treated as healthy: a region with no fresh data is `unknown`.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar

from controller.judging.vantages import Looks, set_aside_steps
from controller.judging.windows import fresh_look

T = TypeVar("T")
P = ParamSpec("P")

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence

    from controller.judging.windows import Window, WindowStore
    from controller.settings.policy import VerdictPolicy

Status = Literal["healthy", "degraded", "unhealthy", "unknown"]
STATUSES: tuple[Status, ...] = ("healthy", "degraded", "unhealthy", "unknown")
# Which assessment wins when detectors disagree: evidence of failure beats lack of evidence,
# and lack of evidence beats health.
_PRECEDENCE: dict[Status, int] = {"healthy": 0, "unknown": 1, "degraded": 2, "unhealthy": 3}


@dataclass(frozen=True, slots=True)
class RegionView:
    """What a detector sees of one region: its configured probes and their windows, the other
    regions (its peers, to tell a regional fault from a shared one) and the vantages set aside."""

    region: str
    probes: tuple[str, ...]
    windows: Mapping[tuple[str, str], Window]  # (probe, vantage) -> window
    peers: Mapping[str, RegionView] = field(default_factory=dict)  # region -> view
    set_aside: Mapping[str, str] = field(default_factory=dict)  # vantage -> why
    # The same windows by probe (probe -> vantage -> window), when the store keeps them so: a
    # detector asks for one probe's windows without walking every window of the region.
    by_probe: Mapping[str, Mapping[str, Window]] | None = None
    # When the region's verdict last came back to healthy from degraded or worse: the evidence
    # before it was judged over and has been spent, so a test looking back further (the patient
    # error test's horizon) starts there. None: no recovery since the judge started.
    cleared_at: float | None = None
    # Whether the region's verdict is degraded or unhealthy (as of the last judgement): a finding
    # the peers cannot tell apart yet (too few of their results) stays held against a region
    # already held, and makes one that is not `unknown`, never healthy (see `PeerCheck.waiting`).
    held: bool = False
    # What `fresh_of` found, by (probe, now, stale_after): every detector asks it of every probe,
    # and a peer's view is asked by every region. A judge pass makes new views, so it lasts one.
    looks: Looks = field(default_factory=dict, compare=False, repr=False)

    def fresh_of(self, probe: str, now: float, stale_after: float) -> dict[str, Window]:
        """The probe's windows (`windows_of`) with a result at most `stale_after` old at `now`
        (see `windows.fresh_look`); looked at once per view. Shared: do not change it."""
        return self._look(probe, now, stale_after)[0]

    def newest_age(self, probe: str, now: float, stale_after: float) -> float | None:
        """Seconds since the probe's newest result at `now`, at any vantage (fresh or not);
        None without one."""
        return self._look(probe, now, stale_after)[1]

    def _look(self, probe: str, now: float, stale_after: float) -> tuple[dict[str, Window], float | None]:
        key = (probe, now, stale_after)
        look = self.looks.get(key)
        if look is None:
            look = self.looks[key] = fresh_look(self.windows_of(probe), now, stale_after)
        return look

    def windows_of(self, probe: str) -> dict[str, Window]:
        """The probe's windows from every vantage not set aside."""
        if self.by_probe is not None:
            found = self.by_probe.get(probe, {})
            return {v: w for v, w in found.items() if v not in self.set_aside} if self.set_aside else dict(found)
        return {v: w for (p, v), w in self.windows.items() if p == probe and v not in self.set_aside}


@dataclass(frozen=True, slots=True)
class Assessment:
    status: Status
    reasons: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)
    # Probes that show trouble here, held against the region or not: a finding, a shared cause,
    # or recent evidence leaning bad. Share never moves onto a region that shows the trouble of
    # the one losing it (guardrail 6), whatever the verdicts say.
    troubles: frozenset[str] = frozenset()


class Detector(Protocol):
    """A pure function of one region's windows and the clock. A detector with many probes to look
    at may also offer `steps(view, now)`: the same, as a generator that yields between probes and
    returns the assessment (the judge then lets the event loop run there)."""

    name: str

    def assess(self, view: RegionView, now: float) -> Assessment: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    region: str
    status: Status
    reasons: tuple[str, ...]
    evidence: dict[str, Any]  # detector name -> its evidence
    since: float  # when the region entered this status
    at: float  # when this verdict was computed
    troubles: frozenset[str] = frozenset()  # probes showing trouble (see Assessment)
    # Since when it has been degraded or unhealthy without a break (None while it is neither): a
    # region failing about half its requests moves between the two, and each move restarts
    # `since`; an evacuation's `confirm_after` counted from `since` was never reached.
    bad_since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "status": self.status,
            "reasons": list(self.reasons),
            "evidence": self.evidence,
            "since": self.since,
            "bad_since": self.bad_since,
            "at": self.at,
            "troubles": sorted(self.troubles),
        }


def shared_trouble(
    gaining: Iterable[str], losing: Iterable[str], troubles: Mapping[str, frozenset[str]]
) -> tuple[str, str, frozenset[str]] | None:
    """(gaining region, losing region, the probes both show trouble on) for the first pair that
    would move share between regions with the same trouble; None when there is none."""
    losers = list(losing)
    for gainer in gaining:
        for loser in losers:
            common = troubles.get(gainer, frozenset()) & troubles.get(loser, frozenset())
            if common:
                return gainer, loser, common
    return None


BAD: frozenset[Status] = frozenset({"degraded", "unhealthy"})


def combine(assessments: Iterable[Assessment]) -> Status:
    statuses = [a.status for a in assessments]
    return max(statuses, key=_PRECEDENCE.__getitem__) if statuses else "unknown"


def _holding_first(assessments: Iterable[Assessment]) -> tuple[str, ...]:
    """Every assessment's reasons, those that make the verdict first: the worst assessment's
    before the others', and a finding held before one that says it is not ("..., not held").
    The page and `status` show the first reason: it was "not held against eu-west-1" beside a
    region held degraded by the next detector's finding."""
    ranked = sorted(assessments, key=lambda a: -_PRECEDENCE[a.status])
    reasons = [r for a in ranked for r in a.reasons]
    return tuple(sorted(reasons, key=lambda r: "not held" in r))


@dataclass(frozen=True, slots=True)
class Transition:
    region: str
    previous: Status | None
    verdict: Verdict


class Judge:
    """Runs the detectors on every region, keeps each verdict's `since`, and holds a region
    that was failing until it has looked healthy for `recover_after` (hysteresis: one good
    minute in a flapping region does not flap its verdict). Getting worse is never delayed."""

    def __init__(
        self,
        detectors: Sequence[Detector],
        probes: Mapping[str, tuple[str, ...]],
        policy: VerdictPolicy | None = None,
        vantages: Iterable[str] | None = None,
    ) -> None:
        self.detectors = list(detectors)
        # Detectors whose findings need no quorum (`one_vantage`: replication lag, the data's, the
        # same read from anywhere, which the controller alone measures).
        self._one_vantage = frozenset(d.name for d in self.detectors if getattr(d, "one_vantage", False))
        self.probes = dict(probes)  # region -> configured probe names
        self.policy = policy
        # Every vantage that should report (the controller's and the configured agents'); None:
        # whichever report (see `_short_of_quorum`).
        self.vantages = frozenset(vantages) if vantages is not None else None
        self.verdicts: dict[str, Verdict] = {}
        self.set_aside: dict[str, str] = {}  # vantage -> why, as of the last judgement
        self._failing_at: dict[str, float] = {}  # region -> when it last looked degraded or worse
        self._cleared_at: dict[str, float] = {}  # region -> when its verdict last recovered (see RegionView)

    def judge(self, windows: WindowStore, now: float) -> list[Transition]:
        """Judge every region as of `now`; return the regions whose status changed."""
        return finish(self.steps(windows, now))

    def steps(self, windows: WindowStore, now: float) -> Generator[None, None, list[Transition]]:
        """`judge`, one region at a time: it yields between regions and between one region's
        detectors (the daemon lets its event loop run there, `finish_async`, so judging many
        regions never stalls probes in flight) and returns the transitions."""
        looks: dict[str, Looks] = {}  # what the vantage check found of each probe's windows
        if self.policy is not None:
            self.set_aside = yield from set_aside_steps(windows, self.probes, self.policy, now, looks)
        views = {
            region: RegionView(
                region,
                probes,
                windows.region(region),
                set_aside=self.set_aside,
                by_probe=windows.by_probe(region),
                # Found at every vantage: with one set aside, each view looks again without it.
                looks={} if self.set_aside else looks.get(region, {}),
            )
            for region, probes in self.probes.items()
        }
        transitions = []
        judged: dict[str, Verdict] = {}  # shown all at once: a reader never sees half a judgement
        for region, probes in self.probes.items():
            yield
            peers = {r: v for r, v in views.items() if r != region}
            view = RegionView(
                region,
                probes,
                views[region].windows,
                peers,
                self.set_aside,
                views[region].by_probe,
                self._cleared_at.get(region),
                self._held(region),
                views[region].looks,  # what its peers found of it this pass
            )
            assessments = {}
            for detector in self.detectors:
                yield
                by_probe = getattr(detector, "steps", None)
                assessments[detector.name] = (
                    (yield from by_probe(view, now)) if by_probe is not None else detector.assess(view, now)
                )
            held = {n: a for n, a in assessments.items() if n not in self._one_vantage and a.status in BAD}
            short = self._short_of_quorum(view, held.values(), now) if held else None  # looked at only then
            if short is not None:
                assessments |= {n: replace(a, status="unknown") for n, a in held.items()}
            status = combine(assessments.values())
            reasons = _holding_first(assessments.values())
            if short is not None:  # first when it is what makes the region unknown (not when lag holds it)
                reasons = (short, *reasons) if status == "unknown" else (*reasons, short)
            status, reasons = self._hysteresis(region, status, reasons, now)
            previous = self.verdicts.get(region)
            since = previous.since if previous is not None and previous.status == status else now
            evidence: dict[str, Any] = {n: a.evidence for n, a in assessments.items()}
            if self.set_aside:
                evidence["set_aside"] = dict(self.set_aside)
            troubles = frozenset().union(*(a.troubles for a in assessments.values()))
            bad_since = None
            if status in BAD:
                was_bad = previous is not None and previous.status in BAD
                bad_since = (previous.bad_since or previous.since) if was_bad and previous is not None else now
            verdict = Verdict(region, status, reasons, evidence, since, now, troubles, bad_since)
            judged[region] = verdict
            if previous is None or previous.status != status:
                transitions.append(Transition(region, previous.status if previous else None, verdict))
            if status == "healthy":  # back from degraded or worse (through unknown, too): a recovery
                failing_at = self._failing_at.get(region)
                if failing_at is not None and failing_at > self._cleared_at.get(region, -math.inf):
                    self._cleared_at[region] = now
        # The verdicts they replace are let go of a few regions at a time: freeing a pass's
        # evidence at once (at 10,000 series, tens of thousands of dicts and numbers) was the
        # longest step of a pass, 2 to 8 ms with the event loop waiting.
        replaced = [self.verdicts.get(region) for region in judged]
        self.verdicts.update(judged)
        while replaced:
            del replaced[-RELEASE_REGIONS:]
            yield
        yield from windows.forget_looks_steps()
        return transitions

    def _short_of_quorum(self, view: RegionView, held: Iterable[Assessment], now: float) -> str | None:
        """Why the findings (`held`) cannot hold the region, when at each probe they show trouble
        on fewer vantages report than the quorum needs of those that should (`vantages`, but the
        set-aside); None when one such probe has enough. Each detector's quorum counts the
        vantages with fresh results, and with the broker down or every agent stopped that was
        the controller alone: its own bad path to a region evacuated the region, the one thing
        the agents are there to prevent."""
        if self.vantages is None or self.policy is None:
            return None
        expected = self.vantages - self.set_aside.keys()
        needed = max(1, min(self.policy.vantages.quorum, len(expected)))
        stale_after = self.policy.stale_after
        probes = sorted(frozenset().union(*(a.troubles for a in held)) & set(view.probes)) or view.probes
        reporting: set[str] = set()
        for probe in probes:
            fresh = view.fresh_of(probe, now, stale_after)
            if len(fresh) >= needed:
                return None
            reporting.update(fresh)
        missing = ", ".join(sorted(expected - reporting))
        seen = f"only {', '.join(sorted(reporting))} reports" if reporting else "no vantage reports"
        return (
            f"{seen} ({missing}: no result in the last {stale_after:g}s), {needed} vantages needed "
            "to hold a finding: not held, and not healthy either"
        )

    def _held(self, region: str) -> bool:
        previous = self.verdicts.get(region)
        return previous is not None and previous.status in BAD

    def _hysteresis(
        self, region: str, status: Status, reasons: tuple[str, ...], now: float
    ) -> tuple[Status, tuple[str, ...]]:
        if status in BAD:
            self._failing_at[region] = now
            return status, reasons
        failing_at = self._failing_at.get(region)
        hold = self.policy.recover_after if self.policy is not None else 0.0
        if status == "healthy" and failing_at is not None and now - failing_at < hold:
            healthy_for = now - failing_at
            # First: it is what holds the region now (the page and `status` show the first reason).
            return "degraded", (f"recovering: healthy for {healthy_for:.0f}s of the {hold:g}s required", *reasons)
        return status, reasons


@contextmanager
def collections_held() -> Iterator[None]:
    """No automatic garbage collection while a judgement runs (and the loop runs between its
    steps); as it was again after. A collection walks every live container made since the last
    freeze (`WindowStore.trim`), and a judgement holds millions of references in the lists it
    looks at (the windows' `samples`): at 10,000 series, collections that fell inside a tick
    stopped the event loop 50 to 230 ms each, over a third of the tick. Held to its end, the
    next collection comes when those lists are gone (`WindowStore.forget_looks`) and walks little.
    Nothing is lost: only cycles wait, for one judgement, to be collected."""
    if not gc.isenabled():  # held already (a judgement within one), or the caller's choice
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def at_once(steps: Callable[P, Generator[None, None, T]]) -> Callable[P, T]:
    """A function that runs `steps` to its end (`finish`) and returns what it returns."""

    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return finish(steps(*args, **kwargs))

    return run


def finish(steps: Generator[None, None, T]) -> T:
    """Run a generator of steps (`Judge.steps`) to its end and return what it returns (with
    collections held, see `collections_held`)."""
    with collections_held():
        while (done := _advance(steps)) is None:
            pass
    return done[0]


# Regions whose previous verdicts are let go of between two yields (see `Judge.steps`).
RELEASE_REGIONS = 2

# Judging between two looks at the event loop, at most (a step at a time: one probe of one
# region for one detector, a few hundred windows trimmed). A step's own length is not cut.
# A probe in flight waits this long at each of its turns on the loop (an HTTP probe takes several:
# connect, send, headers, body), and its latency counts the wait: at 10,000 series judged, a
# probe of a 50 ms target measured p50 +14 ms, p99 +30 ms at 2 ms, and +4 / +13 ms at 0.5 ms,
# with passes no longer (`bench/judge_scale.py --sizes "" --probe-sizes 10000 --probes 100`).
STEP_BUDGET = 0.0005


async def finish_async(steps: Generator[None, None, T], budget: float = STEP_BUDGET) -> T:
    """`finish`, letting the event loop run between steps once `budget` seconds of them ran
    (at every step, a look at the loop would cost more than most steps)."""
    holding = gc.isenabled()  # this call holds collections (not one around it)
    with collections_held():
        last = time.perf_counter()
        while (done := _advance(steps)) is None:
            if time.perf_counter() - last >= budget:
                await asyncio.sleep(0)
                last = time.perf_counter()
    if holding:
        # The collection held meanwhile, in a step of its own: due at the next allocation, it
        # came inside whatever ran next, and the loop waited for both.
        await asyncio.sleep(0)
        gc.collect(0)
        await asyncio.sleep(0)
    return done[0]


def _advance(steps: Generator[None, None, T]) -> tuple[T] | None:
    """One step; at the end, what the steps returned (in a tuple: it may be None)."""
    try:
        next(steps)
    except StopIteration as done:
        return (done.value,)
    return None
