"""Windows and verdicts: pure functions of results and the clock, checked with exact values."""

from __future__ import annotations

import gc
import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.judging import windows as windows_module
from controller.judging.sequential import failures, failures_of, slower, slower_of
from controller.judging.threshold import ThresholdDetector
from controller.judging.verdicts import Assessment, Judge, collections_held, combine, finish
from controller.judging.windows import (
    AT,
    LATE_KEPT,
    LATENCY,
    MAX_SAMPLES,
    OK,
    TRIM_SECONDS,
    Window,
    WindowStats,
    WindowStore,
    _SpanView,
    span_view,
)
from controller.settings.policy import LatencyObjective, VerdictPolicy
from probes.results import Result

T0 = 1_800_000_000.0
POLICY = VerdictPolicy(
    window=60,
    stale_after=30,
    min_samples=5,
    degraded_below=0.95,
    unhealthy_below=0.5,
    down_after=3,
    latency=LatencyObjective(quantile=0.9, threshold=0.5),
)


def result(
    at: float,
    ok: bool = True,
    *,
    probe: str = "api",
    region: str = "eu-west-1",
    vantage: str = "controller",
    latency: float = 0.05,
    error_class: str | None = None,
) -> Result:
    return Result(
        region=region,
        probe=probe,
        vantage=vantage,
        started_at=at,
        ok=ok,
        latency=latency,
        error_class=error_class if not ok else None,
    )


def feed(store: WindowStore, results: list[Result]) -> None:
    for r in results:
        store.add(r)


def judge_once(results: list[Result], now: float, probes=("api",), policy=POLICY):
    store = WindowStore(policy.window)
    feed(store, results)
    judge = Judge([ThresholdDetector(policy)], {"eu-west-1": tuple(probes)})
    judge.judge(store, now)
    return judge.verdicts["eu-west-1"]


# --- windows -------------------------------------------------------------------------------------


def test_window_keeps_only_the_last_span_seconds():
    window = Window(span=10)
    for i in range(20):
        window.add(result(T0 + i, ok=i % 2 == 0))
    stats = WindowStats.pooled(window.samples(T0 + 19))
    assert stats.samples == 10  # T0+10 .. T0+19
    assert stats.failures == 5
    assert stats.success_ratio == 0.5
    assert window.age(T0 + 25) == 6
    window.trim(T0 + 25)
    assert [s[AT] for s in window.samples(T0 + 25)] == [T0 + i for i in range(16, 20)]


def test_window_memory_is_bounded_between_trims():
    window = Window(span=10**6)
    for i in range(MAX_SAMPLES + 5):
        window.add(result(T0 + i * 0.001))
    samples = list(window.samples(T0 + 100))
    assert len(samples) == MAX_SAMPLES
    assert samples[0][AT] == T0 + 5 * 0.001  # the oldest went first


def test_window_accepts_a_late_result_in_its_place():
    window = Window(span=10)
    window.add(result(T0 + 5))
    window.add(result(T0 + 2, ok=False, error_class="timeout"))
    window.add(result(T0 + 6))
    assert [s[AT] for s in window.samples(T0 + 6)] == [T0 + 2, T0 + 5, T0 + 6]
    assert window.age(T0 + 6) == 0


def test_a_window_gives_back_each_sample_as_it_was_added(monkeypatch):
    """Kept in columns, read as tuples: outcome, latency, error class and schedule come back as
    they went in, a late one in its place; past `MAX_CLASSES` distinct error classes a new one
    is kept as "other" (a class is at most 32 characters: the table cannot grow without bound)."""
    windows_module._class_number("timeout")  # known already
    monkeypatch.setattr(windows_module, "MAX_CLASSES", len(windows_module._CLASSES) + 1)  # room for one more
    window = Window(span=100)
    window.add(replace(result(T0 + 1, latency=0.25), reason="suspicion"))
    window.add(result(T0 + 3, ok=False, latency=math.inf, error_class="timeout"))
    window.add(result(T0 + 2, ok=False, latency=0.5, error_class="a-class-never-seen-before"))
    window.add(result(T0 + 4, ok=False, latency=0.125, error_class="and-one-more-past-the-cap"))
    samples = window.samples(T0 + 10)
    assert samples == [
        (T0 + 1, True, 0.25, None, False),
        (T0 + 2, False, 0.5, "a-class-never-seen-before", True),
        (T0 + 3, False, math.inf, "timeout", True),
        (T0 + 4, False, 0.125, "other", True),
    ]
    assert [type(v) for v in samples[0]] == [float, bool, float, type(None), bool]
    assert window.newest(2) == samples[2:]
    window.add(result(T0 + 5, ok=False))  # no class: counted as unknown
    assert window.error_classes(T0 + 10, 10) == ["a-class-never-seen-before", "timeout", "other", "unknown"]
    assert window.error_classes(T0 + 10, 7.5) == ["timeout", "other", "unknown"]  # within (T0 + 2.5, T0 + 10]


