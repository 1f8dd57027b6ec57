"""Ramp states: where each ramp stands, kept so a restart resumes it where it was."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.state.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS ramps (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


class RampStates:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(self, name: str, state: Mapping[str, Any], at: float) -> None:
        def write() -> None:
            self._db.db.execute(
                "INSERT INTO ramps (name, state, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                (name, json.dumps(dict(state)), at),
            )

        await self._db.run(write)

    async def load(self) -> dict[str, dict[str, Any]]:
        def read() -> dict[str, dict[str, Any]]:
            return {row["name"]: json.loads(row["state"]) for row in self._db.db.execute("SELECT * FROM ramps")}

        return await self._db.run(read)
