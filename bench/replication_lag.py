"""Replication lag: how finely the PostgreSQL heartbeat probe measures lag, and how soon a paused
replica shows as lag.

Run:  make bench       (or: .venv/bin/python bench/replication_lag.py [--runs 200])

Starts a real primary and streaming replica on loopback (Debian's postgresql; as root the
servers run as the `postgres` user), then:

- lag: the probe's measured lag over `--runs` heartbeats (p50/p99), beside the anchor, one
  `SELECT 1` round trip to the replica in the same run: the probe cannot resolve lag finer than
  its poll interval plus about one such round trip;
- pause: `pg_wal_replay_pause()` on the replica, then the probe every 0.2 s (timeout 0.2 s):
  seconds until the first result that is not a measured lag (`lagging`, lag "at least"), and
  until `stalled` (stalled_after 1 s). The lag detector turns the region bad on the first of
  these that breaks its limit (see tests/test_lag.py for the daemon doing it end to end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from probes.kinds.replication import PostgresLagProber
from probes.spec import PostgresLagProbe, Secret
from tests.postgres import primary_and_replica


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(runs: int) -> None:
    with primary_and_replica() as cluster:
        os.environ["BENCH_PG_PRIMARY"] = cluster.primary
        os.environ["BENCH_PG_REPLICA"] = cluster.replica
        spec = PostgresLagProbe(
            name="bench",
            interval=1.0,
            timeout=0.5,
            primary=Secret(env="BENCH_PG_PRIMARY"),
            replica=Secret(env="BENCH_PG_REPLICA"),
            stalled_after=1.0,
        )
        prober = PostgresLagProber(spec, "eu-west-1", "bench")
        replica = await asyncpg.connect(cluster.replica)
        try:
            lags, trips = [], []
            for _ in range(runs):
                result = await prober()
                if result.ok:
                    lags.append(result.extra["lag_seconds"])
                start = time.perf_counter()
                await replica.fetchval("SELECT 1")
                trips.append(time.perf_counter() - start)
            print(f"replication lag: {runs} heartbeats, primary and replica on loopback, poll {spec.poll * 1000:g} ms")
            for label, values, tail in (
                ("measured lag     ", lags, f"  ({len(lags)}/{runs} measured)"),
                ("anchor SELECT 1  ", trips, ""),
            ):
                p50, p99 = quantile(values, 0.5) * 1000, quantile(values, 0.99) * 1000
                print(f"  {label} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms{tail}")
            print(f"  lag p50 / round trip p50: {statistics.median(lags) / statistics.median(trips):.1f}x")

            fast = PostgresLagProber(spec.model_copy(update={"timeout": 0.2, "interval": 0.2}), "eu-west-1", "bench")
            await fast()
            await replica.execute("SELECT pg_wal_replay_pause()")
            paused = time.perf_counter()
            first_bad = stalled = None
            while stalled is None and time.perf_counter() - paused < 10:
                result = await fast()
                now = time.perf_counter() - paused
                if not result.ok and first_bad is None:
                    first_bad = now
                if result.error_class == "stalled":
                    stalled = now
            await replica.execute("SELECT pg_wal_replay_resume()")
            await fast.close()
            print(
                f"  replay paused -> first unmeasured result {first_bad:.2f} s, -> stalled {stalled:.2f} s "
                "(probe every 0.2 s, timeout 0.2 s, stalled_after 1 s)"
            )
        finally:
            await replica.close()
            await prober.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="heartbeats to time (default 200)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    asyncio.run(measure(args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