def test_a_window_keeps_latencies_to_the_microsecond_and_a_long_lag_to_seven_digits():
    """Latencies are kept in microseconds in single precision: one given to the microsecond
    reads back as the same float (up to 2**24 us, 16.7 s), a longer one (a replication lag of
    hours) to seven significant digits, an infinite one as infinite; quantiles and the slowdown
    test's comparisons see the same values."""
    given_latencies = [0.000001, 0.05, 0.123456, 0.2, 0.3, 1.1, 16.777215, 3600.5, 86_400.25, math.inf]
    window = Window(span=100)
    for i, latency in enumerate(given_latencies):
        window.add(result(T0 + i, latency=latency))
    read = [s[LATENCY] for s in window.samples(T0 + 50)]
    assert read[:7] == given_latencies[:7]  # exact
    assert read[7:9] == pytest.approx(given_latencies[7:9], rel=1e-7)
    assert read[9] == math.inf
    view = span_view((window,), T0 + 50, 100)
    assert view.count() == len(given_latencies)
    assert list(view.latencies) == sorted(read)
    assert window.results_since_slower(0.3, limit=10, since=T0) == 0  # the newest, infinite
    slower = [slow for _, _, slow in window.latency_outcomes(T0 + 50, 100, "controller", 0.3)]
    assert slower == [latency > 0.3 for latency in given_latencies]  # 0.3 itself is not slower


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 300), st.booleans(), st.integers(0, 2_000_000)), max_size=400),
    st.floats(-10, 300),
    st.floats(0, 320),
    st.floats(-50, 50),
    st.sampled_from([10.0, 60.0]),
)
def test_latencies_by_slice_group_what_the_samples_hold(outcomes, after, end, anchor, width):
    """What the latency baselines summarise, read from the columns, is the samples within
    (after, end] grouped by slice, successes' latencies in order, a slice of failures empty."""
    window = Window(span=1000)
    for at, ok, us in outcomes:
        window.add(Result("eu-west-1", "api", "controller", at, ok=ok, latency=us / 1e6))
    expected: dict[int, list[float]] = {}
    for at, ok, us in sorted(outcomes, key=lambda o: o[0]):  # a window keeps equal times as they came
        index = math.floor((at - anchor) / width)
        if after < at <= end and index % 3:  # `keep` leaves out every third slice
            expected.setdefault(index, [])
            if ok:
                expected[index].append(us / 1e6)
    assert window.latencies_by_slice(after, end, anchor, width, lambda i: bool(i % 3)) == expected


def test_the_tests_read_the_same_outcomes_from_the_columns_as_from_the_samples():
    """`failures_of` and `slower_of` (what the error and slowdown tests walk, read from the
    columns) give what `failures` and `slower` give from the samples, late results included."""
    rng = random.Random(7)
    windows = {v: Window(span=60) for v in ("a", "b", "c")}
    for i in range(300):
        at = T0 + i * 0.3 - (rng.random() * 3 if rng.random() < 0.1 else 0.0)  # one in ten late
        vantage = rng.choice("abc")
        windows[vantage].add(result(at, ok=rng.random() > 0.2, vantage=vantage, latency=rng.random()))
    now, limits = T0 + 95, {"a": 0.5, "b": 0.7, "c": 0.2}
    for span in (10.0, 45.0, 60.0):
        samples = {v: w.samples(now, span) for v, w in windows.items()}
        assert failures_of(windows, now, span) == failures(samples)
        assert slower_of(windows, limits, now, span) == slower(samples, limits)
        assert any(bad for _, _, bad in failures(samples))
        assert any(bad for _, _, bad in slower(samples, limits))


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 60), st.booleans(), st.integers(1, 40)), max_size=200),
    st.floats(0.01, 0.99),
    st.floats(0.0, 1.0),
)
def test_stats_keeping_only_the_slowest_latencies_answer_every_quantile_from_there_as_the_samples_do(
    outcomes, top, above
):
    # The threshold detector merges only each window's slowest latencies (as many as the pooled
    # quantile's rank leaves above it): at that quantile and any higher one the answer must be
    # what every sample pooled gives, ties and failures included; below it, an error, not a guess.
    windows = {v: Window(span=120) for v in "abc"}
    for vantage, at, ok, tenths in outcomes:
        windows[vantage].add(Result("eu-west-1", "api", vantage, float(at), ok=ok, latency=tenths / 10))
    now, span = 60.0, 30.0
    every = WindowStats.pooled([s for w in windows.values() for s in w.samples(now, span)])
    slowest = WindowStats.of(windows.values(), now, span, top=top)
    assert (slowest.samples, slowest.failures, slowest.errors) == (every.samples, every.failures, every.errors)
    # Those kept are the slowest, all of them, not only the quantiles asked of them.
    assert slowest.latencies == every.latencies[len(every.latencies) - len(slowest.latencies) :]
    for q in (top, top + (1 - top) * above):
        assert slowest.latency_quantile(q) == every.latency_quantile(q)
    lower = top / 2
    n = len(every.latencies)
    if n and max(1, math.ceil(lower * n)) < max(1, math.ceil(top * n)):
        with pytest.raises(ValueError, match="below the slowest latencies"):
            slowest.latency_quantile(lower)


