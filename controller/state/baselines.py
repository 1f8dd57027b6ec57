"""Latency baselines kept across restarts: each (region, probe, vantage)'s usual latency, so a
restarted daemon judges slowdowns at once instead of waiting for new history to build one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.state.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS baselines (
    region TEXT NOT NULL,
    probe TEXT NOT NULL,
    vantage TEXT NOT NULL,
    slow REAL NOT NULL,
    median REAL NOT NULL,
    floor REAL NOT NULL,
    samples INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (region, probe, vantage)
);
"""

# (region, probe, vantage) -> (slow, median, floor, samples, computed at): plain values, so the
# store needs nothing from the judging layer.
Value = tuple[float, float, float, int, float]
Stored = dict[tuple[str, str, str], Value]


class StoredBaselines:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load(self) -> Stored:
        def read() -> Stored:
            rows = self._db.db.execute("SELECT region, probe, vantage, slow, median, floor, samples, at FROM baselines")
            return {(r[0], r[1], r[2]): (float(r[3]), float(r[4]), float(r[5]), int(r[6]), float(r[7])) for r in rows}

        return await self._db.run(read)

    async def save(self, baselines: Mapping[tuple[str, str, str], Value]) -> None:
        """Replace the stored baselines of these keys (one transaction)."""

        def write() -> None:
            db = self._db.db
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT INTO baselines (region, probe, vantage, slow, median, floor, samples, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (region, probe, vantage) DO UPDATE SET"
                    " slow = excluded.slow, median = excluded.median, floor = excluded.floor,"
                    " samples = excluded.samples, at = excluded.at",
                    [(*key, *value) for key, value in baselines.items()],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._db.run(write)
