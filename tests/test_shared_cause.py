"""Guardrail 6 from results to weights: a fault every region shares is held against none of them,
and share never moves onto a region that shows the trouble of the one losing it. The judge runs
the shipped detectors on results fed on simulated time (one vantage, as a deployment without
agents has); the evacuation and ramp planners turn its verdicts into weights."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.judging.detectors import detectors_for
from controller.judging.verdicts import Judge, Verdict
from controller.judging.windows import WindowStore
from controller.planning.evacuation import plan_evacuation
from controller.planning.ramps import Pending, RampState, View, plan
from controller.planning.weights import shares
from controller.settings.policy import EvacuationPolicy, RampPolicy
from controller.settings.schema import Member, RecordSet, Region
from probes.results import Result
from tests.conftest import SHIPPED_VERDICTS

POLICY = SHIPPED_VERDICTS
REGIONS = ("us-east-1", "eu-west-1", "ap-south-1")
PROBES = ("healthz", "orders")
VANTAGE = "controller"
T0 = 1_800_000_000.0
WARM_UP = 90  # seconds of health first: full windows, as in a daemon that has run a while
RS = RecordSet(
    zone_id="Z1",
    name="api.example.com",
    ttl=60,
    members=[Member(set_identifier=r, region=r, value="192.0.2.1") for r in REGIONS],
)
HOME = {"us-east-1": 100, "eu-west-1": 100, "ap-south-1": 100}
CONFIRM = 0.0  # evacuation.confirm_after
RAMPED = {"us-east-1": 95, "eu-west-1": 10, "ap-south-1": 95}  # eu-west-1 at 5%, baking


def result(region: str, probe: str, at: float, ok: bool, latency: float = 0.02) -> Result:
    return Result(region, probe, VANTAGE, at, ok, latency, error_class=None if ok else "status")


class World:
    """Results in, one judgement a second, the planners' answers out."""

    def __init__(self) -> None:
        self.windows = WindowStore(POLICY.history)
        self.judge = Judge(detectors_for(POLICY), dict.fromkeys(REGIONS, PROBES), POLICY)
        self.now = T0
        self.ramp_policy = RampPolicy(record_set=RS.name, waves=[["eu-west-1"]], steps=[1, 5, 10], bake=3600)
        self.regions = {r: Region(name=r) for r in REGIONS}

    def second(self, outcomes: dict[str, dict[str, bool]], offsets: dict[str, float] | None = None) -> None:
        """One probe round: outcomes[region][probe], each region's results arriving `offsets`
        into it. With offsets, the judge also runs right after each arrival: the moments when
        one region has a result its peers have not had yet."""
        start = self.now
        for region in sorted(outcomes, key=lambda r: (offsets or {}).get(r, 0.0)):
            at = start + (offsets or {}).get(region, 0.0)
            for probe, ok in outcomes[region].items():
                self.windows.add(result(region, probe, at, ok))
            if offsets is not None:
                self.at(at + 0.001)
                self.after_each()
        self.at(start + 1.0)

    def at(self, now: float) -> None:
        self.now = now
        self.windows.trim(now)
        self.judge.judge(self.windows, now)

    def after_each(self) -> None:
        """What to check after each judgement within a round."""

    def healthy(self, seconds: int) -> None:
        for _ in range(seconds):
            self.second({r: dict.fromkeys(PROBES, True) for r in REGIONS})

    def moves(self) -> list[str]:
        """What the planners would send now: evacuation at home weights, and a ramp mid-bake."""
        verdicts = self.judge.verdicts
        found = []
        evac = plan_evacuation(
            RS,
            HOME,
            HOME,
            verdicts,
            self.regions,
            EvacuationPolicy(restore_after=600, confirm_after=CONFIRM),
            25.0,
            self.now,
        )
        if evac.weights is not None and evac.weights != HOME:
            found.append(f"evacuation {evac.weights}: {evac.reason}")
        state = RampState(
            "launch",
            "baking",
            step=1,
            baseline=HOME,
            bake_until=self.now + 3600,
            healthy_others=("us-east-1", "ap-south-1"),
        )
        ramp = plan(self.ramp_policy, state, View(self.now, RS, RAMPED, verdicts))
        if ramp.weights is not None and ramp.weights != RAMPED:
            found.append(f"ramp {ramp.action} {ramp.weights}: {ramp.reason}")
        return found


