"""Flags the controller keeps across restarts, each with its own type: the operators' freeze, and
each record set's home weights (where an evacuation comes back to) and the weights it held when
regionshift first saw it (what a hand edit is told from before regionshift has written any)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.state.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS flags (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


class Freeze(TypedDict):
    by: str
    reason: str
    at: float


class Flags:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def frozen(self) -> Freeze | None:
        """Who froze shifting, why and when; None while it is not frozen."""
        value = await self._get("frozen")
        return Freeze(by=str(value["by"]), reason=str(value["reason"]), at=float(value["at"])) if value else None

    async def set_frozen(self, freeze: Freeze | None, at: float) -> None:
        await self._set("frozen", freeze, at)

    async def home(self, record: str) -> dict[str, int] | None:
        """The weights `record` holds when all is well, if remembered."""
        value = await self._get(f"home:{record}")
        return {str(k): int(v) for k, v in value.items()} if value is not None else None

    async def set_home(self, record: str, weights: Mapping[str, int], at: float) -> None:
        await self._set(f"home:{record}", dict(weights), at)

    async def seen(self, record: str) -> dict[str, int] | None:
        """The weights `record` held when regionshift first saw it, if remembered."""
        value = await self._get(f"seen:{record}")
        return {str(k): int(v) for k, v in value.items()} if value is not None else None

    async def set_seen(self, record: str, weights: Mapping[str, int], at: float) -> None:
        await self._set(f"seen:{record}", dict(weights), at)

    async def _set(self, name: str, value: Any, at: float) -> None:
        def write() -> None:
            self._db.db.execute(
                "INSERT INTO flags (name, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (name, json.dumps(value), at),
            )

        await self._db.run(write)

    async def _get(self, name: str) -> Any:
        def read() -> Any:
            row = self._db.db.execute("SELECT value FROM flags WHERE name = ?", (name,)).fetchone()
            return json.loads(row["value"]) if row else None

        return await self._db.run(read)
