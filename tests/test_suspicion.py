"""Suspects: a target whose evidence leans toward a finding that no verdict holds yet is probed harder."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from controller.judging.suspicion import (
    HOLD_PASSES,
    WINDOWS_A_STEP,
    Suspicion,
    hold,
    judge_delay,
    suspect_steps,
    suspects,
)
from controller.judging.verdicts import Verdict
from controller.judging.windows import Window, WindowStore
from controller.settings.policy import SuspicionPolicy, VerdictPolicy
from probes.results import Result

T0 = 1_800_000_000.0
POLICY = VerdictPolicy(suspicion=SuspicionPolicy(after_failure=30.0))
PROBES = {"eu-west-1": ("orders", "healthz"), "us-east-1": ("orders", "healthz")}


def store(*failures: tuple[str, str, str, float], vantages: tuple[str, ...] = ("controller",)) -> WindowStore:
    windows = WindowStore(3600.0)
    for region, probes in PROBES.items():
        for probe in probes:
            for vantage in vantages:
                for i in range(60):
                    windows.add(Result(region, probe, vantage, T0 + i, ok=True, latency=0.01))
    for region, probe, vantage, at in failures:
        windows.add(Result(region, probe, vantage, T0 + at, ok=False, latency=0.01, error_class="status"))
    return windows


def verdict(region: str, status: str, troubles: frozenset[str] = frozenset(), evidence: dict | None = None) -> Verdict:
    return Verdict(region, status, (), evidence or {}, T0, T0 + 60, troubles)


def with_suspicion(**changes) -> VerdictPolicy:
    return VerdictPolicy(suspicion=SuspicionPolicy(**{"after_failure": 30.0, **changes}))


def test_one_recent_failure_makes_its_target_a_suspect_at_that_vantage_alone():
    windows = store(("eu-west-1", "orders", "controller", 55.5), ("us-east-1", "healthz", "controller", 10.0))
    found = suspects(windows, PROBES, {}, T0 + 60, POLICY)
    # us-east-1's own failure is 50 s old; one failure is not yet worth probing the peers for.
    assert list(found) == [("eu-west-1", "orders", "controller")]
    suspicion = found["eu-west-1", "orders", "controller"]
    assert suspicion.why.startswith("failed 4.5s ago at controller (evidence ")
    # It asks for the runs that would clear it: clear_after passes, 4 of which came already.
    assert suspicion.runs == POLICY.suspicion.clear_after - 4


def test_a_lone_failure_asks_for_the_runs_that_would_clear_it_counted_from_the_newest_seen():
    """The count falls with each pass seen, whatever ran it, and says which results it was made
    from (the newest one's start), so the scheduler can take off the runs on their way."""
    for passes in range(1, 29):  # (at one pass a second, `after_failure` ends it at 30)
        windows = store(("eu-west-1", "orders", "controller", 59.5 - passes))
        found = suspects(windows, PROBES, {}, T0 + 60, POLICY)
        suspicion = found["eu-west-1", "orders", "controller"]
        assert list(found) == [("eu-west-1", "orders", "controller")]
        assert (suspicion.runs, suspicion.seen) == (POLICY.suspicion.clear_after - passes, T0 + 59)


def test_two_failures_further_apart_than_lean_within_passes_are_counted_not_leaning():
    # 25 passes apart (lean_within is 20): the peers are not hastened; the count runs from both.
    windows = store(("eu-west-1", "orders", "controller", 33.5), ("eu-west-1", "orders", "controller", 58.5))
    found = suspects(windows, PROBES, {}, T0 + 60, POLICY)
    assert list(found) == [("eu-west-1", "orders", "controller")]
    # clear_after of the first failure, 115.4 more of the second, 26 passes since the first.
    assert found["eu-west-1", "orders", "controller"].runs == POLICY.suspicion.clear_after + 90
    # Two failures with 14 passes since the first: leaning bad, probed (with its peer) while it
    # leans, no count; it leans until two failures have 20 passes, or more failures more.
    windows = store(("eu-west-1", "orders", "controller", 45.5), ("eu-west-1", "orders", "controller", 58.5))
    found = suspects(windows, PROBES, {}, T0 + 60, POLICY)
    assert set(found) == {("eu-west-1", "orders", "controller"), ("us-east-1", "orders", "controller")}
    assert all(s.runs is None for s in found.values())


def test_a_second_close_failure_leans_bad_and_hastens_the_peers_at_that_vantage():
    windows = store(("eu-west-1", "orders", "controller", 50.5), ("eu-west-1", "orders", "controller", 58.5))
    assert suspects(windows, PROBES, {}, T0 + 60, POLICY) == {
        ("eu-west-1", "orders", "controller"): Suspicion("failed 1.5s ago at controller (evidence 6.5)"),
        ("us-east-1", "orders", "controller"): Suspicion("peer of eu-west-1, a suspect leaning bad"),
    }


def test_each_vantage_is_its_own_suspect():
    vantages = ("controller", "agent-2")
    windows = store(("eu-west-1", "orders", "agent-2", 58.5), vantages=vantages)
    assert list(suspects(windows, PROBES, {}, T0 + 60, POLICY)) == [("eu-west-1", "orders", "agent-2")]


def test_leaning_bad_at_one_vantage_hastens_every_vantage_the_quorum_and_peers_need():
    vantages = ("controller", "agent-2")
    windows = store(
        ("eu-west-1", "orders", "agent-2", 50.5), ("eu-west-1", "orders", "agent-2", 58.5), vantages=vantages
    )
    found = suspects(windows, PROBES, {}, T0 + 60, POLICY)
    assert found == {
        ("eu-west-1", "orders", "agent-2"): Suspicion("failed 1.5s ago at agent-2 (evidence 6.5)"),
        ("eu-west-1", "orders", "controller"): Suspicion("leaning bad at agent-2: the quorum needs controller too"),
        ("us-east-1", "orders", "agent-2"): Suspicion("peer of eu-west-1, a suspect leaning bad"),
        ("us-east-1", "orders", "controller"): Suspicion("peer of eu-west-1, a suspect leaning bad"),
    }


def test_a_vantage_set_aside_raises_no_suspicion_and_gets_none():
    vantages = ("controller", "agent-2")
    windows = store(
        ("eu-west-1", "orders", "agent-2", 50.5), ("eu-west-1", "orders", "agent-2", 58.5), vantages=vantages
    )
    assert suspects(windows, PROBES, {}, T0 + 60, POLICY, set_aside={"agent-2"}) == {}
    windows = store(
        ("eu-west-1", "orders", "controller", 50.5), ("eu-west-1", "orders", "controller", 58.5), vantages=vantages
    )
    assert set(suspects(windows, PROBES, {}, T0 + 60, POLICY, set_aside={"agent-2"})) == {
        ("eu-west-1", "orders", "controller"),
        ("us-east-1", "orders", "controller"),
    }


def test_a_probe_the_verdict_already_holds_is_decided_and_not_hastened():
    windows = store(("eu-west-1", "orders", "controller", 59.0), ("eu-west-1", "healthz", "controller", 59.0))
    verdicts = {"eu-west-1": verdict("eu-west-1", "degraded", frozenset({"orders"}))}
    assert list(suspects(windows, PROBES, verdicts, T0 + 60, POLICY)) == [("eu-west-1", "healthz", "controller")]
    # Troubles alone (a test leaning bad) decide nothing while the region is healthy.
    leaning = {"eu-west-1": verdict("eu-west-1", "healthy", frozenset({"orders"}))}
    assert ("eu-west-1", "orders", "controller") in suspects(windows, PROBES, leaning, T0 + 60, POLICY)


def test_probes_not_judged_this_way_and_a_disabled_policy_hasten_nothing():
    windows = store(("eu-west-1", "orders", "controller", 59.0))
    assert suspects(windows, {"eu-west-1": ("healthz",)}, {}, T0 + 60, POLICY) == {}  # e.g. a lag probe
    assert suspects(windows, PROBES, {}, T0 + 60, VerdictPolicy(suspicion=SuspicionPolicy(enabled=False))) == {}


def test_a_failure_followed_by_clear_after_passes_is_noise_and_clears_the_suspicion():
    windows = store(("eu-west-1", "orders", "controller", 38.5))  # 21 passes after it, at 39..59
    assert suspects(windows, PROBES, {}, T0 + 60, with_suspicion(clear_after=21)) == {}
    assert list(suspects(windows, PROBES, {}, T0 + 60, with_suspicion(clear_after=22))) == [
        ("eu-west-1", "orders", "controller")
    ]


def test_two_failures_keep_a_suspect_far_longer_than_one():
    # 21 passes after the newer failure clear a lone failure, not two of them close together.
    windows = store(("eu-west-1", "orders", "controller", 36.5), ("eu-west-1", "orders", "controller", 38.5))
    assert ("eu-west-1", "orders", "controller") in suspects(
        windows, PROBES, {}, T0 + 60, with_suspicion(clear_after=21)
    )


def test_latency_leaning_slow_hastens_the_probe_at_its_vantages_and_its_peers_once_beyond_the_quorum():
    windows = store()
    evidence = {"slowdown": {"orders": {"llr": 7.0, "threshold": 13.8, "slower": True, "baseline": {"controller": {}}}}}
    slow = {"eu-west-1": verdict("eu-west-1", "healthy", evidence=evidence)}
    # Slower at one vantage only (the quorum does not see it yet): the probe, not its peers.
    assert suspects(windows, PROBES, slow, T0 + 60, POLICY) == {
        ("eu-west-1", "orders", "controller"): Suspicion("latency leaning slow"),
    }
    evidence["slowdown"]["orders"]["leaning"] = True  # beyond the quorum: the peers are compared too
    assert suspects(windows, PROBES, slow, T0 + 60, POLICY) == {
        ("eu-west-1", "orders", "controller"): Suspicion("latency leaning slow"),
        ("us-east-1", "orders", "controller"): Suspicion("peer of eu-west-1, a suspect leaning bad"),
    }
    evidence["slowdown"]["orders"]["llr"] = 6.8  # under 0.5 of the threshold: not yet
    assert suspects(windows, PROBES, slow, T0 + 60, POLICY) == {}
    evidence["slowdown"]["orders"].update(llr=7.0, slower=False)  # not slower by the effect size: noise
    assert suspects(windows, PROBES, slow, T0 + 60, POLICY) == {}


def test_the_judge_runs_faster_only_while_a_suspect_is_probed():
    policy = SuspicionPolicy(judge_every=0.25)
    assert judge_delay(1.0, suspecting=True, policy=policy) == 0.25
    assert judge_delay(1.0, suspecting=False, policy=policy) == 1.0
    assert judge_delay(0.1, suspecting=True, policy=policy) == 0.1  # never slower than the tick
    assert judge_delay(1.0, suspecting=True, policy=SuspicionPolicy(enabled=False, judge_every=0.25)) == 1.0
    # Never sooner than the last pass took: judging takes at most half of the loop's time.
    assert judge_delay(1.0, suspecting=True, policy=policy, took=0.6) == 0.6
    assert judge_delay(1.0, suspecting=False, policy=policy, took=1.4) == 1.4
    assert judge_delay(1.0, suspecting=True, policy=policy, took=0.1) == 0.25


def test_a_suspicion_holds_a_little_past_the_next_pass_and_what_the_pass_took():
    policy = SuspicionPolicy(judge_every=0.25)
    assert hold(1.0, policy) == HOLD_PASSES * 0.25
    assert hold(1.0, policy, took=0.1) == HOLD_PASSES * 0.25 + 0.1
    # A pass longer than judge_every is followed by as long a wait: the hold covers both.
    assert hold(1.0, policy, took=0.6) == HOLD_PASSES * 0.6 + 0.6


def test_suspicion_knobs_past_one_failures_evidence_are_refused():
    """One failure on the shipped patient test fades in 115 passes: clear_after past it would
    never clear, lean_within past it would lean bad on one failure."""
    VerdictPolicy(suspicion=SuspicionPolicy(clear_after=115, lean_within=115))
    for knob in ("clear_after", "lean_within"):
        with pytest.raises(ValidationError, match=rf"suspicion.{knob} \(116\) must be at most 115"):
            VerdictPolicy(suspicion=SuspicionPolicy(**{knob: 116}))


def slow_evidence(median: float = 0.01) -> dict:
    return {"slowdown": {"orders": {"llr": 0.0, "threshold": 13.8, "baseline": {"controller": {"median": median}}}}}


def test_a_result_far_slower_than_usual_earns_one_extra_run_and_each_such_result_another():
    healthy = {"eu-west-1": verdict("eu-west-1", "healthy", evidence=slow_evidence())}
    windows = store()
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 59.5, ok=True, latency=0.019))  # 1.9x: no
    assert suspects(windows, PROBES, healthy, T0 + 60, POLICY) == {}
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 59.6, ok=True, latency=0.021))  # over 2x
    found = suspects(windows, PROBES, healthy, T0 + 60, POLICY)
    assert list(found) == [("eu-west-1", "orders", "controller")]
    assert found["eu-west-1", "orders", "controller"].runs == 1
    assert "over 2x its usual median (10 ms)" in found["eu-west-1", "orders", "controller"].why
    # Its run came back at the usual latency: a spike, spent. Had it been slow too, one more.
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 59.7, ok=True, latency=0.01))
    assert suspects(windows, PROBES, healthy, T0 + 60, POLICY) == {}
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 59.8, ok=True, latency=0.03))
    assert suspects(windows, PROBES, healthy, T0 + 60, POLICY)["eu-west-1", "orders", "controller"].runs == 1
    # A failure after it is counted as a failure (the slow result is no longer the newest); without
    # a baseline, or with the grade turned off, a far slower result earns nothing.
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 59.9, ok=False, latency=0.01))
    assert suspects(windows, PROBES, healthy, T0 + 60, POLICY)["eu-west-1", "orders", "controller"].runs > 1
    windows = store()
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 59.6, ok=True, latency=0.05))
    assert suspects(windows, PROBES, {}, T0 + 60, POLICY) == {}
    assert suspects(windows, PROBES, healthy, T0 + 60, with_suspicion(far_slower_runs=0)) == {}