def test_latency_quantile_is_nearest_rank_over_successes_only():
    stats = WindowStats.pooled(
        Window_samples(
            [result(T0 + i, latency=(i + 1) / 10) for i in range(10)] + [result(T0 + 11, ok=False, latency=9.0)]
        )
    )
    assert stats.latency_quantile(0.9) == pytest.approx(0.9)
    assert stats.latency_quantile(0.5) == pytest.approx(0.5)
    assert stats.errors == {"unknown": 1}


def Window_samples(results):  # noqa: N802 - reads as a constructor in the test above
    window = Window(span=100)
    for r in results:
        window.add(r)
    return window.samples(T0 + 50)


def test_a_result_stamped_after_now_does_not_make_old_data_fresh():
    # Three failures 31s old (stale) and one stamped a second in the future (a skewed clock).
    results = [result(T0, ok=False, error_class="refused") for _ in range(3)]
    results.append(result(T0 + 32, ok=False, error_class="refused"))
    verdict = judge_once(results, T0 + 31)
    assert verdict.status == "unknown"
    assert verdict.reasons == ("api: no result in the last 30s",)


def test_last_failed_needs_that_many_consecutive_failures():
    window = Window(span=60)
    for i, ok in enumerate([True, False, False]):
        window.add(result(T0 + i, ok=ok, error_class="refused"))
    assert not window.last_failed(3, T0 + 2)
    window.add(result(T0 + 3, ok=False, error_class="refused"))
    assert window.last_failed(3, T0 + 3)


# --- the threshold detector ----------------------------------------------------------------------


def test_a_region_without_results_is_unknown_never_healthy():
    verdict = judge_once([], T0)
    assert verdict.status == "unknown"
    assert verdict.reasons == ("api: no result yet",)


def test_stale_results_make_the_region_unknown():
    results = [result(T0 + i) for i in range(10)]
    assert judge_once(results, T0 + 10).status == "healthy"
    stale = judge_once(results, T0 + 9 + 31)
    assert stale.status == "unknown"
    assert stale.reasons == ("api: no result in the last 30s",)


def test_too_few_samples_are_not_judged():
    verdict = judge_once([result(T0 + i) for i in range(4)], T0 + 4)
    assert verdict.status == "unknown"
    assert verdict.reasons == ("api: only 4 of 5 results needed to judge",)


def test_all_passing_probes_make_a_healthy_region_with_evidence():
    verdict = judge_once([result(T0 + i, latency=0.1) for i in range(20)], T0 + 20)
    assert verdict.status == "healthy"
    assert verdict.reasons == ()
    evidence = verdict.evidence["threshold"]["api"]
    assert evidence == {
        "vantages": ("controller",),
        "last_result_age": 1.0,
        "samples": 20,
        "failures": 0,
        "success_ratio": 1.0,
        "latency_p90": 0.1,
    }
    # Numbers and a tuple of strings alone: once collected, the collector tracks it no more.
    gc.collect()
    assert not gc.is_tracked(evidence)


def test_partial_failure_on_one_path_while_healthz_passes_is_degraded_and_names_the_path():
    results = [result(T0 + i, probe="healthz") for i in range(20)]
    results += [result(T0 + i, probe="orders", ok=i % 5 >= 2, error_class="status") for i in range(20)]  # 40% fail
    verdict = judge_once(results, T0 + 20, probes=("healthz", "orders"))
    assert verdict.status == "degraded"
    assert verdict.reasons == ("orders: 60% of 20 probes succeeded over 60s from controller (status x8), below 95%",)


def test_every_probe_below_the_unhealthy_ratio_makes_the_region_unhealthy():
    results = [
        result(T0 + i, probe=p, ok=i % 4 == 0, error_class="status") for p in ("healthz", "api") for i in range(20)
    ]
    verdict = judge_once(results, T0 + 20, probes=("healthz", "api"))
    assert verdict.status == "unhealthy"
    assert len(verdict.reasons) == 2


def test_consecutive_failures_make_a_down_region_unhealthy_before_its_window_fills():
    results = [result(T0 + i) for i in range(30)]
    results += [result(T0 + 30 + i, ok=False, error_class="refused") for i in range(3)]
    verdict = judge_once(results, T0 + 33)
    assert verdict.status == "unhealthy"
    # Alone, with no peer region to tell a shared cause from its own: held against it.
    assert verdict.reasons == (
        "api: the last 3 results from controller all failed (refused x3), no peer region to compare with",
    )