def test_a_region_down_while_its_peers_answer_turns_unhealthy_within_down_after_rounds():
    world = World()
    world.healthy(WARM_UP)
    for n in range(1, POLICY.down_after + 1):
        world.second({**{r: dict.fromkeys(PROBES, True) for r in REGIONS}, "eu-west-1": dict.fromkeys(PROBES, False)})
        status = world.judge.verdicts["eu-west-1"].status
        assert status == ("unhealthy" if n == POLICY.down_after else "healthy"), (n, world.judge.verdicts["eu-west-1"])
    reasons = world.judge.verdicts["eu-west-1"].reasons
    assert (
        "healthz: the last 3 results from controller all failed (status x3), down as a whole, "
        "worse than ap-south-1, us-east-1"
    ) in reasons
    assert world.moves()  # evacuation and rollback both act on it


def test_three_failures_in_a_row_are_not_held_against_a_region_whose_peers_fail_the_same_probe():
    # The fault every region shares, at 50%: eu-west-1 happens to fail three in a row while its
    # peers fail as often, just not in a row. Its verdict names the shared cause; nothing moves.
    world = World()
    world.healthy(WARM_UP)
    rounds = [
        {"us-east-1": False, "eu-west-1": True, "ap-south-1": True},
        {"us-east-1": True, "eu-west-1": False, "ap-south-1": False},
        {"us-east-1": False, "eu-west-1": False, "ap-south-1": True},
        {"us-east-1": True, "eu-west-1": False, "ap-south-1": False},
    ]
    for orders in rounds:
        world.second({r: {"healthz": True, "orders": ok} for r, ok in orders.items()})
        assert all(v.status in ("healthy", "unknown") for v in world.judge.verdicts.values())
        assert world.moves() == []
    # Not held against it, and not healthy either: a probe whose every result fails is unknown.
    verdict = world.judge.verdicts["eu-west-1"]
    assert verdict.status == "unknown"
    assert (
        "orders: the last 3 results from controller all failed (status x3), like ap-south-1, us-east-1: "
        "a shared cause, not held"
    ) in verdict.reasons
    assert all(v.troubles == {"orders"} for v in world.judge.verdicts.values())


def test_one_stray_failure_at_a_peer_does_not_delay_a_down_verdict_while_another_peer_answers():
    world = World()
    world.healthy(WARM_UP)
    everyone_up = {r: dict.fromkeys(PROBES, True) for r in REGIONS}
    down = dict.fromkeys(PROBES, False)
    world.second({**everyone_up, "eu-west-1": down, "us-east-1": down})  # us-east-1: one round of noise
    statuses = [world.judge.verdicts["eu-west-1"].status]
    for _ in range(2 * POLICY.down_after):
        world.second({**everyone_up, "eu-west-1": down})
        statuses.append(world.judge.verdicts["eu-west-1"].status)
    # From round 3 eu-west-1 is down. us-east-1 failed within twice the span of its last 3
    # failures, but ap-south-1 answered throughout: a region down is a shared cause only when
    # every peer fails too (with half of them, until stop 32, it waited two rounds "unknown").
    assert statuses == ["healthy", "healthy", "unhealthy", "unhealthy", "unhealthy", "unhealthy", "unhealthy"]
    assert world.judge.verdicts["us-east-1"].status == "healthy"


def test_an_agent_cut_off_with_its_region_blames_the_region_and_marks_no_other():
    # Agents inside each region: eu-west-1 goes dark, and its own agent can then reach nothing.
    # Every vantage sees eu-west-1 down; only agent-eu-west-1 sees the other regions fail.
    vantages = ("controller", "agent-us-east-1", "agent-eu-west-1", "agent-ap-south-1")
    world = World()
    for _ in range(WARM_UP):
        for v in vantages:
            for r in REGIONS:
                for probe in PROBES:
                    world.windows.add(Result(r, probe, v, world.now, ok=True, latency=0.02))
        world.at(world.now + 1.0)
    for n in range(1, POLICY.down_after + 1):
        for v in vantages:
            for r in REGIONS:
                ok = r != "eu-west-1" and v != "agent-eu-west-1"
                for probe in PROBES:
                    world.windows.add(Result(r, probe, v, world.now, ok, 0.02, error_class=None if ok else "timeout"))
        world.at(world.now + 1.0)
        if n < POLICY.down_after:  # not blamed yet (not healthy either while peers cannot tell it apart)
            assert world.judge.verdicts["eu-west-1"].status in ("healthy", "unknown")
    verdicts = world.judge.verdicts
    assert verdicts["eu-west-1"].status == "unhealthy", verdicts["eu-west-1"].reasons
    assert (verdicts["us-east-1"].status, verdicts["us-east-1"].troubles) == ("healthy", frozenset())
    assert (verdicts["ap-south-1"].status, verdicts["ap-south-1"].troubles) == ("healthy", frozenset())
    assert any(m.startswith("evacuation") for m in world.moves())


