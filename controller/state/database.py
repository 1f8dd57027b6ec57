"""The state database: one SQLite file in WAL mode, on one thread of its own so the event loop
never blocks on the disk. Each part of the state (the audit log, ramp states, flags, the lease)
brings its own tables; the database creates whichever are missing when it opens.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from types import TracebackType

T = TypeVar("T")


class Database:
    """Use as `async with Database(path, schemas) as db:`; `run` calls a function on its thread."""

    def __init__(self, path: Path | str, schemas: Sequence[str]) -> None:
        self.path = str(path)
        self.schemas = tuple(schemas)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regionshift-store")
        self._db: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        await self.run(self._open)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.run(self._close)
        self._executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; transactions explicit
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an intent must survive a power cut
        db.execute("PRAGMA foreign_keys=ON")
        for schema in self.schemas:
            db.executescript(schema)
        db.row_factory = sqlite3.Row
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db
