"""Evacuation: moving share off a degraded region, step by step, and back once it has recovered.

`plan_evacuation` is a pure function of the record set, its home weights (what it holds when all
is well), what Route 53 holds now, the verdicts and the clock. It moves at most `max_step` of
traffic per step, only onto healthy regions, never past a lightweight region's `max_share`. It
fails static: when most regions have no fresh data (blind), no region is healthy, or every healthy
region shows the trouble of the one to evacuate (a shared cause), it holds. It says what the
record set should hold, not when: the reconciler paces every step (INSYNC + TTL + `step_bake`).
Share comes back to a region only after it has been healthy for `restore_after` (hysteresis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.judging.verdicts import shared_trouble
from controller.planning.weights import shares
from controller.settings.limits import MAX_WEIGHT, SHARE_EPSILON

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.judging.verdicts import Verdict
    from controller.planning.guardrails import Kind
    from controller.settings.policy import EvacuationPolicy
    from controller.settings.schema import RecordSet, Region


@dataclass(frozen=True, slots=True)
class EvacuationPlan:
    weights: dict[str, int] | None = None  # None: hold
    action: Kind | None = None  # "evacuation" or "restore"
    reason: str = ""
    blind: bool = False


def plan_evacuation(
    record_set: RecordSet,
    home: Mapping[str, int],
    observed: Mapping[str, int],
    verdicts: Mapping[str, Verdict],
    regions: Mapping[str, Region],
    policy: EvacuationPolicy,
    max_step: float,
    now: float,
) -> EvacuationPlan:
    region_of = {m.set_identifier: m.region for m in record_set.members}

    def status(sid: str) -> str:
        verdict = verdicts.get(region_of[sid])
        return verdict.status if verdict is not None else "unknown"

    def healthy_for(sid: str) -> float:
        verdict = verdicts.get(region_of[sid])
        return now - verdict.since if verdict is not None and verdict.status == "healthy" else 0.0

    troubles = {r: v.troubles for r, v in verdicts.items()}
    member_regions = sorted(set(region_of.values()))
    unknown = [r for r in member_regions if (verdicts[r].status if r in verdicts else "unknown") == "unknown"]
    if len(unknown) > policy.blind_fraction * len(member_regions):
        # Unknown for want of data, or for a trouble their peers show alike (every probe failing
        # everywhere: fresh results, and "no fresh data" sent on-call after the wrong thing).
        sharing = [r for r in unknown if r in verdicts and verdicts[r].troubles]
        why = (
            [f"no fresh data for {', '.join(r for r in unknown if r not in sharing)}"]
            if len(sharing) < len(unknown)
            else []
        )
        why += [f"{', '.join(sharing)} failing alike (a cause they share)"] if sharing else []
        return EvacuationPlan(
            reason=f"blind: {len(unknown)} of {len(member_regions)} regions unknown ({'; '.join(why)}); "
            "holding the weights",
            blind=True,
        )
    current = shares(observed)
    caps = {m.set_identifier: _cap(regions[m.region]) for m in record_set.members}
    bad = [sid for sid in observed if current[sid] > SHARE_EPSILON and status(sid) in ("degraded", "unhealthy")]

    def bad_for(sid: str) -> float:
        """How long the region has been degraded or unhealthy without a break (a move between the
        two is no break: counted from `since`, a region flipping between them never confirmed)."""
        verdict = verdicts[region_of[sid]]
        return now - (verdict.bad_since if verdict.bad_since is not None else verdict.since)

    unconfirmed = [sid for sid in bad if bad_for(sid) < policy.confirm_after]
    if unconfirmed and len(unconfirmed) == len(bad):
        names = ", ".join(sorted(f"{region_of[s]} ({status(s)}, bad for {bad_for(s):.0f}s)" for s in bad))
        return EvacuationPlan(reason=f"confirming {names}: {policy.confirm_after:g}s before share moves")
    bad = [sid for sid in bad if sid not in unconfirmed]
    if bad:
        candidates = [
            sid for sid in observed if status(sid) == "healthy" and (home.get(sid, 0) > 0 or observed[sid] > 0)
        ]
        if not candidates:
            return EvacuationPlan(reason="every region that could take traffic looks bad; holding the weights")
        # Guardrail 6: a region that shows the trouble of the one losing share would fare no
        # better; when every candidate does, the cause is shared and nothing moves.
        losing = [region_of[s] for s in bad]
        alike = {sid: same for sid in candidates if (same := shared_trouble([region_of[sid]], losing, troubles))}
        receivers = {sid: float(home.get(sid, 0) or observed[sid]) for sid in candidates if sid not in alike}
        if not receivers:
            detail = "; ".join(f"{g} shows the trouble of {lo} ({', '.join(sorted(p))})" for g, lo, p in alike.values())
            return EvacuationPlan(reason=f"holding the weights: a shared cause: {detail}")
        names = ", ".join(sorted({f"{region_of[s]} ({status(s)})" for s in bad}))
        losers = {sid: float(observed[sid]) for sid in bad}
        return _shift(observed, losers, receivers, max_step, caps, "evacuation", f"evacuating {names}")
    if dict(observed) == dict(home):
        return EvacuationPlan(reason="at home weights")
    home_shares = shares(home)
    deficit = {sid: home_shares[sid] - current[sid] for sid in home if home_shares[sid] > current[sid] + SHARE_EPSILON}
    if not deficit:  # a restore ends at the home shares, in weights of its own (127/127 for 1/1)
        held = " ".join(f"{sid}={weight}" for sid, weight in observed.items())
        return EvacuationPlan(reason=f"at home shares ({held}: the home weights' shares)")
    ready = {sid: d for sid, d in deficit.items() if healthy_for(sid) >= policy.restore_after}
    if not ready:
        waiting = ", ".join(f"{region_of[s]} ({status(s)}, healthy {healthy_for(s):.0f}s)" for s in deficit)
        return EvacuationPlan(
            reason=f"waiting to restore {waiting or 'nothing'}: {policy.restore_after:g}s of health needed"
        )
    excess = {
        sid: current[sid] - home_shares.get(sid, 0.0)
        for sid in current
        if current[sid] > home_shares.get(sid, 0.0) + SHARE_EPSILON
    }
    if not excess:
        return EvacuationPlan(reason="nothing above its home share to give back")
    giving = [region_of[s] for s in excess]
    alike = {sid: same for sid in ready if (same := shared_trouble([region_of[sid]], giving, troubles))}
    ready = {sid: d for sid, d in ready.items() if sid not in alike}
    if not ready:
        detail = "; ".join(f"{g} shows the trouble of {lo} ({', '.join(sorted(p))})" for g, lo, p in alike.values())
        return EvacuationPlan(reason=f"holding the restore: a shared cause: {detail}")
    names = ", ".join(sorted(region_of[s] for s in ready))
    amount = min(max_step, sum(ready.values()), sum(excess.values()))
    return _shift(observed, excess, ready, amount, caps, "restore", f"restoring {names}")


def _cap(region: Region) -> float:
    return region.max_share if region.type == "lightweight" else 100.0


def _shift(
    observed: Mapping[str, int],
    losers: Mapping[str, float],
    gainers: Mapping[str, float],
    amount: float,
    caps: Mapping[str, float],
    action: Kind,
    reason: str,
) -> EvacuationPlan:
    """Move at most `amount` percent of traffic from `losers` to `gainers`, in proportion to
    their bases, by whole weight units with the total kept: every other member's share stays
    exactly where it was, so no rounding ever grows a region that is not meant to grow."""
    # Same shares in finer units, with headroom for the largest member to grow too.
    scale = max(1, MAX_WEIGHT // (2 * max(observed.values())))
    weights = {sid: w * scale for sid, w in observed.items()}
    total = sum(weights.values())
    room = {sid: max(0, min(MAX_WEIGHT, math.floor(caps[sid] / 100 * total)) - weights[sid]) for sid in gainers}
    units = min(math.floor(amount / 100 * total + SHARE_EPSILON), sum(weights[s] for s in losers), sum(room.values()))
    if units <= 0:
        return EvacuationPlan(reason=f"{reason}: no room to move within max_step and the caps; holding")
    take = _apportion(units, {s: b for s, b in losers.items() if weights[s] > 0}, {s: weights[s] for s in losers})
    give = _apportion(units, {s: b for s, b in gainers.items() if room[s] > 0}, room)
    if take is None or give is None:
        return EvacuationPlan(reason=f"{reason}: no room to move; holding")
    for sid, n in take.items():
        weights[sid] -= n
    for sid, n in give.items():
        weights[sid] += n
    moved = 100.0 * units / total
    return EvacuationPlan(weights, action, f"{reason}: {moved:.1f}% of traffic this step")


def _apportion(units: int, basis: Mapping[str, float], limit: Mapping[str, int]) -> dict[str, int] | None:
    """Split `units` in proportion to `basis` without exceeding `limit` per member."""
    share: dict[str, int] = dict.fromkeys(basis, 0)
    left = units
    while left > 0:
        open_ = {s: b for s, b in basis.items() if share[s] < limit[s]}
        if not open_:
            return None
        total = sum(open_.values()) or float(len(open_))
        quotas = {s: left * (b or 1.0) / total for s, b in open_.items()}
        given = 0
        for s in sorted(open_, key=lambda s: quotas[s] - math.floor(quotas[s]), reverse=True):
            n = min(limit[s] - share[s], max(1, math.floor(quotas[s])), left - given)
            share[s] += n
            given += n
            if given == left:
                break
        left -= given
    return share
