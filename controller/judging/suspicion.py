"""Suspects: the targets whose evidence leans toward a finding that no verdict has decided yet.

A rare failure needs samples to show: at a fixed rate, a 15% fault takes half a minute to build
evidence at one probe a second. Probing a suspect harder spends samples where the evidence is.
This module only says which targets are suspects and why (pure, like every detector); the
scheduler of each vantage runs the extra probes.

Suspicion is graded, because what it costs is paid on every healthy target's noise too:

- a failure at a vantage makes that (region, probe, vantage) a suspect for as long as the
  evidence leans on it: the most patient error test's CUSUM over the last `after_failure`, at that
  vantage alone, stays above what `clear_after` passes leave of one lone failure. The suspicion
  says how many more runs would clear it (`Suspicion.runs`), so a 0.1% noise failure costs
  `clear_after` extra probes there however fast they run (the runs started after the newest
  result counted are taken off: see `Suspicion`), and each further failure keeps it a
  suspect for longer (a second one adds ~115 passes with the shipped tests);
- once it leans bad (its statistic above what two failures with `lean_within` passes leave:
  failures coming close together) the same probe at the region's other vantages (the quorum needs them) and in
  the peer regions, at every vantage, are suspects too, since the suspect is judged against its
  peers over the same seconds and only samples taken at the same time tell a regional fault from
  a shared one;
- a latency test leaning slow (the slowdown test at `slow_fraction` of its threshold, its run
  slower than usual by the effect size) makes the probe a suspect at every vantage, and its peers
  too once the test leans beyond the quorum (not only at the vantages that see most of it: one
  vantage's slow path, or a burst of healthy noise there, does not have every region probed);
- a success `far_slower` times its baseline's median earns `far_slower_runs` extra runs at its
  vantage: a spike costs that much, a slowdown that big is sampled at once at any interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controller.judging.sequential import Llr
from controller.judging.verdicts import at_once
from controller.judging.windows import AT

if TYPE_CHECKING:
    from collections.abc import Collection, Generator, Mapping, Sequence

    from controller.judging.verdicts import Verdict
    from controller.judging.windows import Window, WindowStore
    from controller.settings.policy import SuspicionPolicy, VerdictPolicy
    from probes.results import Result

# Windows looked at between two yields of `suspect_steps`.
WINDOWS_A_STEP = 100

# A region in one of these holds its troubled probes: decided, no extra samples needed.
_DECIDED = frozenset({"degraded", "unhealthy"})

Target = tuple[str, str, str]  # region, probe, vantage


@dataclass(frozen=True, slots=True)
class Suspicion:
    """Why a target is a suspect, and how many more runs would settle it: the passes that clear
    a lone failure's evidence; None while it leans bad or is a peer or a vantage of one that
    does (as long as it is renewed). The count is of the results seen, the newest of which
    started at `seen`: the scheduler takes off what it started since (in flight, or on the way
    from an agent), so a suspicion costs its count and no more."""

    why: str
    runs: int | None = None
    seen: float | None = None  # when the newest result counted started (its prober's clock)


def suspect_steps(
    windows: WindowStore,
    probes: Mapping[str, Sequence[str]],
    verdicts: Mapping[str, Verdict],
    now: float,
    verdict_policy: VerdictPolicy,
    set_aside: Collection[str] = (),
) -> Generator[None, None, dict[Target, Suspicion]]:
    """(region, probe, vantage) -> why and how many runs, for each target the evidence leans on
    that the region's verdict does not already hold (see the module's docstring for the grades).
    Vantages set aside (their own trouble, see judging.vantages) raise no suspicion and get none.
    A generator that yields between regions (it looks at every window: 30 ms at 10,000 series)
    and returns them; `suspects` at once."""
    policy = verdict_policy.suspicion
    if not policy.enabled:
        return {}
    llr = Llr.of(min(verdict_policy.errors, key=lambda t: t.unacceptable))  # the most patient
    clear = llr.bad + policy.clear_after * llr.good  # what clear_after passes leave of one failure
    lean = 2 * llr.bad + policy.lean_within * llr.good  # two failures with lean_within passes
    found: dict[Target, Suspicion] = {}
    leaning: list[Target] = []
    for region, names in probes.items():
        yield
        verdict = verdicts.get(region)
        held = _held(verdict)
        # The windows with a failure that recent, looked at WINDOWS_A_STEP at a time (a list:
        # new windows may come while the loop runs between).
        lately = windows.failed_lately(region, now, policy.after_failure)
        for i, ((probe, vantage), window) in enumerate(lately):
            if i and not i % WINDOWS_A_STEP:
                yield
            last = window.last_failure()  # within after_failure (failed_lately), or ahead of the clock
            if vantage in set_aside or probe in held or probe not in names or last is None or last > now:
                continue
            statistic = window.failure_cusum(now, policy.after_failure, llr.good, llr.bad)
            if statistic <= clear:
                continue  # the evidence decided healthy: one failure among many passes is noise
            why = f"failed {now - last:.1f}s ago at {vantage} (evidence {statistic:.1f})"
            if statistic > lean:
                found[region, probe, vantage] = Suspicion(why)
                leaning.append((region, probe, vantage))
            else:  # not (or no longer) leaning: the passes that would clear it, each taking -llr.good away
                runs = math.ceil((statistic - clear) / -llr.good - 1e-9)
                found[region, probe, vantage] = Suspicion(why, runs, _newest(window))
        if verdict is not None:
            for (probe, vantage), far in _far_slower(windows, region, verdict.evidence, now, policy).items():
                if probe in names and probe not in held and vantage not in set_aside:
                    _count(found, (region, probe, vantage), far)
            for probe, (vantages, beyond) in _slow(verdict.evidence, policy.slow_fraction).items():
                if probe in names and probe not in held:
                    for vantage in (v for v in vantages if v not in set_aside):
                        _add(found, (region, probe, vantage), "latency leaning slow")
                        if beyond:  # the peers only once more than the quorum - 1 vantages see it
                            leaning.append((region, probe, vantage))
    for region, probe, vantage in leaning:
        yield
        for other in _vantages(windows, region, probe, set_aside):
            if other != vantage:
                _add(found, (region, probe, other), f"leaning bad at {vantage}: the quorum needs {other} too")
        for peer, names in probes.items():
            if peer != region and probe in names:
                others = _vantages(windows, peer, probe, set_aside)
                for other in others if vantage in others else [*others, vantage]:
                    _add(found, (peer, probe, other), f"peer of {region}, a suspect leaning bad")
    # What the windows made for this pass's reads goes now, as after a judgement: kept to the
    # next judgement, it was 9,000 samples at 10,000 series that every collection until then walked.
    yield from windows.forget_looks_steps()
    return found


suspects = at_once(suspect_steps)


def _count(found: dict[Target, Suspicion], target: Target, counted: Suspicion) -> None:
    """A counted suspicion on `target`: the larger count serves both, and an uncounted one stays."""
    held = found.get(target)
    if held is None:
        found[target] = counted
    elif held.runs is not None and counted.runs is not None and held.runs < counted.runs:
        found[target] = Suspicion(held.why, counted.runs, counted.seen)


def _newest(window: Window) -> float | None:
    newest = window.newest(1)
    return newest[0][AT] if newest else None


def _far_slower(
    windows: WindowStore, region: str, evidence: Mapping[str, Any], now: float, policy: SuspicionPolicy
) -> dict[tuple[str, str], Suspicion]:
    """(probe, vantage) -> a counted suspicion, for each whose newest results include a success
    `far_slower` times its baseline's median (read from the verdict's evidence): it earns
    `far_slower_runs` extra runs, counted from it. A healthy spike so costs that many; a
    slowdown that big keeps earning them with every slowed result, at once, at any interval,
    until the slowdown test has what it needs (it would otherwise wait for several slowed
    results at the base interval before `slow_fraction` hastens it)."""
    out: dict[tuple[str, str], Suspicion] = {}
    runs, far, since = policy.far_slower_runs, policy.far_slower, now - policy.after_failure
    if runs <= 0:
        return out
    by_probe = windows.by_probe(region)
    # By probe, where none of its windows had one: the baselines shown then (the same map while
    # they are unchanged), its windows' `slow_added` and `slow_restarts`, summed, and the clock.
    notes: dict[tuple[str, str], tuple[Any, int, int, float]] = windows.notes.setdefault("far_slower", {})
    for probe, found in (evidence.get("slowdown") or {}).items():
        vantages = by_probe.get(probe)
        if not isinstance(found, dict) or not vantages:
            continue
        baselines = found.get("baseline") or {}
        added = sum([w.slow_added for w in vantages.values()])
        restarts = sum([w.slow_restarts for w in vantages.values()])
        note = notes.get((region, probe))
        if note is not None and note[0] is baselines and note[1] == added and note[2] == restarts and now >= note[3]:
            # None last time, no success since slower than any screen's limit, and the clock
            # has not gone back (which takes results that far back into reach again).
            continue
        none = True
        for vantage, base in baselines.items():
            window = vantages.get(vantage)
            median = base.get("median") if isinstance(base, dict) else None
            if window is None or not median:
                continue
            slower = far * median
            screen = window.slow_screen
            none = none and (screen is None or screen[0] <= slower)  # every success slower is in `slow_added`
            after = window.results_since_slower(slower, runs, since)
            if after is not None:
                none = False
                why = f"a result over {far:g}x its usual median ({median * 1000:.0f} ms) at {vantage}"
                out[probe, vantage] = Suspicion(why, runs - after, _newest(window))
        if none and baselines:
            notes[region, probe] = (baselines, added, restarts, now)
        else:
            notes.pop((region, probe), None)
    return out


def _add(found: dict[Target, Suspicion], target: Target, why: str) -> None:
    """Hasten `target` for as long as it is renewed (a reason found first stays): a lone
    failure's count gives way, since what leans bad needs its samples over the same seconds."""
    held = found.get(target)
    if held is None or held.runs is not None:
        found[target] = Suspicion(why if held is None else held.why)


