"""The guardrails of DESIGN.md that concern weights, as one pure check of a proposed batch.

Every batch the actuator is asked to send passes through `check` first; a batch with any
violation is refused whole. The checks hold whatever produced the batch (a ramp step, a
rollback, an evacuation, an operator), so a bug in a planner cannot reach Route 53.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from controller.judging.verdicts import shared_trouble
from controller.planning.weights import shares
from controller.settings.limits import MAX_WEIGHT, SHARE_EPSILON

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.judging.verdicts import Status
    from controller.settings.schema import RecordSet, Region

Kind = Literal["forward", "rollback", "evacuation", "restore"]
# Every kind that gives some region more share on purpose: paced (guardrail 2). A rollback may
# jump back at once.
FORWARD_KINDS: tuple[Kind, ...] = ("forward", "evacuation", "restore")
# Share comparisons are in percent; this absorbs float noise, not policy.


@dataclass(frozen=True, slots=True)
class Violation:
    # stable name: range, members, all_zero, residency, read_only, max_share, unhealthy_target,
    # shared_trouble, max_step, pacing
    rule: str
    message: str


@dataclass(frozen=True, slots=True)
class Proposal:
    """Weights for every member of one record set, from what Route 53 holds now."""

    record_set: RecordSet
    before: Mapping[str, int]  # set identifier -> weight, as observed
    after: Mapping[str, int]
    kind: Kind
    now: float | None = None
    # No forward change before this: the previous one's INSYNC + the record's TTL + its bake.
    not_before: float | None = None


def moved_share(before: Mapping[str, int], after: Mapping[str, int]) -> float:
    """Percent of answers that change member: the sum of the shares that grow."""
    old, new = shares(before), shares(after)
    return sum(max(0.0, new[k] - old.get(k, 0.0)) for k in new)


def check(
    proposal: Proposal,
    regions: Mapping[str, Region],
    verdicts: Mapping[str, Status],
    max_step: float,
    troubles: Mapping[str, frozenset[str]] | None = None,
) -> list[Violation]:
    """Every guardrail the proposal breaks; empty when it may be sent."""
    rs = proposal.record_set
    after = proposal.after
    members = {m.set_identifier: m for m in rs.members}
    found: list[Violation] = []

    if set(after) != set(members):
        missing, extra = sorted(set(members) - set(after)), sorted(set(after) - set(members))
        found.append(
            Violation("members", f"{rs.name}: a batch sets every member at once (missing {missing}, unknown {extra})")
        )
        return found
    for sid, weight in after.items():
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
            found.append(Violation("range", f"{rs.name}/{sid}: weight {weight!r} is not an integer 0..{MAX_WEIGHT}"))
    if found:
        return found
    if not any(after.values()):
        found.append(Violation("all_zero", f"{rs.name}: every weight 0 would split traffic equally, not stop it"))
        return found

    new_shares = shares(after)
    old_shares = shares(proposal.before) if set(proposal.before) == set(after) else {}
    for sid, weight in after.items():
        region = regions[members[sid].region]
        share = new_shares[sid]
        if weight and rs.residency is not None and region.residency != rs.residency:
            found.append(
                Violation(
                    "residency", f"{rs.name}/{sid}: {region.name} (residency {region.residency}) outside {rs.residency}"
                )
            )
        if weight and rs.takes_writes and region.type == "read-only":
            found.append(Violation("read_only", f"{rs.name}/{sid}: read-only {region.name} in a set that takes writes"))
        grows = share > old_shares.get(sid, 0.0) + SHARE_EPSILON
        # Above the cap and growing is refused; a batch bringing a region down toward its cap is not.
        if region.type == "lightweight" and share > region.max_share + SHARE_EPSILON and grows:
            found.append(
                Violation(
                    "max_share",
                    f"{rs.name}/{sid}: {share:.2f}% for lightweight {region.name}, above its {region.max_share:g}%",
                )
            )
        if grows and verdicts.get(region.name) != "healthy":
            found.append(
                Violation(
                    "unhealthy_target",
                    f"{rs.name}/{sid}: share would grow to {share:.2f}% on {region.name}, "
                    f"which is {verdicts.get(region.name, 'unknown')}, not healthy",
                )
            )
    # Guardrail 6 for every forward kind. A rollback returns to the last known good weights at
    # once (guardrail 2): holding a failing canary's share because the baseline leans on the
    # same probe would keep users on the failing region; unhealthy_target still applies to it.
    if old_shares and proposal.kind in FORWARD_KINDS:
        region_of = {sid: members[sid].region for sid in after}
        gaining = [region_of[s] for s in after if new_shares[s] > old_shares.get(s, 0.0) + SHARE_EPSILON]
        losing = [region_of[s] for s in after if new_shares[s] < old_shares.get(s, 0.0) - SHARE_EPSILON]
        same = shared_trouble(gaining, losing, troubles or {})
        if same is not None:
            gainer, loser, probes = same
            found.append(
                Violation(
                    "shared_trouble",
                    f"{rs.name}: share would move from {loser} to {gainer}, which shows the same trouble "
                    f"({', '.join(sorted(probes))})",
                )
            )
    early = 0.0
    if proposal.not_before is not None and proposal.now is not None:
        early = proposal.not_before - proposal.now
    if proposal.kind in FORWARD_KINDS and early > 0:
        found.append(
            Violation(
                "pacing",
                f"{rs.name}: a {proposal.kind} step {early:.1f}s before the previous one has baked "
                "(its INSYNC + TTL + bake)",
            )
        )
    if proposal.kind != "rollback":
        if not old_shares:
            found.append(
                Violation("max_step", f"{rs.name}: no observed weights to step from; only a rollback may jump")
            )
        else:
            moved = moved_share(proposal.before, after)
            if moved > max_step + SHARE_EPSILON:
                found.append(
                    Violation(
                        "max_step",
                        f"{rs.name}: {proposal.kind} step moves {moved:.2f}% of traffic, "
                        f"more than max_step {max_step:g}%",
                    )
                )
    return found


class GuardrailError(Exception):
    """The batch breaks a guardrail and was not sent."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("; ".join(v.message for v in violations))
        self.violations = violations
