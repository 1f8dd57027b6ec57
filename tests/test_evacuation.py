"""Evacuation on virtual time: away from a degraded region step by step, back after sustained health."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.judging.verdicts import Verdict
from controller.planning.evacuation import plan_evacuation
from controller.planning.guardrails import Proposal, check
from controller.planning.weights import shares
from controller.settings.policy import EvacuationPolicy
from controller.settings.schema import Member, RecordSet, Region

T0 = 1_800_000_000.0
REGIONS = {
    r.name: r
    for r in [
        Region(name="us-east-1"),
        Region(name="eu-west-1"),
        Region(name="ap-southeast-2", type="lightweight", max_share=40),
    ]
}
RS = RecordSet(
    zone_id="Z1",
    name="api.example.com",
    members=[
        Member(set_identifier=s, region=r, value="192.0.2.1")
        for s, r in (("use1", "us-east-1"), ("euw1", "eu-west-1"), ("apse2", "ap-southeast-2"))
    ],
)
HOME = {"use1": 2, "euw1": 1, "apse2": 1}  # 50 / 25 / 25
POLICY = EvacuationPolicy(restore_after=600, blind_fraction=0.5, confirm_after=0)
MAX_STEP = 10.0


def verdicts(now, **statuses):
    return {
        r: Verdict(
            r,
            statuses.get(r.replace("-", "_"), ("healthy", T0 - 3600))[0],
            (),
            {},
            statuses.get(r.replace("-", "_"), ("healthy", T0 - 3600))[1],
            now,
        )
        for r in REGIONS
    }


def step(observed, now, **statuses):
    v = verdicts(now, **statuses)
    result = plan_evacuation(RS, HOME, observed, v, REGIONS, POLICY, MAX_STEP, now)
    if result.weights is not None:
        status = {r: x.status for r, x in v.items()}
        assert check(Proposal(RS, observed, result.weights, result.action), REGIONS, status, MAX_STEP) == []
    return result


def test_a_degraded_region_is_evacuated_step_by_step_onto_healthy_regions():
    observed, now = dict(HOME), T0
    bad = {"eu_west_1": ("degraded", T0)}
    seen = []
    while True:
        result = step(observed, now, **bad)
        if result.weights is None:
            break
        assert result.action == "evacuation"
        observed = result.weights
        seen.append(round(shares(observed)["euw1"], 2))
        now += 70
    assert seen == [15.08, 5.16, 0.0]  # 25% off in steps of at most 10% (9.92% in whole weight units)
    final = shares(observed)
    assert final["use1"] == pytest.approx(66.67, abs=0.5)  # in proportion to home, 2:1, in whole units
    assert final["apse2"] == pytest.approx(33.33, abs=0.5)
    assert (
        step(observed, now, **bad).reason
        == "waiting to restore eu-west-1 (degraded, healthy 0s): 600s of health needed"
    )


def test_a_lightweight_region_takes_no_more_than_its_max_share():
    observed, now = dict(HOME), T0
    bad = {"us_east_1": ("unhealthy", T0), "eu_west_1": ("degraded", T0)}
    while (result := step(observed, now, **bad)).weights is not None:
        observed = result.weights
    final = shares(observed)
    assert final["apse2"] == pytest.approx(40.0, abs=0.5)  # as far as its cap allows
    assert final["apse2"] <= 40.0
    assert final["use1"] + final["euw1"] == pytest.approx(60.0, abs=0.5)  # the rest has nowhere to go: it stays


def test_share_comes_back_only_after_restore_after_of_health():
    observed = {"use1": 2, "euw1": 0, "apse2": 1}
    recovered = {"eu_west_1": ("healthy", T0)}
    assert step(observed, T0 + 300, **recovered).reason.startswith(
        "waiting to restore eu-west-1 (healthy, healthy 300s)"
    )
    result = step(observed, T0 + 600, **recovered)
    assert result.action == "restore"
    assert shares(result.weights)["euw1"] == pytest.approx(10.0, abs=0.5)
    while result.weights is not None:
        observed = result.weights
        result = step(observed, T0 + 700, **recovered)
    assert shares(observed) == pytest.approx(shares(HOME), abs=0.5)
    # Back at the home shares in weights of its own: said so, not "waiting to restore nothing"
    # (what a user saw for as long as they watched after a restore to 127/127 from home 1/1).
    done = step({"use1": 128, "euw1": 64, "apse2": 64}, T0 + 800, **recovered)
    assert (done.weights, done.reason) == (None, "at home shares (use1=128 euw1=64 apse2=64: the home weights' shares)")


def test_blind_or_all_bad_holds_the_weights():
    blind = step(dict(HOME), T0, us_east_1=("unknown", T0), eu_west_1=("unknown", T0))
    assert (blind.weights, blind.blind) == (None, True)
    assert blind.reason == "blind: 2 of 3 regions unknown (no fresh data for eu-west-1, us-east-1); holding the weights"
    # Unknown for a trouble they show alike (every probe failing everywhere): said so, not "no data".
    v = verdicts(T0, us_east_1=("unknown", T0), eu_west_1=("unknown", T0))
    v["us-east-1"] = replace(v["us-east-1"], troubles=frozenset({"orders"}))
    alike = plan_evacuation(RS, HOME, dict(HOME), v, REGIONS, POLICY, MAX_STEP, T0)
    assert (alike.weights, alike.blind) == (None, True)
    assert alike.reason == (
        "blind: 2 of 3 regions unknown (no fresh data for eu-west-1; us-east-1 failing alike (a cause they share));"
        " holding the weights"
    )
    all_bad = step(
        dict(HOME), T0, us_east_1=("degraded", T0), eu_west_1=("unhealthy", T0), ap_southeast_2=("degraded", T0)
    )
    assert all_bad.weights is None
    assert all_bad.reason == "every region that could take traffic looks bad; holding the weights"


statuses = st.sampled_from(["healthy", "degraded", "unhealthy", "unknown"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(statuses, statuses, statuses, st.floats(0, 900)), max_size=40),
    st.dictionaries(st.sampled_from(["use1", "euw1", "apse2"]), st.integers(0, 255), min_size=3, max_size=3),
)
def test_every_evacuation_and_restore_step_keeps_the_guardrails(sequence, start):
    if not any(start.values()):
        start["use1"] = 1
    observed, now = dict(start), T0
    since = dict.fromkeys(REGIONS, ("healthy", T0 - 3600))
    for a, b, c, dt in sequence:
        now += dt
        for region, status in zip(REGIONS, (a, b, c), strict=True):
            if since[region][0] != status:
                since[region] = (status, now)
        result = step(observed, now, **{r.replace("-", "_"): v for r, v in since.items()})  # asserts the guardrails
        if result.weights is not None:
            observed = result.weights
        assert any(observed.values())


def test_share_starts_to_move_only_once_the_region_has_been_bad_for_confirm_after():
    policy = EvacuationPolicy(restore_after=600, confirm_after=30)
    bad = {"eu_west_1": ("unhealthy", T0)}
    waiting = plan_evacuation(RS, HOME, dict(HOME), verdicts(T0 + 29, **bad), REGIONS, policy, MAX_STEP, T0 + 29)
    assert (waiting.weights, waiting.reason) == (
        None,
        "confirming eu-west-1 (unhealthy, bad for 29s): 30s before share moves",
    )
    moving = plan_evacuation(RS, HOME, dict(HOME), verdicts(T0 + 30, **bad), REGIONS, policy, MAX_STEP, T0 + 30)
    assert moving.action == "evacuation"


def test_a_region_moving_between_degraded_and_unhealthy_is_confirmed_from_when_it_first_went_bad():
    # A region failing about half its requests moves between the two every few seconds; each
    # move restarted `since`, and with confirm_after 30 s it kept half the traffic for good.
    policy = EvacuationPolicy(restore_after=600, confirm_after=30)
    now = T0 + 40
    flipping = {**verdicts(now), "eu-west-1": Verdict("eu-west-1", "degraded", (), {}, now - 4, now, bad_since=T0)}
    moving = plan_evacuation(RS, HOME, dict(HOME), flipping, REGIONS, policy, MAX_STEP, now)
    assert moving.action == "evacuation", moving.reason