def test_slow_probe_is_degraded():
    results = [result(T0 + i, latency=0.8 if i % 5 == 0 else 0.1) for i in range(20)]  # p90 = 0.8
    verdict = judge_once(results, T0 + 20)
    assert verdict.status == "degraded"
    assert verdict.reasons == ("api: latency_p90 800ms over 60s exceeds 500ms",)


def test_a_run_of_failures_says_which_errors_are_the_window_s_not_the_run_s():
    # "the last 3 results ... all failed (status x52)" read as 52 failures in a run of 3.
    results = [result(T0 + i, ok=i % 2 == 0 or i >= 17, error_class="status") for i in range(20)]
    results += [result(T0 + 20 + i, ok=False, error_class="status") for i in range(3)]
    verdict = judge_once(results[:17] + results[20:], T0 + 23)
    (reason,) = verdict.reasons
    assert reason.startswith("api: the last 3 results from controller all failed (status x11 in 60s)"), reason


def test_vantages_are_pooled_and_listed():
    results = [result(T0 + i, vantage=v) for v in ("controller", "agent-eu-west-1") for i in range(5)]
    verdict = judge_once(results, T0 + 5)
    assert verdict.status == "healthy"
    assert verdict.evidence["threshold"]["api"]["vantages"] == ("agent-eu-west-1", "controller")
    assert verdict.evidence["threshold"]["api"]["samples"] == 10


def test_a_ratio_that_rounds_to_its_limit_is_shown_to_a_tenth():
    # "95% of 74 probes succeeded ... below 95%" (70 of 74 is 94.6%).
    results = [result(T0 + i * 0.5, ok=i not in (3, 20, 40, 60), error_class="status") for i in range(74)]
    verdict = judge_once(results, T0 + 37)
    assert verdict.reasons[0].startswith("api: 94.6% of 74 probes succeeded over 60s"), verdict.reasons


def test_a_breach_no_vantage_shows_alone_is_not_held_and_says_so():
    # Pooled, 3 of 24 failed (87.5%); alone, the agent's 4 results are too few to judge and the
    # controller's 19 of 20 are not below 95%: no vantage shows the breach by itself.
    results = [result(T0 + i, ok=i >= 2, vantage="agent-eu-west-1", error_class="status") for i in range(4)]
    results += [result(T0 + i, ok=i != 7, error_class="status") for i in range(20)]
    verdict = judge_once(results, T0 + 20)
    assert verdict.status == "healthy"
    said = "api: 88% of 24 probes succeeded over 60s from agent-eu-west-1, controller (status x3), below 95%"
    assert verdict.reasons == (f"{said}: seen at no vantage alone, 2 vantages needed, not held",)


def test_with_agents_a_finding_short_of_its_quorum_is_unknown_and_held_once_they_report():
    # The broker down, or every agent stopped: the controller alone is one vantage of the two
    # the quorum needs, and its own bad path must not blame the region (trial G: it evacuated it).
    failing = [result(T0 + i, ok=False, error_class="timeout") for i in range(10)]
    store = WindowStore(POLICY.window)
    feed(store, failing)
    judge = Judge([ThresholdDetector(POLICY)], {"eu-west-1": ("api",)}, POLICY, ("controller", "agent-a"))
    judge.judge(store, T0 + 10)
    verdict = judge.verdicts["eu-west-1"]
    assert verdict.status == "unknown"
    assert verdict.reasons[0] == (
        "only controller reports (agent-a: no result in the last 30s), 2 vantages needed to hold a "
        "finding: not held, and not healthy either"
    )
    assert verdict.reasons[1].startswith("api: the last 3 results from controller all failed")
    # The agent reports the same: two vantages agree, and the region is held unhealthy.
    feed(store, [result(T0 + i, ok=False, vantage="agent-a", error_class="timeout") for i in range(10)])
    judge.judge(store, T0 + 10)
    assert judge.verdicts["eu-west-1"].status == "unhealthy"
    # An agent reporting only another probe does not make up the quorum of the one failing.
    two = WindowStore(POLICY.window)
    feed(
        two,
        failing + [result(T0 + i, probe="healthz", vantage=v) for i in range(10) for v in ("controller", "agent-a")],
    )
    both = Judge([ThresholdDetector(POLICY)], {"eu-west-1": ("api", "healthz")}, POLICY, ("controller", "agent-a"))
    both.judge(two, T0 + 10)
    assert both.verdicts["eu-west-1"].status == "unknown"
    assert both.verdicts["eu-west-1"].reasons[0].startswith("only controller reports (agent-a: no result")
    # Replication lag needs no quorum: a region it holds stays degraded, its reason first.

    class Lag:
        name = "lag"
        one_vantage = True

        def assess(self, _view, _now):
            return Assessment("degraded", ("orders-db (postgres lag): 12s over 5s",))

    lagging = Judge([ThresholdDetector(POLICY), Lag()], {"eu-west-1": ("api",)}, POLICY, ("controller", "agent-a"))
    lag_store = WindowStore(POLICY.window)
    feed(lag_store, failing)
    lagging.judge(lag_store, T0 + 10)
    held = lagging.verdicts["eu-west-1"]
    assert held.status == "degraded"
    assert held.reasons[0] == "orders-db (postgres lag): 12s over 5s"
    assert held.reasons[-1].startswith("only controller reports (agent-a: no result")
    # Without agents (no vantages named), the controller's quorum is itself, as before.
    alone = Judge([ThresholdDetector(POLICY)], {"eu-west-1": ("api",)}, POLICY)
    alone_store = WindowStore(POLICY.window)
    feed(alone_store, failing)
    alone.judge(alone_store, T0 + 10)
    assert alone.verdicts["eu-west-1"].status == "unhealthy"


