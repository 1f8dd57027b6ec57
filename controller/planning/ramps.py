"""Ramps: moving a record set's traffic toward new regions, step by step, behind gates.

`plan` is a pure function of (policy, ramp state, what Route 53 holds, verdicts, clock): it says
which weights the record set should have now and why, or that it should hold. It never writes:
when it wants a write it records it in `state.pending`, the reconciler sends it, and `applied`
turns the confirmed write into the next state. A restart with a pending write therefore asks for
the same weights again, and a write that already happened is recognised by what Route 53 holds.

States: pending -> running (waiting for the start gate) -> baking (a step is live; its bake
starts after INSYNC plus the TTL) -> next step ... -> done; a failed gate leads to rolled_back,
a step back, or paused; operators pause, resume and abort.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from controller.judging.verdicts import shared_trouble
from controller.planning.weights import shares, to_weights
from controller.settings.limits import SHARE_EPSILON

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.judging.verdicts import Verdict
    from controller.planning.guardrails import Kind
    from controller.planning.operator import Action
    from controller.settings.policy import RampPolicy
    from controller.settings.schema import RecordSet

RampStatus = Literal["pending", "running", "baking", "paused", "done", "rolled_back", "aborted"]
RAMP_STATUSES: tuple[RampStatus, ...] = ("pending", "running", "baking", "paused", "done", "rolled_back", "aborted")
ACTIVE: frozenset[RampStatus] = frozenset({"running", "baking", "paused"})


@dataclass(frozen=True)
class Pending:
    """A write the ramp asked for and has not seen confirmed."""

    weights: dict[str, int]
    action: Kind
    status: RampStatus  # the ramp's status once the write is applied
    step: int
    reason: str
    healthy_others: tuple[str, ...] = ()


@dataclass(frozen=True)
class RampState:
    name: str
    status: RampStatus = "pending"
    wave: int = 0
    step: int = -1  # index into the policy's steps; -1 before the wave's first step
    baseline: dict[str, int] | None = None  # weights before the current wave: what a rollback returns to
    bake_until: float | None = None
    wave_done_at: float | None = None
    healthy_others: tuple[str, ...] = ()  # other regions healthy when the live step began
    pending: Pending | None = None
    resume_to: RampStatus | None = None
    abort_requested: bool = False
    reason: str = "not started"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RampState:
        values = dict(data)
        pending = values.get("pending")
        if pending is not None:
            values["pending"] = Pending(**{**pending, "healthy_others": tuple(pending.get("healthy_others", ()))})
        values["healthy_others"] = tuple(values.get("healthy_others", ()))
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    state: RampState
    weights: dict[str, int] | None = None  # None: hold what Route 53 has
    action: Kind | None = None
    reason: str = ""


@dataclass(frozen=True)
class View:
    """What a ramp sees when it plans."""

    now: float
    record_set: RecordSet
    observed: Mapping[str, int]  # set identifier -> weight Route 53 holds now
    verdicts: Mapping[str, Verdict]

    def status(self, region: str) -> str:
        verdict = self.verdicts.get(region)
        return verdict.status if verdict is not None else "unknown"

    def healthy_for(self, region: str) -> float:
        """Seconds the region has been healthy (0 when it is not)."""
        verdict = self.verdicts.get(region)
        if verdict is None or verdict.status != "healthy":
            return 0.0
        return self.now - verdict.since


def step_weights(
    policy: RampPolicy, record_set: RecordSet, baseline: Mapping[str, int], wave: int, step: int
) -> dict[str, int]:
    """Weights for `step` of `wave`: each target region gets the step's share, the others keep
    their baseline proportions of the rest."""
    targets = set(policy.waves[wave])
    share = policy.steps[step] if step >= 0 else 0.0
    target_sids = [m.set_identifier for m in record_set.members if m.region in targets]
    base = shares(baseline) if any(baseline.values()) else {}
    others = {m.set_identifier: base.get(m.set_identifier, 0.0) for m in record_set.members if m.region not in targets}
    rest = 100.0 - share * len(targets)
    intended: dict[str, float] = {}
    per_region = {r: [m.set_identifier for m in record_set.members if m.region == r] for r in targets}
    for sids in per_region.values():
        for sid in sids:
            intended[sid] = share / len(sids)
    total_others = sum(others.values())
    for sid, value in others.items():
        intended[sid] = rest * value / total_others if total_others else 0.0
    for sid in target_sids:
        intended.setdefault(sid, 0.0)
    return to_weights(intended).weights


def _start_gate(policy: RampPolicy, state: RampState, view: View) -> str | None:
    """Why the wave may not start yet, or None when every target has been healthy long enough."""
    for region in policy.waves[state.wave]:
        healthy = view.healthy_for(region)
        if healthy < policy.start_gate:
            status = view.status(region)
            detail = f"healthy for {healthy:.0f}s" if status == "healthy" else status
            return f"waiting for the start gate: {region} {detail}, {policy.start_gate:g}s needed"
    return None


def _gate_failure(policy: RampPolicy, state: RampState, view: View) -> tuple[str, str] | None:
    """(which gate, why) when a gate fails during a bake: evidence of failure, not lack of data."""
    for region in policy.waves[state.wave]:
        status = view.status(region)
        if status in ("degraded", "unhealthy"):
            verdict = view.verdicts.get(region)
            why = "; ".join(verdict.reasons) if verdict is not None and verdict.reasons else status
            return "target", f"{region} is {status}: {why}"
    for region in state.healthy_others:
        status = view.status(region)
        if status in ("degraded", "unhealthy"):
            return "others", f"{region} became {status} during the ramp"
    return None


def _healthy_others(policy: RampPolicy, state: RampState, view: View) -> tuple[str, ...]:
    targets = set(policy.waves[state.wave])
    regions = {m.region for m in view.record_set.members} - targets
    return tuple(sorted(r for r in regions if view.status(r) == "healthy"))


def _forward(policy: RampPolicy, state: RampState, view: View, step: int, baseline: Mapping[str, int]) -> Plan:
    weights = step_weights(policy, view.record_set, baseline, state.wave, step)
    targets = ", ".join(policy.waves[state.wave])
    reason = f"step {step + 1} of {len(policy.steps)}: {targets} to {policy.steps[step]:g}%"
    if len(policy.waves) > 1:
        reason = f"wave {state.wave + 1} of {len(policy.waves)}, {reason}"
    shared = _would_grow_unhealthy(view, weights)
    if shared:  # the target is healthy (its gate held); a shared cause with the regions losing share
        why = f"holding {reason}: {shared}"
        return Plan(replace(state, reason=why), reason=why)
    pending = Pending(weights, "forward", "baking", step, reason, _healthy_others(policy, state, view))
    new = replace(state, pending=pending, baseline=dict(baseline), reason=reason)
    return Plan(new, weights, "forward", reason)


def _back(view: View, state: RampState, weights: Mapping[str, int], status: RampStatus, step: int, reason: str) -> Plan:
    # Going back must not hand share to a region that is not healthy (guardrail 3): hold instead.
    growing = _would_grow_unhealthy(view, weights, forward=False)
    if growing:
        why = f"paused: cannot go back ({reason}): {growing}"
        resume_to = state.status if state.status != "paused" else state.resume_to
        return Plan(replace(state, status="paused", resume_to=resume_to, reason=why), reason=why)
    pending = Pending(dict(weights), "rollback", status, step, reason, state.healthy_others)
    return Plan(replace(state, pending=pending, reason=reason), dict(weights), "rollback", reason)


def _ask_again(policy: RampPolicy, state: RampState, pending: Pending, view: View) -> Plan | None:
    """The pending write again, once its preconditions hold; a hold while they cannot be known;
    None when the target failed meanwhile (the pending forward step is dropped)."""
    if dict(view.observed) == pending.weights:  # it happened: the reconciler confirms it
        return Plan(state, pending.weights, pending.action, pending.reason)
    if pending.action == "forward":
        statuses = {r: view.status(r) for r in policy.waves[state.wave]}
        if any(s in ("degraded", "unhealthy") for s in statuses.values()):
            return None
        waiting = [r for r, s in statuses.items() if s != "healthy"]
        if waiting:
            reason = f"holding {pending.reason}: {_unknown(waiting)}"
            return Plan(replace(state, reason=reason), reason=reason)
    growing = _would_grow_unhealthy(view, pending.weights, forward=pending.action == "forward")
    if growing:
        reason = f"holding {pending.reason}: {growing}"
        return Plan(replace(state, reason=reason), reason=reason)
    return Plan(state, pending.weights, pending.action, pending.reason)


def _would_grow_unhealthy(view: View, weights: Mapping[str, int], *, forward: bool = True) -> str | None:
    """Why these weights must not be sent now: a region would gain share that is not healthy
    (guardrail 3) or, for a forward step, that shows the trouble of a region losing share
    (guardrail 6; a rollback returns to known good weights at once)."""
    old, new = shares(view.observed), shares(weights)
    gaining, losing = [], []
    for member in view.record_set.members:
        sid = member.set_identifier
        if new[sid] > old.get(sid, 0.0) + SHARE_EPSILON:
            if view.status(member.region) != "healthy":
                return f"{member.region} would gain share but is {view.status(member.region)}"
            gaining.append(member.region)
        elif new[sid] < old.get(sid, 0.0) - SHARE_EPSILON:
            losing.append(member.region)
    troubles = {r: v.troubles for r, v in view.verdicts.items()}
    same = shared_trouble(gaining, losing, troubles) if forward else None
    if same is not None:
        gainer, loser, probes = same
        return f"{gainer} shows the same trouble as {loser} ({', '.join(sorted(probes))}): a shared cause"
    return None


def plan(policy: RampPolicy, state: RampState, view: View) -> Plan:
    """What the record set should hold now under this ramp, and why."""
    if state.pending is not None:  # asked before, not yet confirmed: ask again (level-triggered) ...
        again = _ask_again(policy, state, state.pending, view)
        if again is not None:
            return again
        state = replace(state, pending=None)  # ... unless the target failed meanwhile: decide anew
    if state.abort_requested and state.status in ACTIVE:
        if state.baseline is not None and dict(view.observed) != state.baseline:
            return _back(
                view,
                state,
                state.baseline,
                "aborted",
                -1,
                "aborted by an operator: back to the weights before the ramp",
            )
        return Plan(replace(state, status="aborted", abort_requested=False, reason="aborted by an operator"))
    if state.status == "rolled_back" and policy.resume_after_rollback:
        if _start_gate(policy, state, view) is None:
            state = replace(state, status="running", step=-1, reason="target healthy again: ramp resumes")
        else:
            return Plan(state, reason=state.reason)
    if state.status == "running":
        waiting = _start_gate(policy, state, view)
        if waiting is not None:
            return Plan(replace(state, reason=waiting), reason=waiting)
        baseline = state.baseline if state.baseline is not None else dict(view.observed)
        return _forward(policy, state, view, 0, baseline)
    if state.status != "baking":
        return Plan(state, reason=state.reason)
    return _bake(policy, state, view)


def _bake(policy: RampPolicy, state: RampState, view: View) -> Plan:
    baseline = state.baseline or dict(view.observed)
    failure = _gate_failure(policy, state, view)
    if failure is not None:
        gate, why = failure
        if gate == "others" or policy.on_failure == "pause":
            # Sending share back to a region that is degrading would be worse than holding.
            reason = f"paused: {why}"
            return Plan(replace(state, status="paused", resume_to="baking", reason=reason), reason=reason)
        if policy.on_failure == "rollback":
            return _back(view, state, baseline, "rolled_back", -1, f"rollback: {why}")
        if state.step > 0:
            weights = step_weights(policy, view.record_set, baseline, state.wave, state.step - 1)
            return _back(
                view, state, weights, "baking", state.step - 1, f"step back to {policy.steps[state.step - 1]:g}%: {why}"
            )
        return _back(view, state, baseline, "paused", -1, f"stepped back to the weights before the ramp: {why}")
    blind = [r for r in policy.waves[state.wave] if view.status(r) != "healthy"]
    if blind:
        # No fresh data is no reason to act (fail static), nor a healthy bake: hold, and count
        # the bake again from when the target is seen healthy. Never earlier than the step's own
        # bake (INSYNC + TTL + bake): a gap right after a step must not shorten its wait.
        reason = f"holding: {_unknown(blind)}; the bake restarts once it is healthy"
        bake_until = max(view.now + policy.bake, state.bake_until or 0.0)
        return Plan(replace(state, bake_until=bake_until, reason=reason), reason=reason)
    if state.bake_until is not None and view.now < state.bake_until:
        reason = f"baking step {state.step + 1} of {len(policy.steps)}: {state.bake_until - view.now:.0f}s left"
        return Plan(replace(state, reason=reason), reason=reason)
    if state.step + 1 < len(policy.steps):
        return _forward(policy, state, view, state.step + 1, baseline)
    if state.wave + 1 < len(policy.waves):
        done_at = state.wave_done_at if state.wave_done_at is not None else view.now
        if view.now - done_at < policy.wave_bake:
            reason = f"wave {state.wave + 1} done; next wave in {policy.wave_bake - (view.now - done_at):.0f}s"
            return Plan(replace(state, wave_done_at=done_at, reason=reason), reason=reason)
        reason = f"wave {state.wave + 2} of {len(policy.waves)} starting"
        nxt = replace(
            state, status="running", wave=state.wave + 1, step=-1, baseline=None, wave_done_at=None, reason=reason
        )
        return plan(policy, nxt, view)
    return Plan(replace(state, status="done", reason="done: every step baked"), reason="done: every step baked")


def applied(policy: RampPolicy, state: RampState, insync_at: float, ttl: float) -> RampState:
    """The pending write is in Route 53 (INSYNC at `insync_at`): move to the state it leads to.

    A step's bake starts once resolvers can have seen it: INSYNC plus the record's TTL.
    """
    p = state.pending
    if p is None:
        return state
    bake_until = insync_at + ttl + policy.bake if p.status == "baking" else None
    return replace(
        state,
        status=p.status,
        step=p.step,
        pending=None,
        bake_until=bake_until,
        healthy_others=p.healthy_others,
        abort_requested=False if p.status == "aborted" else state.abort_requested,
        reason=p.reason,
    )


def failed(state: RampState, why: str) -> RampState:
    """The pending write was refused or failed for good: hold and say why; an operator decides."""
    return replace(state, pending=None, status="paused", resume_to=state.status, reason=f"paused: {why}")


def act(policy: RampPolicy, state: RampState, action: Action, now: float) -> tuple[RampState, str | None]:
    """An operator's action; returns the new state, or the old one and why it is not allowed."""
    if action == "start":
        if state.status not in ("pending", "rolled_back", "aborted"):
            return state, f"cannot start a ramp that is {state.status}"
        return RampState(state.name, status="running", reason="started by an operator"), None
    if action == "pause":
        if state.status not in ("running", "baking"):
            return state, f"cannot pause a ramp that is {state.status}"
        return replace(state, status="paused", resume_to=state.status, reason="paused by an operator"), None
    if action == "resume":
        if state.status != "paused":
            return state, f"cannot resume a ramp that is {state.status}"
        to = state.resume_to or "running"
        bake_until = now + policy.bake if to == "baking" else state.bake_until
        return replace(state, status=to, resume_to=None, bake_until=bake_until, reason="resumed by an operator"), None
    if state.status not in ACTIVE:
        return state, f"cannot abort a ramp that is {state.status}"
    # A write in flight still resolves first (its result is needed to know what Route 53 holds).
    return replace(state, abort_requested=True, reason="abort requested by an operator"), None


def _unknown(regions: list[str]) -> str:
    """Why a ramp waits on regions that are not judged (`unknown`): no fresh data, or a finding
    their peers cannot tell apart yet (see `judging.findings.unconfirmed`)."""
    return f"{', '.join(regions)} unknown (no fresh data, or a finding its peers cannot tell apart yet)"
