"""The ramp planner on virtual time: steps, bakes after INSYNC + TTL, gates, rollback, operators."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.judging.verdicts import Verdict
from controller.planning.guardrails import Proposal, check
from controller.planning.ramps import RampState, View, act, applied, plan
from controller.planning.weights import shares
from controller.settings.policy import RampPolicy
from controller.settings.schema import Member, RecordSet, Region

T0 = 1_800_000_000.0
UNKNOWN = "eu-west-1 unknown (no fresh data, or a finding its peers cannot tell apart yet)"
TTL = 60
REGIONS = {r.name: r for r in [Region(name="us-east-1"), Region(name="eu-west-1"), Region(name="ap-southeast-2")]}
RS = RecordSet(
    zone_id="Z1",
    name="api.example.com",
    ttl=TTL,
    members=[
        Member(set_identifier=s, region=r, value="192.0.2.1")
        for s, r in (("use1", "us-east-1"), ("euw1", "eu-west-1"), ("apse2", "ap-southeast-2"))
    ],
)
POLICY = RampPolicy(
    record_set="api.example.com",
    waves=[["eu-west-1"]],
    steps=[1, 5, 10, 25, 50],
    bake=600,
    start_gate=300,
    wave_bake=600,
)
MAX_STEP = 25.0


@dataclass
class Sim:
    """A ramp against a simulated Route 53 that applies every write and is INSYNC at once."""

    policy: RampPolicy = POLICY
    observed: dict[str, int] = field(default_factory=lambda: {"use1": 1, "euw1": 0, "apse2": 0})
    now: float = T0
    state: RampState = field(default_factory=lambda: RampState("launch"))
    statuses: dict[str, tuple[str, float]] = field(default_factory=dict)
    writes: list[tuple[str, dict[str, int], str]] = field(default_factory=list)
    history: list[dict[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.statuses = dict.fromkeys(REGIONS, ("healthy", T0 - 3600))
        self.history.append(dict(self.observed))

    def set(self, region: str, status: str) -> None:
        if self.statuses[region][0] != status:
            self.statuses[region] = (status, self.now)

    def verdicts(self) -> dict[str, Verdict]:
        return {
            r: Verdict(r, s, (f"{r} is {s}",) if s != "healthy" else (), {}, since, self.now)
            for r, (s, since) in self.statuses.items()
        }

    def tick(self, seconds: float = 0.0) -> str:
        self.now += seconds
        verdicts = self.verdicts()
        p = plan(self.policy, self.state, View(self.now, RS, dict(self.observed), verdicts))
        self.state = p.state
        if p.weights is not None:
            if p.weights != self.observed:
                status = {r: v.status for r, v in verdicts.items()}
                violations = check(Proposal(RS, self.observed, p.weights, p.action), REGIONS, status, MAX_STEP)
                assert violations == [], (p.reason, violations)
                if p.action == "rollback":
                    assert p.weights in self.history, "a rollback lands on weights applied before"
                self.observed = dict(p.weights)
                self.history.append(dict(p.weights))
                self.writes.append((p.action, dict(p.weights), p.reason))
            self.state = applied(self.policy, self.state, insync_at=self.now, ttl=TTL)
        return p.reason

    def share(self, sid: str = "euw1") -> float:
        return round(shares(self.observed)[sid], 6)


def started(sim: Sim) -> Sim:
    sim.state, error = act(sim.policy, sim.state, "start", sim.now)
    assert error is None
    return sim


def test_a_launch_waits_for_the_start_gate_then_steps_with_bakes_after_insync_plus_ttl():
    sim = Sim()
    sim.statuses["eu-west-1"] = ("healthy", T0 - 100)  # healthy for 100s of the 300s start gate
    started(sim)
    assert sim.tick() == "waiting for the start gate: eu-west-1 healthy for 100s, 300s needed"
    assert sim.writes == []
    assert sim.tick(200) == "step 1 of 5: eu-west-1 to 1%"
    assert sim.observed == {"use1": 99, "euw1": 1, "apse2": 0}
    assert sim.state.status == "baking"
    assert sim.state.bake_until == sim.now + TTL + 600
    assert sim.tick(600) == "baking step 1 of 5: 60s left"  # the bake began after INSYNC + TTL
    shares_seen = []
    for _ in range(4):
        sim.tick(60 + 600)
        shares_seen.append(sim.share())
    assert shares_seen == [5.0, 10.0, 25.0, 50.0]
    assert sim.observed == {"use1": 1, "euw1": 1, "apse2": 0}
    assert sim.tick(TTL + 600) == "done: every step baked"
    assert sim.state.status == "done"
    assert [a for a, _, _ in sim.writes] == ["forward"] * 5


def test_other_regions_keep_their_proportions_of_the_rest():
    sim = started(Sim(observed={"use1": 3, "euw1": 0, "apse2": 1}))  # 75 / 25
    sim.tick()
    sim.tick(TTL + 600)  # 5%
    assert shares(sim.observed) == pytest.approx({"use1": 71.25, "euw1": 5.0, "apse2": 23.75})


def test_a_degraded_target_rolls_back_to_the_weights_before_the_ramp_at_once():
    sim = started(Sim())
    sim.tick()
    for _ in range(3):
        sim.tick(TTL + 600)
    assert sim.share() == 25.0
    sim.set("eu-west-1", "degraded")
    reason = sim.tick(10)
    assert reason == "rollback: eu-west-1 is degraded: eu-west-1 is degraded"
    assert sim.observed == {"use1": 1, "euw1": 0, "apse2": 0}  # one write, 25% -> 0%: back is fast
    assert sim.state.status == "rolled_back"
    assert sim.writes[-1][0] == "rollback"
    assert sim.tick(3600) == reason  # and it stays there
    assert len(sim.writes) == 5


def test_a_data_gap_right_after_a_step_never_shortens_its_wait_of_insync_plus_ttl_plus_bake():
    sim = started(Sim())
    sim.tick()  # 1%, INSYNC now: the next step is due at now + TTL + 600
    due = sim.now + TTL + 600
    sim.tick(8)
    sim.set("eu-west-1", "unknown")  # e.g. a restart 8 s after INSYNC: no results yet
    assert sim.tick(1) == f"holding: {UNKNOWN}; the bake restarts once it is healthy"
    assert sim.state.bake_until == due  # not now + bake, which is 51 s sooner
    sim.set("eu-west-1", "healthy")
    assert sim.tick(due - sim.now - 1) == "baking step 1 of 5: 1s left"
    sim.tick(1)
    assert sim.share() == 5.0


def test_a_target_without_fresh_data_holds_the_ramp_and_restarts_its_bake():
    sim = started(Sim())
    sim.tick()
    sim.tick(TTL + 600)  # 5%
    sim.set("eu-west-1", "unknown")  # e.g. the controller restarted and has no results yet
    assert sim.tick(TTL + 600) == f"holding: {UNKNOWN}; the bake restarts once it is healthy"
    assert (sim.share(), sim.state.status) == (5.0, "baking")  # neither forward nor back
    sim.set("eu-west-1", "healthy")
    assert sim.tick(599) == "baking step 2 of 5: 1s left"  # the whole bake again, healthy throughout
    sim.tick(1)
    assert sim.share() == 10.0


def test_after_a_restart_a_pending_step_waits_for_fresh_data_and_is_dropped_if_the_target_failed():
    sim = started(Sim())
    asked = plan(POLICY, sim.state, View(sim.now, RS, dict(sim.observed), sim.verdicts()))
    restored = RampState.from_json(asked.state.to_json())  # crashed before the write was sent
    sim.state = restored
    sim.set("eu-west-1", "unknown")  # no data yet after the restart
    assert sim.tick(1) == f"holding step 1 of 5: eu-west-1 to 1%: {UNKNOWN}"
    assert sim.writes == []
    sim.set("eu-west-1", "degraded")
    sim.tick(1)
    assert sim.writes == []  # the step is dropped, not sent to a degraded region
    assert sim.state.pending is None


def test_a_rolled_back_ramp_may_resume_once_the_target_has_recovered():
    sim = started(Sim(policy=POLICY.model_copy(update={"resume_after_rollback": True})))
    sim.tick()
    sim.tick(TTL + 600)
    sim.set("eu-west-1", "degraded")
    sim.tick(1)
    assert sim.state.status == "rolled_back"
    sim.set("eu-west-1", "healthy")
    sim.tick(100)
    assert sim.state.status == "rolled_back"  # 100s of 300s healthy
    assert sim.tick(250) == "step 1 of 5: eu-west-1 to 1%"
    assert sim.state.status == "baking"


def test_step_back_returns_one_step_and_pause_holds():
    sim = started(Sim(policy=POLICY.model_copy(update={"on_failure": "step-back"})))
    sim.tick()
    sim.tick(TTL + 600)
    sim.tick(TTL + 600)  # 10%
    sim.set("eu-west-1", "degraded")
    assert sim.tick(1) == "step back to 5%: eu-west-1 is degraded: eu-west-1 is degraded"
    assert sim.share() == 5.0

    paused = started(Sim(policy=POLICY.model_copy(update={"on_failure": "pause"})))
    paused.tick()
    paused.set("eu-west-1", "unhealthy")
    assert paused.tick(1) == "paused: eu-west-1 is unhealthy: eu-west-1 is unhealthy"
    assert paused.share() == 1.0
    assert paused.state.status == "paused"


def test_another_region_degrading_pauses_instead_of_sending_traffic_back_to_it():
    sim = started(Sim(observed={"use1": 1, "euw1": 0, "apse2": 1}))
    sim.tick()
    sim.set("us-east-1", "degraded")
    assert sim.tick(1) == "paused: us-east-1 became degraded during the ramp"
    assert sim.state.status == "paused"
    assert len(sim.writes) == 1


def test_operators_pause_resume_and_abort():
    sim = started(Sim())
    sim.tick()
    sim.state, error = act(POLICY, sim.state, "pause", sim.now)
    assert error is None
    assert sim.tick(TTL + 601) == "paused by an operator"
    assert sim.share() == 1.0
    sim.state, error = act(POLICY, sim.state, "resume", sim.now)
    assert (error, sim.state.status, sim.state.bake_until) == (None, "baking", sim.now + 600)  # bake starts over
    sim.state, error = act(POLICY, sim.state, "abort", sim.now)
    assert error is None
    assert sim.tick() == "aborted by an operator: back to the weights before the ramp"
    assert sim.observed == {"use1": 1, "euw1": 0, "apse2": 0}
    assert sim.state.status == "aborted"
    assert act(POLICY, sim.state, "pause", sim.now)[1] == "cannot pause a ramp that is aborted"
    assert act(POLICY, sim.state, "resume", sim.now)[1] == "cannot resume a ramp that is aborted"


def test_waves_follow_each_other_after_the_wave_bake():
    policy = POLICY.model_copy(update={"waves": [["eu-west-1"], ["ap-southeast-2"]], "steps": [10, 25]})
    sim = started(Sim(policy=policy))
    sim.tick()
    sim.tick(TTL + 600)
    assert sim.share("euw1") == 25.0
    assert sim.tick(TTL + 600).startswith("wave 1 done; next wave in 600s")
    assert sim.tick(600) == "wave 2 of 2, step 1 of 2: ap-southeast-2 to 10%"
    assert shares(sim.observed) == pytest.approx({"use1": 67.5, "euw1": 22.5, "apse2": 10.0})


def test_a_restart_with_a_pending_write_asks_for_the_same_weights_again():
    sim = started(Sim())
    view = View(sim.now, RS, dict(sim.observed), sim.verdicts())
    first = plan(POLICY, sim.state, view)
    assert first.state.pending is not None
    restored = RampState.from_json(first.state.to_json())  # what the store holds across a crash
    again = plan(POLICY, restored, view)
    assert (again.weights, again.action, again.reason) == (first.weights, first.action, first.reason)


STATUSES = ["healthy", "degraded", "unhealthy", "unknown"]
events = st.lists(
    st.one_of(
        st.tuples(st.just("verdict"), st.sampled_from(sorted(REGIONS)), st.sampled_from(STATUSES)),
        st.tuples(st.just("act"), st.sampled_from(["start", "pause", "resume", "abort"]), st.just("")),
        st.tuples(st.just("tick"), st.floats(0, 2000), st.just("")),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    events, st.sampled_from(["rollback", "step-back", "pause"]), st.sampled_from([[1, 5, 10, 25, 50], [10, 20], [25]])
)
def test_every_write_keeps_the_guardrails_and_rollbacks_land_on_applied_weights(events, on_failure, steps):
    # Sim.tick asserts both on every write it makes.
    sim = Sim(
        policy=POLICY.model_copy(update={"on_failure": on_failure, "steps": steps, "resume_after_rollback": True})
    )
    for kind, a, b in events:
        if kind == "verdict":
            sim.set(a, b)
        elif kind == "act":
            sim.state, _ = act(sim.policy, sim.state, a, sim.now)
        sim.tick(a if kind == "tick" else 1.0)
    assert all(0 <= w <= 255 for w in sim.observed.values())
    assert any(sim.observed.values())