def _vantages(windows: WindowStore, region: str, probe: str, set_aside: Collection[str]) -> list[str]:
    """The vantages that report `probe` in `region`, in the order they first did (never a set's
    hash order: the suspects' order, and the order their extra runs start, repeat exactly)."""
    return [v for (p, v) in windows.region(region) if p == probe and v not in set_aside]


def _slow(evidence: Mapping[str, Any], fraction: float) -> dict[str, tuple[list[str], bool]]:
    """probe -> its vantages with a baseline, and whether the test leans beyond the quorum, for
    each probe whose slowdown test stands at `fraction` of its threshold or more and whose run is
    slower than usual by the effect size (read from the verdict's evidence: the detector already
    computed all three)."""
    out: dict[str, tuple[list[str], bool]] = {}
    for probe, found in (evidence.get("slowdown") or {}).items():
        if not isinstance(found, dict):
            continue
        llr, threshold = found.get("llr") or 0.0, found.get("threshold") or 0.0
        if found.get("slower") and threshold > 0 and llr >= fraction * threshold:
            out[probe] = (sorted(found.get("baseline") or {}), bool(found.get("leaning")))
    return out


def wakes_judge(result: Result, verdicts: Mapping[str, Verdict], set_aside: Collection[str]) -> bool:
    """Whether a result can change what the judge says, so it should look at once: a failure,
    not from a vantage set aside, not of a probe its region's verdict already holds against it
    (a long outage would otherwise have the judge run at `judge_every` throughout)."""
    if result.ok or result.vantage in set_aside:
        return False
    return result.probe not in _held(verdicts.get(result.region))