def test_a_failing_probe_outweighs_a_stale_one():
    results = [result(T0 + i, probe="orders", ok=False, error_class="status") for i in range(10)]
    results += [result(T0 - 100, probe="healthz")]
    verdict = judge_once(results, T0 + 10, probes=("healthz", "orders"))
    assert verdict.status == "degraded"  # known bad beats unknown; not unhealthy while healthz is unjudged


def test_the_reasons_that_make_the_verdict_come_first():
    # The page and `status` show the first reason: "... not held against eu-west-1" (the threshold
    # detector's) was shown for a region the next detector's finding held degraded.
    class Says:
        def __init__(self, name: str, status: str, *reasons: str) -> None:
            self.name, self.status, self.reasons = name, status, reasons

        def assess(self, _view, _now):
            return Assessment(self.status, self.reasons)

    unheld = Says("threshold", "healthy", "orders: 90% of 40 probes succeeded, like us-east-1, not held")
    held = Says("errors", "degraded", "payments: 12 of 40 failed, not held against eu-west-1", "orders: 9 of 40 failed")
    judge = Judge([unheld, held], {"eu-west-1": ("orders", "payments")})
    judge.judge(WindowStore(60), T0)
    verdict = judge.verdicts["eu-west-1"]
    assert verdict.status == "degraded"
    assert verdict.reasons == (
        "orders: 9 of 40 failed",
        "payments: 12 of 40 failed, not held against eu-west-1",
        "orders: 90% of 40 probes succeeded, like us-east-1, not held",
    )


def test_a_region_moving_between_degraded_and_unhealthy_keeps_when_it_went_bad():
    class Flips:
        name = "flips"

        def __init__(self) -> None:
            self.statuses = iter(["healthy", "degraded", "unhealthy", "degraded", "unhealthy", "healthy", "degraded"])

        def assess(self, _view, _now):
            return Assessment(next(self.statuses))

    judge = Judge([Flips()], {"eu-west-1": ("api",)})
    seen = []
    for t in range(7):
        judge.judge(WindowStore(60), T0 + t)
        v = judge.verdicts["eu-west-1"]
        seen.append((v.status, v.since - T0, None if v.bad_since is None else v.bad_since - T0))
    assert seen == [
        ("healthy", 0, None),
        ("degraded", 1, 1),
        ("unhealthy", 2, 1),  # `since` restarts at each move; `bad_since` does not
        ("degraded", 3, 1),
        ("unhealthy", 4, 1),
        ("healthy", 5, None),
        ("degraded", 6, 6),
    ]


def test_judge_keeps_since_and_reports_only_transitions():
    store = WindowStore(POLICY.window)
    judge = Judge([ThresholdDetector(POLICY)], {"eu-west-1": ("api",)})
    assert [t.verdict.status for t in judge.judge(store, T0)] == ["unknown"]
    feed(store, [result(T0 + i) for i in range(5)])
    transitions = judge.judge(store, T0 + 5)
    assert [(t.previous, t.verdict.status) for t in transitions] == [("unknown", "healthy")]
    assert judge.judge(store, T0 + 6) == []
    assert judge.verdicts["eu-west-1"].since == T0 + 5
    assert judge.verdicts["eu-west-1"].at == T0 + 6


