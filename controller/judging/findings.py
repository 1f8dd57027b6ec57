"""How a probe's state becomes a finding, and a region's status: which states show trouble, the
quorum, and what the sequential detectors share (a tripped test held at a quorum of vantages,
then against the peers). Which vantages are fresh: `windows.fresh_look`.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from controller.judging.verdicts import Assessment, RegionView, Status, finish
from controller.judging.windows import AT, OK, SCHEDULED

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Mapping

    from controller.judging.peers import PeerCheck
    from controller.judging.sequential import Run
    from controller.judging.windows import Sample, Window, WindowStats
    from controller.settings.policy import VerdictPolicy


BAD_STATES = frozenset({"failing", "degraded", "slow"})


# A probe in one of these states shows trouble, held against its region or not ("shared-down":
# its last results all failed, and so did its peers': not held, and not healthy either).
TROUBLE_STATES = BAD_STATES | {"shared", "shared-down"}


# A sequential test this far toward its threshold leans bad: the probe shows trouble even while
# nothing is held against it. For errors that is two close failures (one is noise); for latency,
# slow outcomes that also clear the effect size.
LEANING = 0.5


# A probe a detector found nothing at is looked at in full again at least this often (seconds).
# In between, while nothing has come that could change what it found (`still_quiet`), the
# detector answers what it found then: at 10,000 series most probes are quiet most passes, and a
# full look at each, every pass, was most of the judge's time. Its evidence says how many seconds
# old its figures are (`counted_ago`).
QUIET_FOR = 30.0


def quiet_until(now: float, region: str, probe: str, detector: str) -> float:
    """When a probe a detector found quiet at `now` is looked at in full again at the latest:
    `QUIET_FOR` on, less up to half of it by the probe, the detector and the time (the same in
    every run): probes first seen together, as at a start, come due in different passes, and
    the more so each time (a share fixed by the probe alone kept those found in one pass due
    together in every pass after), and one probe's detectors not all in the same pass."""
    spread = zlib.crc32(f"{region}\0{probe}\0{detector}\0{now!r}".encode()) % 1024 / 2048
    return now + QUIET_FOR * (1 - spread)


# What a detector found nothing at: when it looked, until when that holds at most, the probe's
# fresh vantages then, a count its windows keep that grows with whatever could change it
# (failures added, say: see `Window.failed_added`) as it was then, and the evidence's items
# (`quiet`). Tuples: the garbage collector stops tracking a tuple that holds only numbers,
# strings and such tuples, where it walks an instance of a class, or a dict, at every full
# collection (4,000 of them at 10,000 series).
Quiet = tuple[float, float, tuple[str, ...], int, tuple[tuple[str, Any], ...]]


def quiet(now: float, until: float, fresh: Mapping[str, Window], count: int, evidence: dict[str, Any]) -> Quiet:
    """What a detector found nothing at, at `now` (see `Quiet`)."""
    return (now, until, tuple(fresh), count, tuple(evidence.items()))


def still_quiet(quiet: Quiet, fresh: Mapping[str, Window], now: float, count: int) -> bool:
    """Whether what a detector found (`quiet`) still holds at `now`: the same fresh vantages,
    nothing counted since, the clock between when it looked and `until`."""
    return quiet[3] == count and quiet[0] <= now < quiet[1] and tuple(fresh) == quiet[2]


def quiet_evidence(quiet: Quiet, now: float) -> dict[str, Any]:
    """The evidence found then, and how old its figures are at `now`."""
    found = dict(quiet[4])
    found["counted_ago"] = round(now - quiet[0], 3)
    return found


# One tuple per distinct set of names shown in evidence (vantages), kept: the collector untracks a
# tuple of strings the first time it sees it, and a dict holding only it and numbers is then never
# tracked either. A new sorted list each pass was two containers per probe that the collection
# after the pass walked (4,000 at 10,000 series). Bounded: cleared when it grows past this.
_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}
NAMES_KEPT = 4096


def names(found: Iterable[str]) -> tuple[str, ...]:
    """`found` sorted, as one shared tuple per distinct set."""
    key = tuple(sorted(found))
    shared = _NAMES.get(key)
    if shared is None:
        if len(_NAMES) >= NAMES_KEPT:
            _NAMES.clear()
        shared = _NAMES[key] = key
    return shared


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


def samples_since(samples: Iterable[Sample], since: float) -> list[Sample]:
    return [s for s in samples if s[AT] >= since]


