"""The lease in the state database: for controllers that share one state file (one host, or a
shared disk with working locks). A holder on this host whose process is provably gone (see
`controller.state.holder`) hands the lease over before it expires."""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.state.holder import provably_gone

if TYPE_CHECKING:
    from collections.abc import Callable

    from controller.state.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
"""


class SqliteLease:
    def __init__(
        self,
        db: Database,
        holder: str,
        ttl: float,
        *,
        name: str = "writer",
        gone: Callable[[str], bool] = provably_gone,
    ) -> None:
        self._db = db
        self._holder = holder
        self.ttl = ttl
        self.name = name
        self._gone = gone

    @property
    def holder(self) -> str:
        return self._holder

    async def acquire(self, now: float) -> int | None:
        holder, name, ttl, gone = self._holder, self.name, self.ttl, self._gone

        def swap() -> int | None:
            db = self._db.db
            db.execute("BEGIN IMMEDIATE")  # one acquirer at a time across processes
            try:
                row = db.execute("SELECT holder, token, expires_at FROM lease WHERE name = ?", (name,)).fetchone()
                if row is None:
                    token = 1
                    db.execute("INSERT INTO lease VALUES (?, ?, ?, ?)", (name, holder, token, now + ttl))
                elif row["holder"] == holder and row["expires_at"] > now:
                    token = int(row["token"])
                    db.execute("UPDATE lease SET expires_at = ? WHERE name = ?", (now + ttl, name))
                elif row["expires_at"] <= now or gone(str(row["holder"])):
                    token = int(row["token"]) + 1
                    db.execute(
                        "UPDATE lease SET holder = ?, token = ?, expires_at = ? WHERE name = ?",
                        (holder, token, now + ttl, name),
                    )
                else:
                    db.execute("COMMIT")
                    return None
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return token

        return await self._db.run(swap)

    async def renew(self, token: int, now: float) -> bool:
        def extend() -> bool:
            cursor = self._db.db.execute(
                "UPDATE lease SET expires_at = ? WHERE name = ? AND holder = ? AND token = ? AND expires_at > ?",
                (now + self.ttl, self.name, self._holder, token, now),
            )
            return cursor.rowcount == 1

        return await self._db.run(extend)

    async def release(self, token: int) -> None:
        def expire() -> None:
            self._db.db.execute(
                "UPDATE lease SET expires_at = 0 WHERE name = ? AND holder = ? AND token = ?",
                (self.name, self._holder, token),
            )

        await self._db.run(expire)

    async def held_by(self, now: float) -> tuple[str, int] | None:
        def read() -> tuple[str, int] | None:
            row = self._db.db.execute(
                "SELECT holder, token, expires_at FROM lease WHERE name = ?", (self.name,)
            ).fetchone()
            return (str(row["holder"]), int(row["token"])) if row is not None and row["expires_at"] > now else None

        return await self._db.run(read)

    async def holds(self, token: int, now: float) -> bool:
        def read() -> bool:
            row = self._db.db.execute(
                "SELECT holder, token, expires_at FROM lease WHERE name = ?", (self.name,)
            ).fetchone()
            return (
                row is not None and row["holder"] == self._holder and row["token"] == token and row["expires_at"] > now
            )

        return await self._db.run(read)