@pytest.mark.parametrize(
    ("statuses", "combined"),
    [
        ((), "unknown"),
        (("healthy", "healthy"), "healthy"),
        (("healthy", "unknown"), "unknown"),
        (("unknown", "degraded"), "degraded"),
        (("degraded", "unhealthy", "healthy"), "unhealthy"),
    ],
)
def test_detectors_combine_with_failure_over_ignorance_over_health(statuses, combined):
    assert combine(Assessment(s) for s in statuses) == combined


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 120), st.booleans()), max_size=60), st.floats(0, 200))
def test_no_fresh_data_is_never_healthy(outcomes, now):
    stamped = [(T0 + at, ok) for at, ok in outcomes]  # judge the same floats the code sees
    now = T0 + now
    verdict = judge_once([result(at, ok=ok, error_class="status") for at, ok in stamped], now)
    fresh = [at for at, _ in stamped if 0 <= now - at <= POLICY.stale_after]
    if not fresh:
        assert verdict.status == "unknown"
    if verdict.status == "healthy":
        in_window = [ok for at, ok in stamped if now - POLICY.window < at <= now]
        assert len(in_window) >= POLICY.min_samples
        assert sum(in_window) / len(in_window) >= POLICY.degraded_below


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 100), st.booleans()), max_size=60),
    st.floats(0, 120),
    st.floats(1, 200),
    st.floats(0, 50),
)
def test_failure_counts_from_failure_times_match_the_samples(outcomes, now, span, trim_at):
    window = Window(span=60)
    for at, ok in outcomes:  # out of order too
        window.add(Result("eu-west-1", "api", "controller", at, ok=ok, latency=0.1))
    window.trim(trim_at)
    assert window.failures(now, span) == sum(not s[OK] for s in window.samples(now, span))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 400), st.booleans(), st.booleans()), max_size=700),
    st.lists(st.floats(0, 400), max_size=4),
    st.floats(0, 450),
    st.floats(1, 200),
)
def test_a_window_answers_as_a_plain_filter_of_what_it_kept(outcomes, trims, now, span):
    # Adds out of order, trims (enough to drop the front in batches), then every question the
    # detectors ask, against the same answers computed from the kept results by hand.
    window = Window(span=60)
    kept: list[tuple[float, bool, bool]] = []
    for i, (at, ok, scheduled) in enumerate(outcomes):
        reason = "scheduled" if scheduled else "suspicion"
        window.add(Result("eu-west-1", "api", "controller", at, ok=ok, latency=0.1, reason=reason))
        kept.append((at, ok, scheduled))
        if trims and i % 100 == 99:
            cut = trims[i // 100 % len(trims)]
            window.trim(cut)
            kept = [k for k in kept if k[0] > cut - 60]
    kept.sort(key=lambda k: k[0])
    expected = [k for k in kept if now - span < k[0] <= now]
    assert [(s[AT], s[OK]) for s in window.samples(now, span)] == [(at, ok) for at, ok, _ in expected]
    assert len(window) == len(kept)
    assert window.first_at() == (kept[0][0] if kept else None)
    before = [k for k in kept if k[0] <= now]
    assert window.age(now) == (now - before[-1][0] if before and now - before[-1][0] < 60 else None)
    newest = [k for k in reversed(kept) if k[0] <= now]
    run = []
    for at, ok, scheduled in newest:
        if ok or at <= now - span:
            break
        run.append(scheduled)
    assert window.last_failed(2, now, span) == (sum(run) >= 2)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from("abc"),
            st.floats(0, 3),  # seconds since the result before
            st.one_of(st.just(0.0), st.just(0.0), st.floats(0, 20)),  # how late it comes
            st.booleans(),
            st.integers(1, 50),
        ),
        max_size=400,
    ),
    st.lists(
        st.tuples(st.integers(1, 20), st.floats(-5, 30), st.sampled_from(["abc", "abc", "abc", "ab", "a", "ca"])),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([30.0, 60.0]),
)
def test_a_span_view_followed_as_results_come_answers_as_the_samples_do(outcomes, looks, span):
    # The threshold detector's counts and latency quantile come from a probe's span view over
    # its fresh windows, moved on at every look (and started over when the clock goes back, a
    # result comes late or the windows asked change): at every look it must hold what the
    # samples within (now - span, now] of the windows asked hold, pooled. Results come nearly
    # in order, some late; the windows are trimmed (and compacted) at each look.
    windows = {v: Window(span=90) for v in "abc"}
    clock, i = 0.0, 0
    for every, ahead, asked in looks * 3:
        for vantage, gap, late, ok, tenths in outcomes[i : i + every]:
            clock += gap
            windows[vantage].add(Result("eu-west-1", "api", vantage, clock - late, ok=ok, latency=tenths / 10))
        i = (i + every) % max(1, len(outcomes))
        now = clock + ahead
        for window in windows.values():
            window.trim(now)
        samples = [s for v in asked for s in windows[v].samples(now, span)]
        view = span_view(tuple(windows[v] for v in asked), now, span)
        assert view.count() == len(samples)
        assert list(view.latencies) == sorted(s[LATENCY] for s in samples if s[OK])
        stats = WindowStats.of([windows[v] for v in asked], now, span)
        assert stats == WindowStats.pooled(samples)


@pytest.mark.parametrize("look_every", [1, 100])
def test_a_span_view_holds_while_the_window_drops_its_trimmed_front_in_batches(look_every):
    # Ten results a second for 200 s, a 60 s window trimmed every second and looked at every
    # second (or every 100 s: the window trims and drops past what the view last held), and a
    # second window the view pools with: the trimmed front is dropped in batches
    # (COMPACT_AFTER) under a live view.
    windows = (Window(span=60), Window(span=60))
    rng = random.Random(3)
    for second in range(200):
        for tenth in range(10):
            at = second + tenth / 10
            for window in windows:
                window.add(Result("eu-west-1", "api", "controller", at, ok=rng.random() > 0.1, latency=rng.random()))
        now = second + 1.0
        for window in windows:
            window.trim(now)
        if second % look_every:
            continue
        samples = [s for window in windows for s in window.samples(now, 30)]
        view = span_view(windows, now, 30)
        assert (view.count(), list(view.latencies)) == (len(samples), sorted(s[LATENCY] for s in samples if s[OK]))


