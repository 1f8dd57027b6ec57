"""The state store: everything the controller keeps across restarts, in one SQLite database.

`async with Store(path) as store:` opens it; its parts are `store.audit` (the append-only log
of every weight change), `store.ramps` (where each ramp stands), `store.flags` (the freeze,
home weights) and `store.baselines` (latency baselines); `store.lease(holder, ttl)` is the
writer lease kept in the same file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from controller.state import audit, baselines, flags, ramp_states
from controller.state.database import Database
from controller.state.holder import provably_gone
from controller.state.leases import sqlite as sqlite_lease

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import TracebackType


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.db = Database(
            path, (audit.SCHEMA, ramp_states.SCHEMA, flags.SCHEMA, sqlite_lease.SCHEMA, baselines.SCHEMA)
        )
        self.audit = audit.AuditLog(self.db)
        self.ramps = ramp_states.RampStates(self.db)
        self.flags = flags.Flags(self.db)
        self.baselines = baselines.StoredBaselines(self.db)

    def lease(
        self, holder: str, ttl: float, *, name: str = "writer", gone: Callable[[str], bool] = provably_gone
    ) -> sqlite_lease.SqliteLease:
        return sqlite_lease.SqliteLease(self.db, holder, ttl, name=name, gone=gone)

    async def __aenter__(self) -> Self:
        await self.db.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.db.__aexit__(exc_type, exc, tb)