def test_a_region_down_as_a_whole_is_no_shared_cause_for_another_failing_one_path():
    # ap-south-1 is down (every probe refused) for a minute, then comes back; meanwhile
    # eu-west-1 fails 2 of every 5 orders and answers healthz. ap-south-1's orders failures are
    # its outage, not a cause it shares with eu-west-1: it fails healthz too, which eu-west-1
    # answers. Counted as alike, they made eu-west-1 "healthy (a shared cause)" for 116 s, and
    # a ramp could have given it share all that while.
    world = World()
    world.healthy(WARM_UP)
    statuses = []
    for second in range(120):
        world.second(
            {
                "us-east-1": dict.fromkeys(PROBES, True),
                "eu-west-1": {"healthz": True, "orders": second % 5 not in (1, 3)},
                "ap-south-1": dict.fromkeys(PROBES, second >= 60),
            }
        )
        statuses.append(world.judge.verdicts["eu-west-1"].status)
        if second == 30:  # evacuated onto us-east-1, the one region answering; no ramp step onto it
            moves = world.moves()
            assert any(m.startswith("evacuation") and "eu-west-1 (degraded)" in m for m in moves), moves
            assert not any(m.startswith("ramp forward") for m in moves), moves
            reasons = world.judge.verdicts["eu-west-1"].reasons
            assert any("leaving out ap-south-1: down, or failing where this region answers" in r for r in reasons), (
                reasons
            )
            assert not any("shared cause" in r for r in reasons), reasons
    first = statuses.index("degraded")
    assert first <= 30, statuses
    assert set(statuses[:first]) <= {"healthy", "unknown"}
    assert set(statuses[first:]) == {"degraded"}, statuses  # held while ap-south-1 is down and back


def test_two_of_three_regions_down_are_evacuated_onto_the_one_that_answers():
    # Two regions refuse every request; the third answers. Each down region was "a shared cause"
    # with the other (half of its peers alike), so neither was held, the evacuation called it
    # blind, and two thirds of the traffic stayed on them for as long as they were down.
    world = World()
    world.healthy(WARM_UP)
    down = dict.fromkeys(PROBES, False)
    for _ in range(POLICY.down_after):
        world.second({"us-east-1": down, "eu-west-1": down, "ap-south-1": dict.fromkeys(PROBES, True)})
    verdicts = world.judge.verdicts
    assert [verdicts[r].status for r in REGIONS] == ["unhealthy", "unhealthy", "healthy"], {
        r: v.reasons for r, v in verdicts.items()
    }
    assert (
        "healthz: the last 3 results from controller all failed (status x3), down as a whole, worse than ap-south-1"
        in (verdicts["us-east-1"].reasons)
    )
    moves = world.moves()
    assert any(m.startswith("evacuation") and "'ap-south-1': 175" in m for m in moves), moves  # 25% a step
    # And they stay held while they are down: the peers pooled against one of them were those
    # that answer, not the other one down (pooled with it, the two went "unknown" a second
    # later, "like eu-west-1: a shared cause", and the evacuation stopped).
    for _ in range(round(POLICY.window)):
        world.second({"us-east-1": down, "eu-west-1": down, "ap-south-1": dict.fromkeys(PROBES, True)})
        now = world.judge.verdicts
        assert [now[r].status for r in REGIONS] == ["unhealthy", "unhealthy", "healthy"], {
            r: v.reasons for r, v in now.items()
        }


def test_a_shared_fault_that_is_over_leaves_no_trouble_behind():
    # Every region failed orders together (never held against one), then healed: the patient
    # error test kept each probe "leaning" for its 10-minute horizon, and a restore between
    # regions healthy for minutes waited all that while on "a shared cause".
    world = World()
    world.healthy(WARM_UP)
    for _ in range(20):
        world.second({r: {"healthz": True, "orders": False} for r in REGIONS})
    assert all(v.troubles == {"orders"} for v in world.judge.verdicts.values())
    world.healthy(round(2 * POLICY.window))
    verdicts = world.judge.verdicts
    assert {r: (v.status, v.troubles) for r, v in verdicts.items()} == dict.fromkeys(REGIONS, ("healthy", frozenset()))
    assert all(any("fault over" in reason for reason in v.reasons) for v in verdicts.values())


