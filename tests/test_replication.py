"""The PostgreSQL heartbeat lag probe against a real primary and streaming replica on loopback."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from pydantic import ValidationError

from probes.kinds.replication import PostgresLagProber
from probes.spec import PostgresLagProbe, Secret
from tests.postgres import primary_and_replica

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with primary_and_replica() as c:
        yield c


@pytest.fixture
def env(cluster, monkeypatch):
    monkeypatch.setenv("RS_PG_PRIMARY", cluster.primary)
    monkeypatch.setenv("RS_PG_REPLICA", cluster.replica)
    return cluster


def spec(**kw) -> PostgresLagProbe:
    fields = {
        "name": "orders-db",
        "interval": 1.0,
        "timeout": 0.5,
        "primary": Secret(env="RS_PG_PRIMARY"),
        "replica": Secret(env="RS_PG_REPLICA"),
        "stalled_after": 1.0,
    } | kw
    return PostgresLagProbe(**fields)


async def runs(prober: PostgresLagProber, n: int, pause: float = 0.0):
    out = []
    for _ in range(n):
        out.append(await prober())
        await asyncio.sleep(pause)
    return out


async def test_lag_is_timed_from_the_primary_commit_to_the_replica_on_the_prober_s_clock(env):
    prober = PostgresLagProber(spec(), "eu-west-1", "controller")
    try:
        results = await runs(prober, 5)
    finally:
        await prober.close()
    assert all(r.ok for r in results), [r.error for r in results]
    lags = [r.extra["lag_seconds"] for r in results]
    assert all(0 <= lag < 0.45 for lag in lags), lags  # seen within the timeout, on one clock
    assert [r.latency for r in results] == lags
    assert results[-1].extra["replicas"] == 1  # pg_stat_replication rides along
    assert results[-1].extra["pg_bytes_behind"] >= 0


async def test_an_idle_primary_is_not_lag(env):
    prober = PostgresLagProber(spec(), "eu-west-1", "controller")
    replica = await asyncpg.connect(env.replica)
    try:
        await prober()
        await asyncio.sleep(2.0)  # nothing writes on the primary meanwhile
        naive = await replica.fetchval("SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8")
        result = await prober()
    finally:
        await replica.close()
        await prober.close()
    assert naive >= 1.5  # the usual query calls an idle primary's replica two seconds behind
    assert result.ok
    assert result.extra["lag_seconds"] < 0.45


async def test_paused_replay_is_growing_lag_then_stalled_never_zero_and_recovers_after_resume(env):
    prober = PostgresLagProber(spec(), "eu-west-1", "controller")
    replica = await asyncpg.connect(env.replica)
    try:
        assert (await prober()).ok
        await replica.execute("SELECT pg_wal_replay_pause()")
        paused = await runs(prober, 4, pause=0.2)
        await replica.execute("SELECT pg_wal_replay_resume()")
        resumed = await runs(prober, 2)
    finally:
        await replica.execute("SELECT pg_wal_replay_resume()")
        await replica.close()
        await prober.close()
    assert not any(r.ok for r in paused)
    assert all(r.extra["lag_seconds"] is None for r in paused)  # unknown, never zero
    growing = [r.extra["lag_at_least"] for r in paused]
    assert growing == sorted(growing)
    assert growing[-1] > growing[0] + 1.0
    assert paused[0].error_class == "lagging"
    assert paused[-1].error_class == "stalled"
    assert paused[-1].extra["stalled"] is True
    assert "growing" in (paused[-1].error or "")
    assert paused[-1].extra["pg_bytes_behind"] > 0  # PostgreSQL agrees: WAL is piling up
    assert resumed[-1].ok
    assert resumed[-1].extra["lag_seconds"] < 0.45


async def test_a_primary_back_from_an_outage_is_lagging_before_it_is_stalled(env, monkeypatch):
    # While the primary is away nothing is written, so the replica has nothing new to show: the
    # stall counts from the first heartbeat written after it returns, not from the last one seen.
    prober = PostgresLagProber(spec(), "eu-west-1", "controller")
    replica = await asyncpg.connect(env.replica)
    try:
        assert (await prober()).ok
        monkeypatch.setenv("RS_PG_PRIMARY", "postgresql://rs@127.0.0.1:1/none")  # refused
        await prober.close()
        away = await runs(prober, 3, pause=0.6)  # longer than stalled_after with nothing written
        monkeypatch.setenv("RS_PG_PRIMARY", env.primary)
        await replica.execute("SELECT pg_wal_replay_pause()")  # the replica has not caught up yet
        back = await prober()
        later = await runs(prober, 3, pause=0.3)
    finally:
        await replica.execute("SELECT pg_wal_replay_resume()")
        await replica.close()
        await prober.close()
    assert [r.error_class for r in away] == ["primary connect"] * 3
    assert back.error_class == "lagging", back.error
    assert later[-1].error_class == "stalled", [r.error for r in later]


async def test_a_dead_replica_and_a_dead_primary_are_told_apart(env, monkeypatch):
    # Both were "connect": a verdict said "not measured (connect)", and the page did not say
    # whether writes or the standby's reads were gone.
    monkeypatch.setenv("RS_PG_REPLICA", "postgresql://rs@127.0.0.1:1/none")  # refused
    prober = PostgresLagProber(spec(), "eu-west-1", "controller")
    try:
        replica_down = await prober()
        monkeypatch.setenv("RS_PG_REPLICA", env.replica)
        monkeypatch.setenv("RS_PG_PRIMARY", "postgresql://rs@127.0.0.1:1/none")
        await prober.close()
        primary_down = await prober()
    finally:
        await prober.close()
    assert (replica_down.error_class, replica_down.outcome) == ("replica connect", "failure")
    assert "cannot connect to the replica" in (replica_down.error or "")
    assert (primary_down.error_class, primary_down.outcome) == ("primary connect", "failure")


def test_a_side_s_timeout_is_counted_as_a_timeout():
    subject = PostgresLagProber(spec(), "eu-west-1", "controller").subject
    timed_out = subject.lag_result(1.0, 0.5, {}, "primary timeout", "connecting to the primary timed out")
    assert timed_out.outcome == "timeout"


async def test_connection_strings_come_from_outside_the_configuration_and_never_show(monkeypatch, tmp_path):
    monkeypatch.setenv("RS_PG_PRIMARY", "postgresql://app:s3cret-pass@127.0.0.1:1/orders")  # port 1: refused
    monkeypatch.setenv("RS_PG_REPLICA", "")
    result = await PostgresLagProber(spec(), "eu-west-1", "controller")()
    assert (result.ok, result.error_class) == (False, "primary connect")
    assert "s3cret" not in repr(result)

    dsn_file = tmp_path / "primary.dsn"
    dsn_file.write_text("postgresql://app:s3cret-pass@127.0.0.1:1/orders\n")
    result = await PostgresLagProber(
        spec(primary=Secret(file=str(tmp_path / "missing.dsn"))), "eu-west-1", "controller"
    )()
    assert (result.ok, result.error_class) == (False, "primary config")
    assert "missing.dsn" in (result.error or "")

    monkeypatch.setenv("RS_PG_PRIMARY", "")
    result = await PostgresLagProber(spec(), "eu-west-1", "controller")()
    assert result.error == "primary connection string: $RS_PG_PRIMARY is empty or not set"

    monkeypatch.setenv("RS_PG_PRIMARY", "postgresql://app:s3cret-pass@127.0.0.1:notaport/orders?sslmode=bogus")
    result = await PostgresLagProber(spec(), "eu-west-1", "controller")()
    assert (result.ok, result.error_class) == (False, "primary connect")
    assert "s3cret" not in repr(result)
    assert "$RS_PG_PRIMARY" in (result.error or "")


def test_a_secret_is_an_environment_variable_or_a_file_never_both_nor_inline():
    with pytest.raises(ValidationError, match="exactly one of env"):
        Secret(env="A", file="/b")
    with pytest.raises(ValidationError, match="exactly one of env"):
        Secret()
    with pytest.raises(ValidationError):
        Secret(dsn="postgresql://x")  # type: ignore[call-arg]