@pytest.mark.parametrize("screen_limit", [0.015, 0.03])
def test_a_far_slower_result_is_found_after_passes_that_found_none_whatever_the_slow_screen_s_limit(screen_limit):
    # The suspects look again at a probe only when a success slower than the slow screen's limit
    # came since they found none (their note in `WindowStore.notes`): with the screen's limit
    # under twice the median (0.015) such a success is counted; over it (0.03), one at 0.025 is
    # not, and they must look anyway.
    healthy = {"eu-west-1": verdict("eu-west-1", "healthy", evidence=slow_evidence())}
    windows = store()
    window = windows.region("eu-west-1")["orders", "controller"]
    window.slow_cusum(T0 + 60, 60.0, screen_limit, 1.6, -0.6)
    for i in range(3):  # passes that find nothing far slower, and results that are not
        assert suspects(windows, PROBES, healthy, T0 + 60 + i, POLICY) == {}
        windows.add(Result("eu-west-1", "orders", "controller", T0 + 60.5 + i, ok=True, latency=0.012))
    assert (("eu-west-1", "orders") in windows.notes["far_slower"]) == (screen_limit < 0.02)
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 63.5, ok=True, latency=0.025))
    found = suspects(windows, PROBES, healthy, T0 + 64, POLICY)
    assert list(found) == [("eu-west-1", "orders", "controller")]