@pytest.mark.parametrize("every", [1.0, 0.25, 10.0])
def test_a_store_trims_each_window_in_its_turn_and_no_reader_sees_past_the_span(every):
    # A trim trims the next windows in turn, as many as its time since the last is a share of
    # TRIM_SECONDS: each window holds at most that long past its span (and a trim's gap), and
    # what a reader asks is what a trim of every window would leave.
    store = WindowStore(span=30)
    late = TRIM_SECONDS + every + 1  # seconds past the span a window may hold, at one result a second
    for second in range(120):
        for probe in range(20):
            store.add(Result("eu-west-1", f"p{probe}", "controller", float(second), ok=second % 7 != 0, latency=0.1))
        now = second + 0.5
        if second % every == 0 or every < 1:
            for tick in range(max(1, round(1 / every))):
                store.trim(now - 1 + (tick + 1) * min(1.0, every))
        held = [len(w) for w in store.region("eu-west-1").values()]
        assert max(held) <= 30 + late
        if every < TRIM_SECONDS and second >= 30 + late:
            assert min(held) < max(held)  # not every window trimmed at once
        for window in store.region("eu-west-1").values():
            assert second - 29 - late <= (window.first_at() or 0) <= max(0, second - 29)
            assert window.age(now) == 0.5
            assert window.samples(now) == window.samples(now, 30)
            assert len(window.samples(now)) == min(second + 1, 30)
        assert store.region("eu-west-1")[("p0", "controller")].age(now + 30) is None  # nothing within the span


@pytest.mark.parametrize("late", [3, LATE_KEPT + 5])
def test_a_span_view_takes_in_results_that_came_late_and_starts_over_past_what_a_window_remembers(late, monkeypatch):
    # Parallel runs on suspicion come back out of order: a few late results a pass are taken in
    # where they went; past the LATE_KEPT a window remembers, the view starts over (in the same
    # object: see `_SpanView.start`). Either way it holds what the samples do.
    started = []
    start = _SpanView.start
    monkeypatch.setattr(_SpanView, "start", lambda view, *args: (started.append(args[2]), start(view, *args))[1])
    windows = (Window(span=60), Window(span=60))
    for second in range(40):
        for window in windows:
            window.add(
                Result("eu-west-1", "api", "controller", float(second), ok=second % 5 != 0, latency=second / 100)
            )
    before = span_view(windows, 40.0, 30)
    for i in range(late):  # into the span, before it and on its edge, failed or not
        at = (5.0, 10.0, 10.5, 25.0, 38.5)[i % 5] + i / 1000
        windows[0].add(Result("eu-west-1", "api", "controller", at, ok=i % 3 != 0, latency=i / 7))
    windows[1].add(Result("eu-west-1", "api", "controller", 40.0, ok=True, latency=0.5))  # as old as the last look
    view = span_view(windows, 41.0, 30)
    samples = [s for window in windows for s in window.samples(41.0, 30)]
    assert (view.count(), list(view.latencies)) == (len(samples), sorted(s[LATENCY] for s in samples if s[OK]))
    assert view is before
    assert (41.0 in started) == (late > LATE_KEPT)


def test_a_probe_s_view_stays_while_one_of_its_windows_is_asked_alone_and_keeps_no_window_alive():
    windows = tuple(Window(span=60) for _ in range(3))
    for second in range(30):
        for window in windows:
            window.add(Result("eu-west-1", "api", "controller", float(second), ok=True, latency=0.1))
    pooled = span_view(windows, 30.0, 30)
    alone = span_view(windows[:1], 30.0, 30)  # a vantage of a probe found bad: every pass
    assert span_view(windows, 31.0, 30) is pooled
    assert span_view(windows[:1], 31.0, 30) is alone
    # A view names its windows by number: dropping them frees them without a collection (a
    # cycle would outlive a store dropped after gc.freeze).
    gc.collect()
    gc.disable()
    try:
        del windows, pooled, alone
        assert gc.collect() == 0
    finally:
        gc.enable()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["eu", "us"]),
            st.sampled_from(["api", "home"]),
            st.sampled_from("abc"),
            st.floats(0, 5),  # seconds since the result before
            st.floats(-10, 40),  # how late it comes (ahead of the clock when negative)
            st.booleans(),
        ),
        max_size=300,
    ),
    st.lists(st.tuples(st.integers(1, 15), st.floats(-20, 10), st.sampled_from([30.0, 30.0, 10.0, 60.0])), min_size=1),
)
def test_the_windows_that_failed_lately_are_every_window_whose_newest_failure_is_that_recent(outcomes, looks):
    # The suspects look only at the windows `failed_lately` gives; with results late and ahead
    # of the clock, trims, the clock going back and the span asked about changing, those must be
    # every window (in the region's order) whose newest failure a look at each would find that recent.
    store = WindowStore(span=60)
    clock, i = 0.0, 0
    for every, ahead, within in looks * 3:
        for region, probe, vantage, gap, late, ok in outcomes[i : i + every]:
            clock += gap
            store.add(Result(region, probe, vantage, clock - late, ok=ok, latency=0.1))
        i = (i + every) % max(1, len(outcomes))
        now = clock + ahead
        store.trim(now)
        for region in ("eu", "us"):
            every_window = [
                (key, w)
                for key, w in store.region(region).items()
                if (last := w.last_failure()) is not None and now - last <= within
            ]
            assert store.failed_lately(region, now, within) == every_window