def _held(verdict: Verdict | None) -> frozenset[str]:
    """The probes a region's verdict holds against it: decided, no extra samples needed."""
    return verdict.troubles if verdict is not None and verdict.status in _DECIDED else frozenset()


# How many judge passes one renewal of a suspicion covers. Past one, so a pass a little late does
# not let it lapse; not two, since what a renewal grants is run after the evidence fades (at 20
# extra runs a second, half a pass is 2 or 3 runs).
HOLD_PASSES = 1.25


def hold(tick: float, policy: SuspicionPolicy, took: float = 0.0) -> float:
    """How long one pass's suspicions hold: `HOLD_PASSES` judge delays, and what the pass `took`."""
    return HOLD_PASSES * judge_delay(tick, suspecting=True, policy=policy, took=took) + took


def judge_delay(tick: float, suspecting: bool, policy: SuspicionPolicy, took: float = 0.0) -> float:  # noqa: FBT001
    """How long the judge waits before its next pass: `judge_every` while a suspect is probed
    (extra samples are worth judging at once), the controller's tick otherwise; and never less
    than the last pass `took`, so judging takes at most half of the event loop's time (back to
    back, long passes would leave probes in flight no turn: a pass at 10,000 series took about
    a second once, a fifth of one now)."""
    wait = min(tick, policy.judge_every) if suspecting and policy.enabled else tick
    return max(wait, took)
