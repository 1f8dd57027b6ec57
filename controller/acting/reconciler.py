"""The reconciler: every tick, observed weights against desired weights, and one guarded step.

Level-triggered, as controller-runtime's reconcile is: each tick it reads what Route 53 holds,
settles any intent a crash left open (the write happened if Route 53 holds its weights), stops
at a hand edit (drift: ramps on that record pause, nothing is overwritten), asks the ramp or
the evacuation planner what the record set should hold, and if that differs takes one step
through the actuator. The intent goes to the audit log before the request, the result after.
Running a tick twice does nothing more than running it once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from controller.acting.errors import DriftError, NoCredentialsError, RetryableError, Route53Error, TerminalError
from controller.events.kinds import ActionTaken, DriftFound, Event, LeaseChanged, OperatorAction, RampChanged
from controller.planning import ramps
from controller.planning.evacuation import plan_evacuation
from controller.planning.guardrails import FORWARD_KINDS, GuardrailError, Proposal, check, moved_share
from controller.planning.weights import shares
from controller.settings.limits import SHARE_EPSILON
from controller.state.audit import NOT_APPLIED_LATER
from controller.state.flags import Freeze

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from controller.acting.route53 import Actuator, ChangeResult
    from controller.judging.verdicts import Status, Verdict
    from controller.planning.guardrails import Kind
    from controller.planning.operator import Action
    from controller.settings.policy import RampPolicy
    from controller.settings.schema import Config, RecordSet, Region
    from controller.state.audit import Outcome
    from controller.state.lease import Lease
    from controller.state.store import Store

log = structlog.get_logger("regionshift.reconciler")


STANDBY_LOOK = 1.0  # seconds between a standby's looks at the writer lease, at most


@dataclass
class RecordView:
    """What the state API shows of one record set."""

    observed: dict[str, int] = field(default_factory=dict)
    desired: dict[str, int] | None = None
    reason: str = ""
    drift: str | None = None
    error: str | None = None
    owner: str | None = None  # "ramp:NAME", "evacuation" or None: nobody moves it
    held: str | None = None  # why the pacing holds the next forward step, while it does
    last_read_at: float | None = None  # the last successful read of the group from Route 53
    errors: dict[str, int] = field(default_factory=dict)  # Route 53 errors so far, by kind
    # Since when its requests fail, and the last failure's (type, kind): said once while it lasts.
    failing: tuple[float, tuple[str, str]] | None = None


class Reconciler:
    def __init__(
        self,
        config: Config,
        actuator: Actuator,
        store: Store,
        lease: Lease,
        *,
        actor: str = "regionshift",
        publish: Callable[[Event], object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.actuator = actuator
        self.store = store
        self.actor = actor
        self.publish: Callable[[Event], object] = publish or (lambda _: None)
        self.policy = config.policy
        self.regions = {r.name: r for r in config.regions}
        self.record_sets = {rs.key: rs for rs in config.record_sets}
        self.ramps: dict[str, ramps.RampState] = {}
        self.views: dict[str, RecordView] = {key: RecordView() for key in self.record_sets}
        self.frozen: Freeze | None = None
        self._lock = asyncio.Lock()
        self.clock = clock
        self.started_at = clock()
        # Guardrail 9: one writer at a time. `lease_token` is set by the lease loop while this
        # controller holds the lease; without one it plans and reports but never writes.
        self.lease = lease
        self.holder = lease.holder
        self.lease_token: int | None = None
        self.writer: tuple[str, int] | None = None  # who holds the writer lease, as last looked (this side or another)
        self._lease_told = False

    async def load(self) -> None:
        """Resume from the store: ramp states (new ramps start `pending`) and the freeze flag."""
        stored = await self.store.ramps.load()
        for name in self.policy.ramps:
            self.ramps[name] = ramps.RampState.from_json(stored[name]) if name in stored else ramps.RampState(name)
        self.frozen = await self.store.flags.frozen()
        for name, state in self.ramps.items():
            log.debug("ramp loaded", ramp=name, status=state.status, step=state.step, reason=state.reason)

    # --- operators ----------------------------------------------------------------------------------

    async def act(self, name: str, action: Action, now: float, who: str) -> str | None:
        """Apply an operator's action to a ramp; the reason it was refused, or None."""
        policy = self.policy.ramps.get(name)
        if policy is None:
            return f"no ramp named {name!r}; known: {', '.join(self.policy.ramps) or 'none'}"
        async with self._lock:
            state, refused = ramps.act(policy, self.ramps[name], action, now)
            if refused is None and action == "start":
                refused = self._held_by_another_ramp(name, policy.record_key) or await self._away_from_home(
                    policy.record_key, now
                )
            if refused is None:
                state = replace(state, reason=f"{state.reason} ({who})")
                await self.store.audit.operator(now, who, action, f"ramp:{name}", state.reason)
                self.publish(OperatorAction(at=now, who=who, action=action, target=f"ramp:{name}", reason=state.reason))
                log.info("ramp action", ramp=name, action=action, by=who, status=state.status)
                await self._save(name, state, now)
            return refused

    async def adopt(self, key: str, now: float, who: str, reason: str) -> tuple[str | None, dict[str, int]]:
        """Accept a hand edit: the weights Route 53 holds now for a drifted record set become the
        ones regionshift last wrote (an audit entry; nothing is written to Route 53), so the drift
        ends and ramps and evacuations plan from them. Ramps the drift paused stay paused until an
        operator resumes them. Returns why it was refused, or None, and the weights adopted."""
        rs = self.record_sets.get(key)
        if rs is None:
            return f"no record set {key!r}; known: {', '.join(self.record_sets) or 'none'}", {}
        async with self._lock:
            group = await self.actuator.read_group(rs)  # what is there now, not what a tick saw
            raw = self.actuator.weights_of(rs, group)
            expected, written = await self._expected(key)
            if expected is None or raw == expected:
                held = "last wrote" if written else "first saw"
                return f"{key} has no hand edit to adopt: Route 53 holds the weights regionshift {held}", {}
            missing = sorted(sid for sid, weight in raw.items() if weight is None)
            if missing:
                return f"{key}: {', '.join(missing)} missing from Route 53: put the record back before adopting", {}
            weights = {sid: int(weight or 0) for sid, weight in raw.items()}
            intent = await self.store.audit.intent(key, who, "adopt", reason, expected, weights, now)
            await self.store.audit.result(intent, "applied", now)
            await self.store.audit.operator(now, who, "adopt", key, reason)
            # Where an evacuation comes back to, too: else the next restore undid the adopted weights
            # as soon as every region had been healthy for `restore_after`.
            await self.store.flags.set_home(key, weights, now)
            self.publish(OperatorAction(at=now, who=who, action="adopt", target=key, reason=reason))
            log.warning("hand edit adopted: the new baseline", record=key, by=who, weights=weights, reason=reason)
            return None, weights

    async def keep_lease(self, every: float, clock: Callable[[], float]) -> None:
        """Hold the writer lease: take it when free, renew it every `every` seconds."""
        while True:
            token = self.lease_token
            if token is None or not await self.lease.renew(token, clock()):
                # A predecessor on this host whose process is gone (a crash, a SIGKILL) hands over
                # at once; any other holder keeps the lease until it expires.
                token = await self.lease.acquire(clock())
            writer = await self.lease.held_by(clock()) if token is None else (self.holder, token)
            if token != self.lease_token or not self._lease_told:
                self.publish(LeaseChanged(at=clock(), holder=self.holder, token=token))
                if token is None:
                    # Said at start too: a controller started second said nothing, and nothing
                    # told an operator which of two was writing.
                    log.warning(
                        "standby: another controller holds the writer lease",
                        holder=self.holder,
                        writer=writer[0] if writer else None,
                        writer_token=writer[1] if writer else None,
                    )
                else:
                    log.info("writer lease acquired", holder=self.holder, fencing_token=token)
                self._lease_told = True
            self.writer = writer
            if token is None or token != self.lease_token:
                # A standby mirrors the writer's progress; a new writer starts from where it left.
                async with self._lock:
                    await self.load()
            self.lease_token = token
            # A standby looks again within a second: a writer gone for good (a SIGKILL on this
            # host) hands over at once, and at a third of a 30 s lease a takeover waited 7 s more.
            await asyncio.sleep(every if token is not None else min(every, STANDBY_LOOK))

    async def release_lease(self) -> None:
        """Give the writer lease up on an orderly stop: a standby takes over at once, not at expiry."""
        token, self.lease_token = self.lease_token, None
        if token is not None:
            await self.lease.release(token)
            log.info("writer lease released", holder=self.holder, fencing_token=token)

    async def freeze(self, frozen: bool, now: float, who: str, reason: str) -> None:  # noqa: FBT001
        async with self._lock:
            self.frozen = Freeze(by=who, reason=reason, at=now) if frozen else None
            what = "freeze" if frozen else "unfreeze"
            await self.store.audit.operator(now, who, what, "shifting", reason)
            self.publish(OperatorAction(at=now, who=who, action=what, target="shifting", reason=reason))
            await self.store.flags.set_frozen(self.frozen, now)
            log.warning("shifting frozen" if frozen else "shifting unfrozen", by=who, reason=reason)

    # --- the loop ------------------------------------------------------------------------------------

    async def tick(self, verdicts: Mapping[str, Verdict], now: float) -> None:
        async with self._lock:
            for key, rs in self.record_sets.items():
                try:
                    await self._reconcile(rs, verdicts, now)
                    self._route53_answers(key, now)
                except RetryableError as exc:
                    self._route53_failed(key, exc, "route53 unavailable, will retry", logging.WARNING, now)
                except NoCredentialsError as exc:
                    self._route53_failed(
                        key, exc, "no AWS credentials: Route 53 cannot be read or written", logging.ERROR, now
                    )
                except TerminalError as exc:  # e.g. access denied: nothing moves, the daemon stays up
                    self._route53_failed(key, exc, "route53 refused a read", logging.ERROR, now)

    def _route53_error(self, key: str, exc: Route53Error) -> None:
        view = self.views[key]
        view.error = str(exc)
        view.errors[exc.kind] = view.errors.get(exc.kind, 0) + 1

    def _route53_failed(self, key: str, exc: Route53Error, what: str, level: int, now: float) -> None:
        """A tick that failed on Route 53: count it (`_route53_error`) and say it once while it
        lasts: the same kind of error again, tick after tick, is logged at debug (a zone gone or
        Route 53 unreachable said so every second, 21 lines in 20 s), and `_reconcile` says when
        Route 53 answers again."""
        view = self.views[key]
        again = view.failing is not None and view.failing[1] == (type(exc).__name__, exc.kind)
        self._route53_error(key, exc)
        if again:
            log.debug(what, record=key, error=str(exc))
            return
        view.failing = (view.failing[0] if view.failing is not None else now, (type(exc).__name__, exc.kind))
        log.log(level, what, record=key, error=str(exc))

    def _route53_answers(self, key: str, now: float) -> None:
        """A tick that went through without a Route 53 error: said once, when it follows failed ones
        (said after the read alone, it came every tick while GetChange kept failing, between two
        "route53 unavailable" lines)."""
        view = self.views[key]
        if view.failing is not None:
            log.info("route53 answers again", record=key, failing_for=round(now - view.failing[0], 1))
            view.failing = None

    def last_contact(self, key: str) -> float:
        """When Route 53 last answered for this record set: its own last read or, while its last
        attempt did not fail, any answer (an INSYNC wait for another record set holds the tick)."""
        view = self.views[key]
        times = [self.started_at, view.last_read_at or 0.0]
        if view.error is None:
            times.append(self.actuator.last_success_at or 0.0)
        return max(times)

    def actuation(self, now: float, stale_after: float) -> dict[str, str]:
        """Record sets whose actuation is impaired, and how: what `/healthz` reports."""
        out = {}
        for key, view in self.views.items():
            since = self.last_contact(key)
            if view.error is not None:
                out[key] = f"Route 53: {view.error}"
            elif now - since > stale_after:
                out[key] = f"Route 53 not read for {now - since:.0f}s"
        return out

    def _ramp_for(self, key: str) -> tuple[str, RampPolicy] | None:
        for name, policy in self.policy.ramps.items():
            state = self.ramps[name]
            resumable = state.status == "rolled_back" and policy.resume_after_rollback
            if policy.record_key == key and (state.status in ramps.ACTIVE or state.pending is not None or resumable):
                return name, policy
        return None

    async def _reconcile(self, rs: RecordSet, verdicts: Mapping[str, Verdict], now: float) -> None:
        key = rs.key
        view = self.views[key]
        group = await self.actuator.read_group(rs)  # the one read this tick: observe, and compare before write
        raw = self.actuator.weights_of(rs, group)
        observed = {sid: w or 0 for sid, w in raw.items()}
        view.observed, view.error, view.last_read_at = observed, None, self.clock()
        await self._settle_open_intent(key, raw, now)
        expected, written = await self._expected(key)
        if expected is None and all(w is not None for w in raw.values()):
            # First sight, nothing written yet: what Route 53 holds now is what a hand edit is told
            # from until regionshift writes (else an edit before its first write went unseen, and
            # the next restore overwrote it). Kept across restarts, like what it writes.
            expected = {sid: int(w or 0) for sid, w in raw.items()}
            await self.store.flags.set_seen(key, expected, now)
            log.info(
                "first sight: hand edits are told from these weights until regionshift writes",
                record=key,
                weights=expected,
            )
        if expected is not None and raw != expected and await self._landed_late(key, raw, now):
            expected, written = await self._expected(key)
        # The view changes before the event is published: a client that takes a snapshot in
        # between must not see the event's id without what it says (it would skip the event).
        if expected is not None and raw != expected:
            drift = str(DriftError(key, expected, raw, written=written))
            new = view.drift != drift
            view.drift, view.desired, view.reason = drift, None, "holding: Route 53 was changed by hand"
            if new:
                log.error("drift: weights changed outside regionshift", record=key, detail=drift)
                self.publish(DriftFound(at=now, record=key, detail=drift))
                await self._pause_ramps(key, f"drift: {drift}", now)
            return
        was, view.drift = view.drift, None
        if was is not None:
            log.info("drift over: Route 53 holds the weights last written", record=key)
            self.publish(DriftFound(at=now, record=key, detail=None))
        owner = self._ramp_for(key)
        if owner is not None:
            name, policy = owner
            await self._ramp_step(rs, name, policy, group, expected, observed, verdicts, now)
            return
        view.owner = "evacuation"
        home = await self._home(rs, observed, now)
        if not self.policy.evacuation.enabled or not any(home.values()):
            view.desired, view.reason = None, "no ramp; evacuation off or no home weights"
            return
        evac = plan_evacuation(
            rs, home, observed, verdicts, self.regions, self.policy.evacuation, self.policy.guardrails.max_step, now
        )
        view.desired, view.reason = evac.weights, evac.reason
        if evac.weights is None and observed == home:
            view.owner = None  # at home with nothing to do: "owner: evacuation" read as one under way
        if evac.weights is not None and evac.action is not None:
            await self._write(rs, group, expected, evac.weights, evac.action, evac.reason, "evacuation", verdicts, now)

    async def _ramp_step(
        self,
        rs: RecordSet,
        name: str,
        policy: RampPolicy,
        group: Mapping[str, Mapping[str, Any]],
        expected: Mapping[str, int] | None,
        observed: dict[str, int],
        verdicts: Mapping[str, Verdict],
        now: float,
    ) -> None:
        view = self.views[rs.key]
        view.owner = f"ramp:{name}"
        result = ramps.plan(policy, self.ramps[name], ramps.View(now, rs, observed, verdicts))
        state = result.state
        view.desired, view.reason = result.weights, result.reason
        if result.weights is not None and result.action is not None:
            if result.weights == observed:  # already there (a write before a crash, or a no-op step)
                # Its bake counts from its INSYNC when the audit log has it (a crash after the
                # result, before the ramp state was saved), else from now.
                last = await self.store.audit.last_forward(rs.key, (result.action,))
                known = last.insync_at if last is not None and last.outcome == "applied" else None
                state = ramps.applied(policy, state, known if known is not None else now, rs.ttl)
            else:
                await self._save(name, state, now)  # the pending write is durable before it is sent
                outcome = await self._write(
                    rs, group, expected, result.weights, result.action, result.reason, f"ramp:{name}", verdicts, now
                )
                if outcome is not None and outcome[0] == "applied":
                    state = ramps.applied(policy, state, outcome[1] or now, rs.ttl)
                elif outcome is not None and outcome[0] == "refused":
                    state = ramps.failed(state, outcome[2])
        if state.status == "done" and self.ramps[name].status != "done":
            await self.store.flags.set_home(rs.key, observed, now)
        await self._save(name, state, now)

    async def _save(self, name: str, state: ramps.RampState, now: float) -> None:
        previous = self.ramps[name]
        if state != previous:
            if state.status != previous.status:
                log.info("ramp status", ramp=name, previous=previous.status, status=state.status, reason=state.reason)
            if state.status != previous.status or state.step != previous.step:
                self.publish(
                    RampChanged(
                        at=now,
                        ramp=name,
                        previous=previous.status,
                        status=state.status,
                        step=state.step,
                        reason=state.reason,
                    )
                )
            self.ramps[name] = state
            await self.store.ramps.save(name, state.to_json(), now)

    async def _write(
        self,
        rs: RecordSet,
        group: Mapping[str, Mapping[str, Any]],
        expected: Mapping[str, int] | None,
        weights: dict[str, int],
        kind: Kind,
        reason: str,
        actor: str,
        verdicts: Mapping[str, Verdict],
        now: float,
    ) -> tuple[str, float | None, str] | None:
        """Intent, request, result. ('applied', insync_at, ''), ('refused', None, why), or None when
        frozen or the request failed for now (it is tried again next tick)."""
        key = rs.key
        raw = self.actuator.weights_of(rs, group)
        if self.frozen is not None:
            self.views[key].reason = f"frozen by {self.frozen['by']}: {self.frozen['reason']} (wanted: {reason})"
            return None
        token = self.lease_token
        if token is None or not await self.lease.holds(token, self.clock()):
            if token is not None:
                log.warning("writer lease lost", holder=self.holder, fencing_token=token)
                self.publish(LeaseChanged(at=self.clock(), holder=self.holder, token=None))
            self.lease_token = None
            self.views[key].reason = f"standby: another controller holds the writer lease (wanted: {reason})"
            return None
        not_before = None
        if kind in FORWARD_KINDS:
            not_before, why = await self._paced(rs)
            if not_before is not None and now < not_before:
                when = "once that is known" if math.isinf(not_before) else f"in {not_before - now:.0f}s"
                if self.views[key].held != why:  # once per wait, not every tick
                    log.info("step waits for the pacing", record=key, kind=kind, step=reason, until=why, when=when)
                self.views[key].held = why
                self.views[key].reason = f"pacing: {reason}, {when} ({why})"
                return None
            self.views[key].held = None
        intent = await self.store.audit.intent(key, f"{actor} (lease {token})", kind, reason, dict(raw), weights, now)
        statuses = {r: v.status for r, v in verdicts.items()}

        accepted: list[str] = []

        async def submitted(change_id: str, at: float) -> None:
            await self.store.audit.submitted(intent, change_id, at)
            accepted.append(change_id)

        try:
            change = await checked_apply(
                self.actuator,
                rs,
                weights,
                expected=expected,
                kind=kind,
                regions=self.regions,
                verdicts=statuses,
                max_step=self.policy.guardrails.max_step,
                reason=reason,
                group=group,
                troubles={r: v.troubles for r, v in verdicts.items()},
                now=self.clock(),
                not_before=not_before,
                on_submitted=submitted,
            )
        except (GuardrailError, TerminalError, DriftError) as exc:
            if isinstance(exc, TerminalError):
                self._route53_error(key, exc)
            if accepted:
                # Route 53 accepted the batch; only following it failed (GetChange denied, say).
                # It is applied, INSYNC unknown: the pacing asks again, or waits the longest.
                await self.store.audit.result(
                    intent, "applied", self.clock(), change_id=accepted[0], error=f"INSYNC not confirmed: {exc}"
                )
                log.warning("change sent, INSYNC not confirmed", record=key, change_id=accepted[0], error=str(exc))
                self._announce(rs, raw, weights, kind, reason, "applied", actor)
                return "applied", None, ""
            await self.store.audit.result(intent, "failed", self.clock(), error=str(exc))
            log.error("change refused", record=key, kind=kind, reason=reason, error=str(exc))
            self._announce(rs, raw, weights, kind, reason, "refused", actor)
            return "refused", None, str(exc)
        except RetryableError:
            # Sent or not, nobody knows (a timeout may hide an applied change): the intent stays
            # open and the next tick settles it from what Route 53 holds, as after a crash.
            raise
        outcome: Outcome = "dry_run" if change.dry_run else "applied"
        # Stamped when written, after the INSYNC wait: a wait that timed out ends at or after this.
        await self.store.audit.result(
            intent, outcome, self.clock(), change_id=change.change_id, insync_at=change.insync_at
        )
        log.info(
            "weights changed",
            record=key,
            kind=kind,
            reason=reason,
            weights=weights,
            shares={k: round(v, 2) for k, v in shares(weights).items()},
            change_id=change.change_id,
            dry_run=change.dry_run,
        )
        if not change.dry_run and change.insync_at is not None:
            # Route 53 reported the change INSYNC: it holds these weights now. The view says so
            # before the event is out (a reader would otherwise see the step beside the old
            # weights until the next read, which the pacing may put off by a TTL).
            self.views[key].observed = dict(weights)
        self._announce(rs, raw, weights, kind, reason, outcome, actor)
        return ("applied", change.insync_at, "") if not change.dry_run else None

    def _announce(
        self,
        rs: RecordSet,
        raw: Mapping[str, int | None],
        weights: Mapping[str, int],
        kind: Kind,
        reason: str,
        outcome: str,
        actor: str,
    ) -> None:
        before, after = shares({k: v or 0 for k, v in raw.items()}) if any(raw.values()) else {}, shares(weights)
        # The regions the action is about: those it takes share from (an evacuation, a rollback) or
        # gives share to (a ramp step, a restore). Every region whose share changed was counted,
        # and RegionshiftEvacuating paged for the region the traffic went to as well.
        sign = -1.0 if kind in ("evacuation", "rollback") else 1.0
        changed = tuple(
            sorted(
                {
                    m.region
                    for m in rs.members
                    if sign * (after[m.set_identifier] - before.get(m.set_identifier, 0.0)) > SHARE_EPSILON
                }
            )
        )
        self.publish(
            ActionTaken(
                at=self.clock(),
                record=rs.key,
                action=kind,
                actor=actor,
                outcome=outcome,
                reason=reason,
                weights=dict(weights),
                regions=changed,
            )
        )

    async def _paced(self, rs: RecordSet) -> tuple[float | None, str]:
        """The earliest time the next forward change to `rs` may be sent (guardrail 2), and why:
        the previous forward change's INSYNC + the record's TTL + that step's bake, all read from
        the audit log, so no restart, data gap or lost answer can shorten the wait. A change whose
        INSYNC was not seen is asked about (GetChange); one whose change id never came back (the
        answer was lost) counts from when it was found applied plus the longest INSYNC wait."""
        prev = await self.store.audit.last_forward(rs.key, FORWARD_KINDS)
        if prev is None:
            return None, "no forward change yet"
        if prev.outcome is None:
            return math.inf, f"the previous {prev.action} change (intent {prev.intent_id}) is not settled yet"
        insync = prev.insync_at
        if insync is None and prev.change_id is not None:
            try:
                done = await self.actuator.is_insync(prev.change_id)
            except TerminalError as exc:  # e.g. a change id Route 53 no longer knows: fall back below
                log.warning(
                    "cannot ask about the previous change", record=rs.key, change_id=prev.change_id, error=str(exc)
                )
            else:
                if not done:
                    return math.inf, f"the previous {prev.action} change {prev.change_id} is not INSYNC yet"
                insync = self.clock()  # seen now: at or after the moment it happened
                await self.store.audit.insync(prev.intent_id, prev.change_id, insync)
                log.info("previous change seen INSYNC", record=rs.key, change_id=prev.change_id, intent=prev.intent_id)
        if insync is None:
            found = max(prev.sent_at, prev.settled_at or prev.sent_at)
            allowance = self.config.controller.route53.insync_timeout
            insync = found + allowance
            basis = f"INSYNC not known: found applied at {_clock_text(found)}, + {allowance:g}s for INSYNC"
        else:
            basis = f"INSYNC at {_clock_text(insync)}"
        bake = self._bake_after(rs, prev.action)
        why = f"previous {prev.action} step {basis} + TTL {rs.ttl}s + bake {bake:g}s"
        return insync + rs.ttl + bake, why

    def _bake_after(self, rs: RecordSet, action: str) -> float:
        """How long a forward step of this kind bakes after its INSYNC + TTL."""
        if action == "forward":
            bakes = [p.bake for p in self.policy.ramps.values() if p.record_key == rs.key]
            return max(bakes, default=0.0)
        return self.policy.evacuation.step_bake

    async def _settle_open_intent(self, key: str, raw: Mapping[str, int | None], now: float) -> None:
        """An intent without result (a crash, or a request whose outcome was lost): Route 53 tells
        whether the write happened."""
        intent = await self.store.audit.open_intent(key)
        if intent is None:
            return
        if dict(raw) == intent.to_weights:
            await self.store.audit.result(intent.id, "applied", now, error="result recorded later: found applied")
            log.warning("settled an open intent: it was applied", record=key, intent=intent.id)
        elif dict(raw) == intent.from_weights:
            await self.store.audit.result(intent.id, "not_applied", now, error=NOT_APPLIED_LATER)
            log.warning("settled an open intent: it was not applied", record=key, intent=intent.id)

    async def _landed_late(self, key: str, raw: Mapping[str, int | None], now: float) -> bool:
        """Whether what Route 53 holds is a write of regionshift's own that landed after a restart
        settled it as not applied (its request was still in flight when the process stopped),
        within `insync_timeout` of its intent: recorded applied now, so it is not drift. It was
        taken for a hand edit, the audit trail blamed an operator, and a failing region kept the
        25% that step gave it until someone adopted the "edit"."""
        since = now - self.config.controller.route53.insync_timeout
        late = await self.store.audit.settled_unsent(key, raw, since)
        if late is None:
            return False
        await self.store.audit.result(
            late.id, "applied", now, error="landed after a restart settled it as not applied: sent before the stop"
        )
        log.warning("an earlier write landed late", record=key, intent=late.id, weights=dict(raw))
        return True

    async def _pause_ramps(self, key: str, why: str, now: float) -> None:
        for name, policy in self.policy.ramps.items():
            state = self.ramps[name]
            if policy.record_key == key and state.status in ("running", "baking"):
                await self._save(
                    name, replace(state, status="paused", resume_to=state.status, reason=f"paused: {why}"), now
                )

    async def _expected(self, key: str) -> tuple[dict[str, int] | None, bool]:
        """What Route 53 should hold for `key` (anything else is a hand edit), and whether
        regionshift wrote it: the weights last written, else the ones it first saw there (None
        before it has seen them)."""
        written = await self.store.audit.last_applied(key)
        if written is not None:
            return written, True
        return await self.store.flags.seen(key), False

    def _held_by_another_ramp(self, name: str, key: str) -> str | None:
        """Why ramp `name` must not start: another ramp holds `key` (it was called "an evacuation
        or its restore under way")."""
        owner = self._ramp_for(key)
        if owner is None or owner[0] == name:
            return None
        other = self.ramps[owner[0]]
        return f"ramp {owner[0]} holds {key} ({other.status}): abort it or let it finish before starting {name}"

    async def _away_from_home(self, key: str, now: float) -> str | None:
        """Why a ramp on `key` must not start now: the record set is away from its home shares (an
        evacuation or its restore under way). A ramp steps from the weights it starts on and
        makes its last step the new home: started during a restore, it left a region at 22.5%
        of the 50% it came back to, and nothing said so. None when it is home, or not read yet
        (the ramp then waits for its first read like any other)."""
        observed = self.views[key].observed
        rs = self.record_sets.get(key)
        if rs is None or not observed or not any(observed.values()):
            return None
        home = await self._home(rs, observed, now)
        if not any(home.values()):
            return None
        now_shares, home_shares = shares(observed), shares(home)
        pairs = [
            (m.region, now_shares.get(m.set_identifier, 0.0), home_shares.get(m.set_identifier, 0.0))
            for m in rs.members
        ]
        away = [
            f"{region} {held:.1f}% of its {due:.1f}%" for region, held, due in pairs if abs(held - due) > SHARE_EPSILON
        ]
        if not away:
            return None
        return (
            f"{key} is away from its home weights ({', '.join(away)}): an evacuation or its restore is under"
            " way; start the ramp once the record set is back home"
        )

    async def _home(self, rs: RecordSet, observed: Mapping[str, int], now: float) -> dict[str, int]:
        """The weights the record set holds when all is well: after the last ramp (or an adopted
        hand edit), else what Route 53 held when regionshift first saw it (remembered, so that an
        evacuation knows where to come back to). Configured weights that differ from those are
        said, never restored to: taken as home, they had a daemon's first minutes move traffic
        toward them ("restoring ...") with nothing ever evacuated."""
        stored = await self.store.flags.home(rs.key)
        if stored is not None:
            return stored
        if not any(observed.values()):  # an empty or all-zero group is no home to remember (not yet)
            return dict(observed)
        configured = rs.configured_weights
        if configured is not None and moved_share(observed, configured) > SHARE_EPSILON:
            log.warning(
                "Route 53 holds other weights than the configuration: taken as home, nothing is moved "
                "toward the configured ones",
                record=rs.key,
                route53=dict(observed),
                configured=configured,
                fix="give the configuration Route 53's weights; a ramp moves them",
            )
        await self.store.flags.set_home(rs.key, observed, now)
        return dict(observed)


