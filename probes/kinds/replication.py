"""The `replication-lag` probe kind, PostgreSQL source: how far a replica runs behind, timed
by heartbeat on the prober's own clock.

Each run writes a heartbeat (a token that only grows) into a one-row-per-prober table on the
primary, notes the prober's monotonic clock when the commit returns, and asks the replica for
that row every `poll` seconds until the token is visible: the lag is the time between the two,
on one clock. No clock skew between hosts enters it, and an idle primary shows no false lag (the
naive `now() - pg_last_xact_replay_timestamp()` grows whenever nothing is written; the heartbeat
is itself a write). Resolution is about `poll` plus one query's round trip.

When the token does not show up within the probe's timeout, the lag is unknown; the result says
it is at least as old as the oldest heartbeat the replica has not shown yet, and that grows run
after run. When the replica's row has not advanced for `stalled_after` while heartbeats were
written, replication is `stalled`. Neither is ever reported as zero lag.

What PostgreSQL itself says rides along as extra fields when the probe may read it:
`pg_stat_replication`'s replay lag and the bytes between the primary's WAL and the replica's
replay position. Connection strings are read from the environment or a file at run time; they
are never logged or put in a result.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from probes.results import Result, Subject

if TYPE_CHECKING:
    from probes.spec import PostgresLagProbe

# Kept back from the timeout for reading pg_stat_replication and building the result.
MARGIN = 0.05


class PostgresLagProber:
    """Runs one `PostgresLagProbe` for a region from a vantage; keeps its connections and the
    heartbeats the replica has not shown yet between runs."""

    def __init__(self, spec: PostgresLagProbe, region: str, vantage: str) -> None:
        self.spec = spec
        self.subject = Subject(region, spec.name, vantage)
        self.key = f"{vantage}/{region}/{spec.name}"  # this prober's row
        self._connections: dict[str, asyncpg.Connection] = {}
        self._table_ready = False
        self._token = 0
        self._unseen: dict[int, float] = {}  # token -> monotonic time its commit returned
        self._visible: int | None = None  # the newest token the replica has shown
        self._advanced_at: float | None = None  # monotonic time the replica's token last moved

    async def __call__(self) -> Result:
        started_at = time.time()
        start = time.monotonic()
        deadline = start + self.spec.timeout - MARGIN
        extra: dict[str, Any] = {"lag_seconds": None, "stalled": False}
        try:
            primary = await self._connect("primary", deadline)
            replica = await self._connect("replica", deadline)
            token, written = await self._write(primary, deadline)
            lag = await self._wait_for(replica, token, written, deadline)
            if lag is not None:
                extra["lag_seconds"] = lag
            extra.update(await self._postgres_says(primary, deadline))
        except _RunError as exc:
            self._drop(exc.side)
            return self._result(started_at, start, extra, exc.error_class, exc.message)
        if lag is not None:
            return self._result(started_at, start, extra, None, None)
        now = time.monotonic()
        oldest = min(self._unseen.values(), default=written)
        extra["lag_at_least"] = round(now - oldest, 3)
        # Stalled counts from when a heartbeat was waiting to be shown: the oldest unseen one's
        # write, or the replica's last move after it. From its last move alone, a primary away
        # for longer than `stalled_after` (nothing written, nothing to show) came back "stalled"
        # at its first heartbeat the replica had not caught up to yet, and held the region.
        since = max(self._advanced_at, oldest) if self._advanced_at is not None else oldest
        if now - since >= self.spec.stalled_after:
            extra["stalled"] = True
            message = (
                f"replication stalled: the replica has shown no new heartbeat for {now - since:.1f}s; "
                f"lag unknown, at least {now - oldest:.1f}s and growing"
            )
            return self._result(started_at, start, extra, "stalled", message)
        message = f"heartbeat not on the replica within {self.spec.timeout:g}s: lag at least {now - oldest:.1f}s"
        return self._result(started_at, start, extra, "lagging", message)

    async def close(self) -> None:
        for side in list(self._connections):
            connection = self._connections.pop(side)
            await connection.close(timeout=1.0)

    def _result(
        self, started_at: float, start: float, extra: dict[str, Any], error_class: str | None, error: str | None
    ) -> Result:
        return self.subject.lag_result(started_at, time.monotonic() - start, extra, error_class, error)

    async def _connect(self, side: str, deadline: float) -> asyncpg.Connection:
        connection = self._connections.get(side)
        if connection is not None and not connection.is_closed():
            return connection
        secret = self.spec.primary if side == "primary" else self.spec.replica
        try:
            dsn = secret.read()
        except LookupError as exc:
            raise _RunError("config", f"{side} connection string: {exc}", side) from None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                connection = await asyncpg.connect(dsn)
        except TimeoutError:
            raise _RunError("timeout", f"connecting to the {side} timed out", side) from None
        except (OSError, asyncpg.PostgresError) as exc:
            # The class and the server's or the socket's own message; never the connection string.
            raise _RunError("connect", f"cannot connect to the {side}: {_describe(exc)}", side) from None
        except Exception as exc:  # noqa: BLE001 - a malformed string's error may quote it: name the class only
            message = f"cannot connect to the {side}: {type(exc).__name__} (check {secret.where})"
            raise _RunError("connect", message, side) from None
        self._connections[side] = connection
        return connection

    async def _write(self, primary: asyncpg.Connection, deadline: float) -> tuple[int, float]:
        table = self.spec.table
        self._token = max(self._token + 1, time.time_ns() // 1000)  # grows across restarts too
        token = self._token
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                if not self._table_ready:
                    await primary.execute(
                        f"CREATE TABLE IF NOT EXISTS {table} "
                        "(prober text PRIMARY KEY, token bigint NOT NULL, written_at double precision NOT NULL)"
                    )
                    self._table_ready = True
                await primary.execute(
                    f"INSERT INTO {table} (prober, token, written_at) VALUES ($1, $2, $3) "  # noqa: S608
                    "ON CONFLICT (prober) DO UPDATE SET token = EXCLUDED.token, written_at = EXCLUDED.written_at",
                    self.key,
                    token,
                    time.time(),
                )
        except TimeoutError:
            raise _RunError("timeout", "writing the heartbeat on the primary timed out", "primary") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _RunError(
                "query", f"writing the heartbeat on the primary failed: {_describe(exc)}", "primary"
            ) from None
        written = time.monotonic()
        self._unseen[token] = written
        return token, written

    async def _wait_for(self, replica: asyncpg.Connection, token: int, written: float, deadline: float) -> float | None:
        """Seconds from the commit until the replica shows `token`; None when it did not by the deadline."""
        query = f"SELECT token FROM {self.spec.table} WHERE prober = $1"  # noqa: S608 - validated identifier
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    visible = await replica.fetchval(query, self.key)
            except TimeoutError:
                return None
            except asyncpg.UndefinedTableError:
                visible = None  # the table's creation has not reached the replica yet
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise _RunError(
                    "query", f"reading the heartbeat on the replica failed: {_describe(exc)}", "replica"
                ) from None
            now = time.monotonic()
            self._saw(visible, now)
            if visible is not None and visible >= token:
                return round(now - written, 4)
            if now + self.spec.poll >= deadline:
                return None
            await asyncio.sleep(self.spec.poll)

    def _saw(self, visible: int | None, now: float) -> None:
        if visible is None:
            return
        if visible != self._visible:
            self._visible, self._advanced_at = visible, now
        for token in [t for t in self._unseen if t <= visible]:
            del self._unseen[token]

    async def _postgres_says(self, primary: asyncpg.Connection, deadline: float) -> dict[str, Any]:
        """pg_stat_replication as PostgreSQL reports it (the worst replica), or nothing when the
        role may not read it or time is up: these are extra fields, never the verdict."""
        try:
            async with asyncio.timeout(max(0.01, deadline + MARGIN / 2 - time.monotonic())):
                rows = await primary.fetch(
                    "SELECT extract(epoch FROM replay_lag)::float8 AS replay_lag, "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 AS bytes_behind "
                    "FROM pg_stat_replication"
                )
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return {}
        lags = [r["replay_lag"] for r in rows if r["replay_lag"] is not None]
        behind = [r["bytes_behind"] for r in rows if r["bytes_behind"] is not None]
        out: dict[str, Any] = {"replicas": len(rows)}
        if lags:
            out["pg_replay_lag_seconds"] = round(max(lags), 4)
        if behind:
            out["pg_bytes_behind"] = int(max(behind))
        return out

    def _drop(self, side: str | None) -> None:
        """Forget a connection that failed so the next run opens a fresh one."""
        if side is not None and (connection := self._connections.pop(side, None)) is not None:
            connection.terminate()


class _RunError(Exception):
    """A run that measured nothing: `what` went wrong (config, connect, query, timeout) on
    `side`. Its error class names the side ("replica connect"): a verdict's reason shows the
    class, and a dead primary and a dead replica are different pages."""

    def __init__(self, what: str, message: str, side: str) -> None:
        super().__init__(message)
        self.error_class, self.message, self.side = f"{side} {what}", message, side


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