def vantages_text(run: Run) -> str:
    return ", ".join(f"{v} {bad}/{n}" for v, (n, bad) in sorted(run.by_vantage.items()))


def run_evidence(run: Run, now: float) -> dict[str, Any]:
    return {
        "llr": round(run.statistic, 3),
        "threshold": round(run.threshold, 3),
        "since": round(now - run.since, 3) if run.since is not None else None,
        "events": run.events,
        "bad": run.bad,
    }


class SequentialDetector:
    """What the sequential detectors share: one pass over the region's probes, and how a
    tripped test becomes a finding (a quorum of vantages, then the peers)."""

    name: str
    policy: VerdictPolicy

    def assess(self, view: RegionView, now: float) -> Assessment:
        return finish(self.steps(view, now))

    def steps(self, view: RegionView, now: float) -> Generator[None, None, Assessment]:
        """`assess`, yielding between probes (see `Detector`)."""
        states: dict[str, str] = {}
        reasons: list[str] = []
        evidence: dict[str, Any] = {}
        for probe in view.probes:
            yield
            evidence[probe] = {}
            states[probe], reason = yield from self._probe_steps(view, probe, now, evidence[probe])
            if reason:
                reasons.append(reason)
        troubles = frozenset(p for p, state in states.items() if state in TROUBLE_STATES or evidence[p].get("leaning"))
        return Assessment(region_status(states), tuple(reasons), evidence, troubles)

    def _probe(self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]) -> tuple[str, str | None]:
        raise NotImplementedError

    def _probe_steps(
        self, view: RegionView, probe: str, now: float, evidence: dict[str, Any]
    ) -> Generator[None, None, tuple[str, str | None]]:
        """`_probe` in steps: a detector whose look at one probe has parts that each take long
        yields between them (the event loop runs there, see `Detector`)."""
        yield from ()
        return self._probe(view, probe, now, evidence)

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
        if not check.regional:  # a tripped test the peers do not explain is never healthy
            found = unconfirmed(view, check, state, never_healthy=True)
            return found, f"{what}, {check.text()}{held_text(view, found, state)}"
        return state, f"{what}, {check.text()}"


def unconfirmed(view: RegionView, peers: PeerCheck, state: str, never_healthy: bool) -> str:  # noqa: FBT001
    """A probe's state when its finding (`state`) does not set the region apart from its peers:
    `shared` when they show the same trouble. While they have too few results to tell (a suspect
    probed ten times a second has more in a second than its peers in ten), the finding stays
    held against a region already held, and makes one that is not `unknown`: a region whose
    every result fails was judged healthy in a daemon's first second, and a ramp could have
    given it share then. Past that, a region already held is `ok` here (the judge holds it
    recovering until it looks healthy for `recover_after`), and one that is not is `unknown`
    when `never_healthy` (a tripped test, a probe below `unhealthy_below`), else `ok`: a milder
    breach the peers' results explain away."""
    if peers.shared:
        return "shared"
    if peers.waiting:
        return state if view.held else "unknown"
    return "unknown" if never_healthy and not view.held else "ok"


def held_text(view: RegionView, found: str, state: str) -> str:
    """What a finding's reason adds to say whether `unconfirmed` held it."""
    if found != state:
        return f", not held against {view.region}"
    return ", still held: too few peer results to tell it apart yet"


def run_start(windows: Iterable[Window], now: float, span: float, last: int) -> float:
    """When the newest `last` scheduled failures in a row began (see `Window.last_failed`): the
    oldest of them at any vantage."""
    start = now
    for window in windows:
        count = 0
        for sample in reversed(window.samples(now, span)):
            if sample[OK] or count >= last:
                break
            start = min(start, sample[AT])
            count += sample[SCHEDULED]
    return start


def errors_text(stats: WindowStats, run: int | None = None, span: float | None = None) -> str:
    """' (status x3)': the errors by class over the window. Beside a run of the last `run`
    results, errors beyond it say they are the window's ('status x52 in 60s'), not the run's."""
    beyond = span if run is not None and stats.failures > run else None
    return classes_text(stats.errors, beyond)


def classes_text(errors: Mapping[str, int], span: float | None = None) -> str:
    if not errors:
        return ""
    said = ", ".join(f"{k} x{n}" for k, n in sorted(errors.items()))
    return f" ({said} in {span:g}s)" if span else f" ({said})"