async def checked_apply(
    actuator: Actuator,
    record_set: RecordSet,
    weights: Mapping[str, int],
    *,
    expected: Mapping[str, int] | None,
    kind: Kind,
    regions: Mapping[str, Region],
    verdicts: Mapping[str, Status],
    max_step: float,
    reason: str,
    now: float,
    group: Mapping[str, Mapping[str, Any]] | None = None,
    troubles: Mapping[str, frozenset[str]] | None = None,
    not_before: float | None = None,
    on_submitted: Callable[[str, float], Awaitable[None]] | None = None,
) -> ChangeResult:
    """Every guardrail in front of the actuator: a batch that breaks one raises `GuardrailError`
    and is never sent; one that passes goes to Route 53 as one batch."""
    if group is None:
        group = await actuator.read_group(record_set)
    observed = actuator.weights_of(record_set, group)
    if expected is None or observed == dict(expected):  # else the actuator refuses it as drift
        before = {k: v for k, v in observed.items() if v is not None}
        proposal = Proposal(record_set, before, dict(weights), kind, now, not_before)
        violations = check(proposal, regions, verdicts, max_step, troubles)
        if violations:
            raise GuardrailError(violations)
    return await actuator.apply(
        record_set,
        weights,
        expected=expected,
        comment=f"regionshift {kind}: {reason}",
        group=group,
        on_submitted=on_submitted,
    )


def _clock_text(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")
