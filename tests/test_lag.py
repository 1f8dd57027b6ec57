"""Replication lag verdicts (pure), and the daemon turning a paused replica's region bad and back."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from controller.daemon import Daemon
from controller.judging.lag import LagDetector
from controller.judging.verdicts import Judge, RegionView, Verdict
from controller.judging.windows import WindowStore
from controller.planning.evacuation import plan_evacuation
from controller.planning.weights import shares
from controller.settings.policy import LagPolicy, Policy, VerdictPolicy
from controller.settings.schema import Config, ControllerSettings, Region
from probes.results import Result
from probes.spec import PostgresLagProbe, Secret
from tests import test_evacuation as evac  # the evacuation planner's fixtures
from tests.postgres import primary_and_replica
from tests.test_ramps import TTL, Sim, started  # the ramp planner on virtual time

POLICY = VerdictPolicy(
    lag=LagPolicy(threshold=30.0, sources={"postgres": 10.0}, regions={"ap-southeast-2": {"postgres": 60.0}})
)
T0 = 1_700_000_000.0


def lag_result(at: float, lag: float, error_class: str | None = None, region: str = "eu-west-1") -> Result:
    return Result(region, "db", "controller", T0 + at, ok=error_class is None, latency=lag, error_class=error_class)


def assess(results: list[Result], region: str = "eu-west-1", region_type: str = "full", now: float | None = None):
    windows = WindowStore(POLICY.history)
    for r in results:
        windows.add(r)
    detector = LagDetector(POLICY, {region: {"db": "postgres"}}, {region: region_type})
    when = T0 + (now if now is not None else results[-1].started_at - T0 + 0.1)
    return detector.assess(RegionView(region, (), windows.region(region)), when)


def test_lag_under_its_limit_is_healthy_and_over_it_degrades_the_region_with_the_reason():
    assert assess([lag_result(t, 0.05) for t in range(10)]).status == "healthy"
    over = assess([*(lag_result(t, 0.05) for t in range(9)), lag_result(9, 12.0)])
    assert over.status == "degraded"
    assert over.reasons == ("db (postgres lag): 12.0s, over its 10s limit",)
    assert over.evidence["db"]["limit"] == 10.0


def test_limits_come_per_source_then_per_region():
    assert assess([lag_result(0, 12.0, region="ap-southeast-2")], region="ap-southeast-2").status == "healthy"
    assert POLICY.lag.limit("us-east-1", "cloudwatch") == 30.0


def test_lag_growing_fast_enough_to_cross_its_limit_soon_breaks_it_before_it_does():
    growing = [lag_result(t, 0.4 + 0.2 * t) for t in range(20)]  # 4.2 s now, +0.2 s per second
    verdict = assess(growing)
    assert verdict.status == "degraded"
    assert verdict.reasons == ("db (postgres lag): 4.2s and growing 0.20s per second: crosses its 10s limit in 29s",)
    slower = [lag_result(t, 0.5 + 0.1 * t) for t in range(20)]  # would cross in 76 s: later than 60 s
    assert assess(slower).status == "healthy"
    steady = [lag_result(t, 4.2 + (0.3 if t % 2 else 0.0)) for t in range(20)]  # jitter, no trend
    assert assess(steady).status == "healthy"


def test_stalled_replication_is_never_zero_lag_and_a_read_only_region_is_unhealthy_for_it():
    results = [lag_result(t, 0.05) for t in range(5)] + [lag_result(5, 1.2, "stalled")]
    full = assess(results)
    assert full.status == "degraded"
    assert full.reasons == ("db (postgres lag): replication stalled, lag unknown and growing (at least 1.2s)",)
    assert assess(results, region_type="read-only").status == "unhealthy"


def test_no_fresh_lag_result_is_unknown_and_a_connection_failure_is_not_a_lag():
    assert assess([lag_result(0, 0.05)], now=60).status == "unknown"
    refused = assess([lag_result(0, 0.05), lag_result(1, 0.002, "connect")])
    assert refused.status == "unknown"
    assert refused.reasons == ("db (postgres lag): not measured (connect)",)
    # How long the refused run took is no lag: the evidence showed 0.002 s while the metric was NaN.
    assert (refused.evidence["db"]["lag"], refused.evidence["db"]["measured"]) == (None, False)


@pytest.mark.slow
async def test_daemon_turns_a_paused_replica_s_region_degraded_exports_the_lag_and_recovers(monkeypatch):
    with primary_and_replica() as cluster:
        monkeypatch.setenv("RS_PG_PRIMARY", cluster.primary)
        monkeypatch.setenv("RS_PG_REPLICA", cluster.replica)
        probe = PostgresLagProbe(
            name="orders-db",
            interval=0.2,
            timeout=0.2,
            primary=Secret(env="RS_PG_PRIMARY"),
            replica=Secret(env="RS_PG_REPLICA"),
            stalled_after=5.0,
        )
        policy = VerdictPolicy(window=3, stale_after=1, recover_after=1, lag=LagPolicy(sources={"postgres": 1.0}))
        config = Config(
            controller=ControllerSettings(listen="127.0.0.1:0", tick=0.1),
            regions=[Region(name="eu-west-1", probes=[probe])],
            policy=Policy(verdicts=policy),
        )
        daemon = Daemon(config)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        replica = await asyncpg.connect(cluster.replica)
        try:
            await status_becomes(daemon, "healthy", 10)
            lag = daemon.registry.get_sample_value(
                "regionshift_replication_lag_seconds", {"region": "eu-west-1", "source": "postgres"}
            )
            assert lag is not None
            assert 0 <= lag < 0.2
            # The limit it is held to, beside it (RegionshiftReplicationLagHigh compares the two).
            limit = daemon.registry.get_sample_value(
                "regionshift_replication_lag_limit_seconds", {"region": "eu-west-1", "source": "postgres"}
            )
            assert limit == 1.0
            await replica.execute("SELECT pg_wal_replay_pause()")
            paused = time.monotonic()
            await status_becomes(daemon, "degraded", 10)
            to_bad = time.monotonic() - paused
            reasons = daemon.judge.verdicts["eu-west-1"].reasons
            assert any(r.startswith("orders-db (postgres lag): at least") for r in reasons), reasons
            # The exported lag is the lower bound while replay is paused: it grows, never reads 0.
            labels = {"region": "eu-west-1", "source": "postgres"}
            first = daemon.registry.get_sample_value("regionshift_replication_lag_seconds", labels)
            await asyncio.sleep(1.0)
            later = daemon.registry.get_sample_value("regionshift_replication_lag_seconds", labels)
            assert first is not None
            assert later is not None
            assert first > 0.2
            assert later > first + 0.5
            await replica.execute("SELECT pg_wal_replay_resume()")
            await status_becomes(daemon, "healthy", 10)
        finally:
            await replica.execute("SELECT pg_wal_replay_resume()")
            await replica.close()
            stop.set()
            await asyncio.wait_for(task, 10)
        print(f"replay paused -> degraded in {to_bad:.2f}s (limit 1s, probe every 0.2s)")
        assert to_bad < 5.0


async def status_becomes(daemon: Daemon, status: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        verdict = daemon.judge.verdicts.get("eu-west-1")
        if verdict is not None and verdict.status == status:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"eu-west-1 did not become {status} within {within}s: {daemon.judge.verdicts.get('eu-west-1')}")


def test_a_lag_breach_during_a_ramp_is_a_failed_gate_and_rolls_it_back():
    sim = started(Sim())
    windows = WindowStore(POLICY.history)
    judge = Judge([LagDetector(POLICY, {"eu-west-1": {"db": "postgres"}}, {})], {"eu-west-1": ()}, POLICY)

    def lag_now(lag: float) -> str:
        windows.add(Result("eu-west-1", "db", "controller", sim.now - 0.5, ok=True, latency=lag))
        judge.judge(windows, sim.now)
        verdict = judge.verdicts["eu-west-1"]
        sim.set("eu-west-1", verdict.status)
        return verdict.status

    assert lag_now(0.05) == "healthy"
    sim.tick()
    sim.tick(TTL + 600)
    assert sim.share() == 5.0
    assert lag_now(0.05) == "healthy"
    sim.tick(TTL + 600)
    assert sim.share() == 10.0  # the ramp advances while lag is under its limit
    sim.tick(30)
    assert lag_now(14.0) == "degraded"
    assert judge.verdicts["eu-west-1"].reasons == ("db (postgres lag): 14.0s, over its 10s limit",)
    assert sim.tick(1).startswith("rollback: eu-west-1 is degraded")
    assert sim.share() == 0.0
    assert sim.state.status == "rolled_back"


def test_an_evacuation_sends_no_share_to_a_region_whose_lag_breaks_its_limit():
    # eu-west-1 is degraded and evacuated; us-east-1's replica runs 14 s behind (limit 10 s).
    lagging = assess([lag_result(t, 14.0, region="us-east-1") for t in range(5)], region="us-east-1")
    assert lagging.status == "degraded"
    now = T0 + 10
    statuses = {"eu-west-1": "degraded", "us-east-1": lagging.status, "ap-southeast-2": "healthy"}
    verdicts = {r: Verdict(r, s, (), {}, now - 3600, now) for r, s in statuses.items()}
    observed = dict(evac.HOME)
    for _ in range(5):
        result = plan_evacuation(evac.RS, evac.HOME, observed, verdicts, evac.REGIONS, evac.POLICY, evac.MAX_STEP, now)
        if result.weights is None:
            break
        before, after = shares(observed), shares(result.weights)
        assert after["use1"] <= before["use1"] + 1e-9, result.reason  # never more share to the lagging region
        observed = result.weights
        now += 70
    final = shares(observed)
    assert final["euw1"] < 25.0  # the evacuation did move share, onto ap-southeast-2 only
    assert final["apse2"] > 25.0
    assert final["use1"] <= 50.0