def test_a_far_slower_result_back_in_reach_after_the_clock_went_back_is_found_again():
    # What the suspects found of a window depends on the clock too (only results within
    # after_failure count): one that found none must look again when the clock went back.
    healthy = {"eu-west-1": verdict("eu-west-1", "healthy", evidence=slow_evidence())}
    windows = store()
    windows.add(Result("eu-west-1", "orders", "controller", T0 + 60, ok=True, latency=0.03))
    assert suspects(windows, PROBES, healthy, T0 + 95, POLICY) == {}  # 35 s old: out of reach
    found = suspects(windows, PROBES, healthy, T0 + 85, POLICY)
    assert list(found) == [("eu-west-1", "orders", "controller")]


def test_results_since_slower_matches_a_plain_walk_back():
    rng = random.Random(7)
    for _ in range(200):
        window = WindowStore(3600.0)
        for i in range(rng.randint(0, 6)):
            ok = rng.random() > 0.2
            windows_result = Result(
                "eu-west-1", "orders", "controller", T0 + i, ok=ok, latency=rng.choice([0.01, 0.05])
            )
            window.add(windows_result)
        kept = window.region("eu-west-1").get(("orders", "controller"))
        samples = [] if kept is None else kept.samples(T0 + 10)
        for limit in range(4):
            since = T0 + rng.choice([0, 2, 4])
            expected = None
            for count, s in enumerate(reversed(samples)):
                if count >= limit or s[0] < since:
                    break
                if s[1] and s[2] > 0.02:
                    expected = count
                    break
            got = None if kept is None else kept.results_since_slower(0.02, limit, since)
            assert got == expected, (samples, limit, since)