shared_round = st.tuples(
    st.booleans(),  # healthz ok, in every region
    st.booleans(),  # orders ok, in every region
    st.lists(st.floats(0.0, 0.9), min_size=3, max_size=3),  # when each region's results arrive
)


@settings(max_examples=60, deadline=None)
@given(st.lists(shared_round, min_size=1, max_size=60))
def test_weights_never_move_on_any_fault_every_region_shares(rounds):
    world = World()
    world.healthy(WARM_UP)
    moved: list[tuple[float, list[str]]] = []
    world.after_each = lambda: moved.extend([(world.now, m)] if (m := world.moves()) else [])
    for healthz, orders, offsets in rounds:
        world.second(
            {r: {"healthz": healthz, "orders": orders} for r in REGIONS},
            dict(zip(REGIONS, offsets, strict=True)),
        )
        if m := world.moves():
            moved.append((world.now, m))
        assert moved == [], (moved, {r: (v.status, v.reasons) for r, v in world.judge.verdicts.items()})


def test_pending_forward_step_waits_while_target_and_the_region_losing_share_show_the_same_trouble():
    world = World()
    world.healthy(WARM_UP)
    for orders in (False, True, False, True):  # both fail orders now and then: a shared cause
        world.second({r: {"healthz": True, "orders": orders} for r in REGIONS})
    pending = Pending(dict(RAMPED), "forward", "baking", 1, "step 2 of 3: eu-west-1 to 5%")
    state = RampState("launch", "running", baseline=HOME, pending=pending)
    at_one_percent = {"us-east-1": 99, "eu-west-1": 2, "ap-south-1": 99}
    step = plan(world.ramp_policy, state, View(world.now, RS, at_one_percent, world.judge.verdicts))
    assert step.weights is None
    assert step.reason.startswith("holding step 2 of 3: eu-west-1 to 5%: eu-west-1 shows the same trouble as ")


statuses = st.sampled_from(["healthy", "degraded", "unhealthy", "unknown"])
weights = st.integers(0, 255)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.tuples(statuses, statuses, statuses), st.floats(0, 900), st.frozensets(st.sampled_from(PROBES))),
        min_size=1,
        max_size=30,
    ),
    st.tuples(weights, weights, weights),
    st.sampled_from(["evacuation", "bake over", "target failing"]),
)
def test_no_planner_moves_share_when_every_region_shows_the_same_trouble(sequence, start, planner):
    """Any verdicts, as long as every region shows trouble on `orders` (held against it or
    not): evacuations, restores and ramp steps all hold. A rollback may still go back to the
    weights before the ramp (known good, at once), never onto a region that is not healthy."""
    observed = dict(zip(REGIONS, start, strict=True))
    if not any(observed.values()):
        observed["us-east-1"] = 1
    now, since = T0, dict.fromkeys(REGIONS, ("healthy", T0 - 3600))
    regions = {r: Region(name=r) for r in REGIONS}
    ramp_policy = RampPolicy(record_set=RS.name, waves=[["eu-west-1"]], steps=[1, 5, 10, 25], bake=60)
    for status_of, dt, extra in sequence:
        now += dt
        for region, status in zip(REGIONS, status_of, strict=True):
            if since[region][0] != status:
                since[region] = (status, now)
        verdicts = {r: Verdict(r, s, (), {}, at, now, frozenset({"orders"}) | extra) for r, (s, at) in since.items()}
        if planner == "evacuation":
            plan_ = plan_evacuation(RS, HOME, observed, verdicts, regions, EvacuationPolicy(restore_after=0), 25.0, now)
            moved = plan_.weights
        else:
            bake_until = now - 1 if planner == "bake over" else now + 3600
            state = RampState("launch", "baking", step=1, baseline=HOME, bake_until=bake_until)
            ramp = plan(ramp_policy, state, View(now, RS, observed, verdicts))
            moved = ramp.weights
            if ramp.action == "rollback":
                assert moved == HOME
                before, after = shares(observed), shares(HOME)
                assert all(verdicts[r].status == "healthy" for r in REGIONS if after[r] > before[r] + 1e-9)
                continue
        # The same shares in other whole numbers (a rollback to equal weights) move nothing.
        assert moved is None or shares(moved) == pytest.approx(shares(observed)), (planner, moved, observed)
