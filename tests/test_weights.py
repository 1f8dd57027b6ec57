"""Shares to weights, and the guardrails every batch must pass."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.planning.guardrails import Proposal, check, moved_share
from controller.planning.weights import shares, to_weights
from controller.settings.limits import MAX_WEIGHT
from controller.settings.schema import Member, RecordSet, Region


@pytest.mark.parametrize(
    ("intended", "weights"),
    [
        ({"use1": 99, "euw1": 1}, {"use1": 99, "euw1": 1}),
        ({"use1": 95, "euw1": 5}, {"use1": 19, "euw1": 1}),
        ({"use1": 90, "euw1": 10}, {"use1": 9, "euw1": 1}),
        ({"use1": 75, "euw1": 25}, {"use1": 3, "euw1": 1}),
        ({"use1": 50, "euw1": 50}, {"use1": 1, "euw1": 1}),
        ({"use1": 100, "euw1": 0}, {"use1": 1, "euw1": 0}),
        ({"a": 1, "b": 49.5, "c": 49.5}, {"a": 2, "b": 99, "c": 99}),
    ],
)
def test_ramp_shares_come_out_exact(intended, weights):
    allocation = to_weights(intended)
    assert allocation.weights == weights
    assert allocation.max_error == pytest.approx(0, abs=1e-9)


def test_a_share_route53_cannot_express_is_as_close_as_255_allows_and_says_so():
    allocation = to_weights({"use1": 99.9, "euw1": 0.1})
    assert allocation.weights == {"use1": 255, "euw1": 1}
    assert allocation.achieved["euw1"] == pytest.approx(100 / 256)
    assert allocation.max_error == pytest.approx(100 / 256 - 0.1)


@pytest.mark.parametrize("intended", [{}, {"a": 0, "b": 0}, {"a": -1, "b": 101}])
def test_impossible_intents_are_refused(intended):
    with pytest.raises(ValueError, match=r"member|share"):
        to_weights(intended)


def test_all_zero_splits_equally_as_route53_does():
    assert shares({"a": 0, "b": 0}) == {"a": 50.0, "b": 50.0}


share_maps = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 100, allow_nan=False), min_size=1, max_size=4
).filter(lambda d: sum(d.values()) > 0.01)


@settings(max_examples=300, deadline=None)
@given(share_maps)
def test_weights_are_valid_and_keep_zero_and_nonzero_apart(intended):
    allocation = to_weights(intended)
    assert all(isinstance(w, int) and 0 <= w <= MAX_WEIGHT for w in allocation.weights.values())
    assert any(allocation.weights.values())
    for key, share in intended.items():
        assert (allocation.weights[key] > 0) == (share > 0)
    # Never worse than the naive scaling to 255 (rounded, at least 1 where wanted).
    total = sum(intended.values())
    naive = {k: (max(1, round(v / total * MAX_WEIGHT)) if v > 0 else 0) for k, v in intended.items()}
    naive_error = max(abs(shares(naive)[k] - 100 * intended[k] / total) for k in intended)
    assert allocation.max_error <= naive_error + 1e-9


# --- guardrails -------------------------------------------------------------------------------

REGIONS = {
    r.name: r
    for r in [
        Region(name="us-east-1", residency="US"),
        Region(name="eu-west-1", residency="EU"),
        Region(name="eu-central-1", residency="EU", type="lightweight", max_share=20),
        Region(name="eu-north-1", residency="EU", type="read-only"),
    ]
}
HEALTHY = dict.fromkeys(REGIONS, "healthy")


def record_set(residency=None, takes_writes=True, regions=("us-east-1", "eu-west-1")) -> RecordSet:
    return RecordSet(
        zone_id="Z1",
        name="api.example.com",
        residency=residency,
        takes_writes=takes_writes,
        members=[Member(set_identifier=r, region=r, value="192.0.2.1") for r in regions],
    )


def rules(rs, before, after, kind="forward", verdicts=HEALTHY, max_step=10.0):
    return [v.rule for v in check(Proposal(rs, before, after, kind), REGIONS, verdicts, max_step)]


def test_a_small_forward_step_to_a_healthy_region_passes():
    assert rules(record_set(), {"us-east-1": 99, "eu-west-1": 1}, {"us-east-1": 19, "eu-west-1": 1}) == []


def test_a_forward_step_larger_than_max_step_is_refused_but_a_rollback_may_jump():
    before, after = {"us-east-1": 3, "eu-west-1": 1}, {"us-east-1": 1, "eu-west-1": 1}  # 25% -> 50%
    assert rules(record_set(), before, after) == ["max_step"]
    assert rules(record_set(), after, before, kind="rollback") == []
    assert moved_share(before, after) == pytest.approx(25.0)


def test_share_never_grows_on_a_region_that_is_not_healthy():
    before, after = {"us-east-1": 99, "eu-west-1": 1}, {"us-east-1": 19, "eu-west-1": 1}
    for status in ("degraded", "unhealthy", "unknown"):
        verdicts = {**HEALTHY, "eu-west-1": status}
        assert rules(record_set(), before, after, verdicts=verdicts) == ["unhealthy_target"]
    # Taking share away from it is fine: that is what an evacuation does.
    assert rules(record_set(), after, before, kind="evacuation", verdicts={**HEALTHY, "eu-west-1": "degraded"}) == []


@pytest.mark.parametrize(
    ("after", "rule"),
    [
        ({"us-east-1": 0, "eu-west-1": 0}, "all_zero"),
        ({"us-east-1": 256, "eu-west-1": 1}, "range"),
        ({"us-east-1": -1, "eu-west-1": 1}, "range"),
        ({"us-east-1": 1.5, "eu-west-1": 1}, "range"),
        ({"us-east-1": 1}, "members"),
        ({"us-east-1": 1, "eu-west-1": 1, "ap-1": 1}, "members"),
    ],
)
def test_malformed_batches_are_refused(after, rule):
    assert rules(record_set(), {"us-east-1": 1, "eu-west-1": 1}, after, kind="rollback") == [rule]


def test_a_residency_set_never_weights_a_region_outside_it():
    # Config validation keeps such a member out; the guardrail holds even if one slipped through.
    eu_only = record_set(regions=("eu-west-1", "us-east-1")).model_copy(update={"residency": "EU"})
    before = {"eu-west-1": 1, "us-east-1": 0}
    assert rules(eu_only, before, {"eu-west-1": 1, "us-east-1": 1}, kind="rollback") == ["residency"]
    assert rules(eu_only, before, before, kind="rollback") == []  # a zero weight is allowed


def test_read_only_regions_get_no_weight_where_writes_go():
    before, after = {"eu-west-1": 1, "eu-north-1": 0}, {"eu-west-1": 9, "eu-north-1": 1}
    writes = record_set(regions=("eu-west-1", "eu-north-1"))
    assert rules(writes, before, after) == ["read_only"]
    reads = record_set(regions=("eu-west-1", "eu-north-1"), takes_writes=False)
    assert rules(reads, before, after) == []


def test_lightweight_regions_stay_under_max_share():
    rs = record_set(regions=("eu-west-1", "eu-central-1"))
    before = {"eu-west-1": 1, "eu-central-1": 0}
    assert rules(rs, before, {"eu-west-1": 3, "eu-central-1": 1}, kind="rollback") == ["max_share"]  # 25% > 20%
    assert rules(rs, before, {"eu-west-1": 9, "eu-central-1": 1}, max_step=10) == []  # 10%