def test_a_region_s_windows_are_looked_at_a_hundred_at_a_time_and_new_ones_meanwhile_break_nothing(monkeypatch):
    # 250 vantages report eu-west-1: 500 windows in one region, each orders window failed once.
    vantages = tuple(f"agent-{i:03d}" for i in range(250))
    failures = [("eu-west-1", "orders", v, 55.5) for v in vantages]
    at_once = suspects(store(*failures, vantages=vantages), PROBES, {}, T0 + 60, POLICY)
    windows = store(*failures, vantages=vantages)
    looked = [0]  # windows looked at since the last yield
    last_failure = Window.last_failure

    def counted(self: Window) -> float | None:
        looked[0] += 1
        return last_failure(self)

    monkeypatch.setattr(Window, "last_failure", counted)
    steps = suspect_steps(windows, PROBES, {}, T0 + 60, POLICY)
    most, found, late = 0, None, 0
    while found is None:
        looked[0] = 0
        try:
            next(steps)
        except StopIteration as stop:
            found = stop.value
        most = max(most, looked[0])
        # A result from a vantage not seen before, as the loop runs between steps.
        late += 1
        windows.add(Result("eu-west-1", "orders", f"late-{late}", T0 + 59, ok=True, latency=0.01))
    assert found == at_once
    assert len(at_once) == 250
    # Where a region of 500 windows was one step. (Before the loop, `failed_lately` reads the
    # newest failure time of each window that failed in one go: 250 numbers here.)
    assert most == WINDOWS_A_STEP