def test_a_judgement_holds_garbage_collection_and_gives_it_back_even_when_it_fails():
    seen = []

    def steps():
        seen.append(gc.isenabled())
        yield
        seen.append(gc.isenabled())
        raise RuntimeError("a detector broke")

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        finish(steps())
    assert seen == [False, False]
    assert gc.isenabled()
    gc.disable()  # held by someone else already: left as it was
    try:
        with collections_held():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


class _Scripted:
    """A detector that says the given statuses, one a pass, and records the recovery it was shown."""

    name = "scripted"

    def __init__(self, *statuses: str) -> None:
        self.statuses = iter(statuses)
        self.shown: list[float | None] = []

    def assess(self, view, now: float) -> Assessment:  # noqa: ARG002 - the Detector protocol's
        self.shown.append(view.cleared_at)
        return Assessment(next(self.statuses))


@pytest.mark.parametrize(
    ("passes", "shown"),
    [
        # Never failing: no recovery to show.
        (((0, "healthy"), (10, "healthy")), [None, None]),
        # Degraded, then healthy once recover_after (5 s) has passed since: a recovery at 10.
        (((0, "degraded"), (2, "healthy"), (10, "healthy"), (11, "healthy")), [None, None, None, 10.0]),
        # Through unknown (stale) on the way back: still a recovery, once healthy.
        (((0, "unhealthy"), (2, "unknown"), (10, "healthy"), (11, "healthy")), [None, None, None, 10.0]),
        # Failing again after it: the next recovery moves it.
        (
            ((0, "degraded"), (10, "healthy"), (11, "degraded"), (20, "healthy"), (21, "healthy")),
            [None, None, 10.0, 10.0, 20.0],
        ),
    ],
)
def test_the_detectors_are_shown_when_the_region_last_recovered(passes, shown):
    detector = _Scripted(*(status for _, status in passes))
    judge = Judge([detector], {"eu-west-1": ("api",)}, POLICY.model_copy(update={"recover_after": 5.0}))
    for now, _ in passes:
        judge.judge(WindowStore(60.0), float(now))
    assert detector.shown == shown


@given(
    st.lists(st.tuples(st.integers(0, 400), st.booleans()), max_size=300),
    st.floats(0, 450),
    st.sampled_from([10.0, 30.0]),
)
def test_a_windows_failure_cusum_from_its_columns_is_the_cusum_of_its_samples(outcomes, now, span):
    # The suspects' evidence of one target, read from the outcome column: exactly what walking
    # the samples gives, late results and shared start times included.
    good, bad = -0.03, 3.4
    window = Window(span=600)
    for tenths, ok in outcomes:
        window.add(Result("eu-west-1", "api", "controller", tenths / 10, ok=ok, latency=0.1))
    walked = 0.0
    for sample in window.samples(now, span):
        walked = max(0.0, walked + (good if sample[OK] else bad))
    assert window.failure_cusum(now, span, good, bad) == walked


def test_latencies_by_slice_put_samples_a_rounding_off_a_slice_boundary_where_the_slice_index_says():
    """A slice's samples are found by a bisect at its boundary, then the index says exactly: at
    a boundary and one float step either side, for many anchors, each sample is in the slice
    `floor((at - anchor) / width)` puts it in (the two disagree at a third of such points)."""
    rng = random.Random(3)
    for _ in range(300):
        anchor, width = rng.uniform(-50, 50), rng.choice([10.0, 60.0])
        window = Window(span=10_000)
        expected: dict[int, list[float]] = {}
        for k in range(1, 8):
            boundary = anchor + k * width
            for n, at in enumerate((math.nextafter(boundary, -math.inf), boundary, math.nextafter(boundary, math.inf))):
                latency = (k * 10 + n + 1) / 1e3
                window.add(Result("eu-west-1", "api", "controller", at, ok=True, latency=latency))
                expected.setdefault(math.floor((at - anchor) / width), []).append(latency)
        assert window.latencies_by_slice(-math.inf, math.inf, anchor, width, lambda _: True) == expected
