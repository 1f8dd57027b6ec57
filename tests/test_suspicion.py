"""Suspects: a probe with a recent failure that no verdict holds yet is probed harder."""

from __future__ import annotations

from controller.judging.suspicion import suspects
from controller.judging.verdicts import Verdict
from controller.judging.windows import WindowStore
from controller.settings.policy import SuspicionPolicy
from probes.results import Result

T0 = 1_800_000_000.0
POLICY = SuspicionPolicy(after_failure=30.0)
PROBES = {"eu-west-1": ("orders", "healthz"), "us-east-1": ("orders", "healthz")}


def store(*failures: tuple[str, str, str, float]) -> WindowStore:
    windows = WindowStore(3600.0)
    for region, probes in PROBES.items():
        for probe in probes:
            for i in range(60):
                windows.add(Result(region, probe, "controller", T0 + i, ok=True, latency=0.01))
    for region, probe, vantage, at in failures:
        windows.add(Result(region, probe, vantage, T0 + at, ok=False, latency=0.01, error_class="status"))
    return windows


def verdict(region: str, status: str, troubles: frozenset[str] = frozenset()) -> Verdict:
    return Verdict(region, status, (), {}, T0, T0 + 60, troubles)


def test_a_recent_failure_makes_its_probe_a_suspect_and_nothing_else():
    windows = store(("eu-west-1", "orders", "controller", 55.0), ("us-east-1", "healthz", "controller", 10.0))
    found = suspects(windows, PROBES, {}, T0 + 60, POLICY)
    assert found == {  # us-east-1's own failure is 50 s old; it is probed harder as eu-west-1's peer
        ("eu-west-1", "orders"): "failed 5.0s ago at controller",
        ("us-east-1", "orders"): "peer of eu-west-1, a suspect",
    }


def test_the_newest_failure_at_any_vantage_counts():
    windows = store(("eu-west-1", "orders", "controller", 40.0), ("eu-west-1", "orders", "agent-2", 58.0))
    found = suspects(windows, PROBES, {}, T0 + 60, POLICY)
    assert found[("eu-west-1", "orders")] == "failed 2.0s ago at agent-2"


def test_a_probe_the_verdict_already_holds_is_decided_and_not_hastened():
    windows = store(("eu-west-1", "orders", "controller", 59.0), ("eu-west-1", "healthz", "controller", 59.0))
    verdicts = {"eu-west-1": verdict("eu-west-1", "degraded", frozenset({"orders"}))}
    assert suspects(windows, PROBES, verdicts, T0 + 60, POLICY) == {
        ("eu-west-1", "healthz"): "failed 1.0s ago at controller",  # not held: still undecided
        ("us-east-1", "healthz"): "peer of eu-west-1, a suspect",
    }
    # Troubles alone (a test leaning bad) decide nothing while the region is healthy.
    leaning = {"eu-west-1": verdict("eu-west-1", "healthy", frozenset({"orders"}))}
    assert ("eu-west-1", "orders") in suspects(windows, PROBES, leaning, T0 + 60, POLICY)


def test_probes_not_judged_this_way_and_a_disabled_policy_hasten_nothing():
    windows = store(("eu-west-1", "orders", "controller", 59.0))
    assert suspects(windows, {"eu-west-1": ("healthz",)}, {}, T0 + 60, POLICY) == {}  # e.g. a lag probe
    assert suspects(windows, PROBES, {}, T0 + 60, SuspicionPolicy(enabled=False)) == {}


def test_a_failure_followed_by_enough_passes_is_noise_and_clears_the_suspicion():
    windows = store(("eu-west-1", "orders", "controller", 38.5))  # 21 passes after it, at 39..59
    assert suspects(windows, PROBES, {}, T0 + 60, SuspicionPolicy(after_failure=30.0, clear_after=21)) == {}
    assert ("eu-west-1", "orders") in suspects(windows, PROBES, {}, T0 + 60, SuspicionPolicy(clear_after=22))
