"""The state database: one SQLite file in WAL mode, on one thread of its own so the event loop
never blocks on the disk. Each part of the state (the audit log, ramp states, flags, the lease)
brings its own tables; the database creates whichever are missing when it opens.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

T = TypeVar("T")

# Written into every state file regionshift creates (PRAGMA application_id): "RgSh".
APPLICATION_ID = 0x52675368
_SQLITE_HEADER = b"SQLite format 3\x00"
_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)")


class StateError(Exception):
    """The state file cannot be used: a sentence naming the path and what to do."""


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
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:  # e.g. the disk is full, or the file was replaced
            raise StateError(f"state file {self.path}: {_sqlite_problem(exc)}") from exc

    def _open(self) -> None:
        path = Path(self.path)
        try:
            existing = _check_path(path)
        except OSError as exc:  # e.g. a directory on the way this user may not enter
            raise StateError(f"cannot use the state file {path}: {exc.strerror or exc}") from exc
        if existing:
            # Looked at read-only first: a file that is not ours, or damaged, is never written to
            # (a read-write open may roll back a journal or checkpoint a WAL left beside it).
            ours = {name for schema in self.schemas for name in _TABLE.findall(schema)}
            _inspect(path, ours)
        try:
            db = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions explicit
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state file {path}: {exc}; check the path and its permissions") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an intent must survive a power cut
            db.execute("PRAGMA foreign_keys=ON")
            for schema in self.schemas:
                db.executescript(schema)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        except sqlite3.Error as exc:
            db.close()
            raise StateError(f"cannot use the state file {path}: {_sqlite_problem(exc)}") from exc
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


def _check_path(path: Path) -> bool:
    """Refuse what is not a state file, or cannot become one, before SQLite touches it; whether
    the file exists (and so is to be inspected)."""
    if path.is_dir():
        raise StateError(f"the state file {path} is a directory; point controller.state_path at a file")
    if not path.parent.is_dir():
        raise StateError(
            f"the state file's directory {path.parent} does not exist; create it or change controller.state_path"
        )
    try:
        with path.open("rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return False  # a new state file
    except OSError as exc:
        raise StateError(f"cannot read the state file {path}: {exc.strerror or exc}") from exc
    if header and header != _SQLITE_HEADER:
        raise StateError(
            f"{path} is not a regionshift state file (not SQLite, or damaged); it was left untouched: "
            "move it aside to start afresh, or point controller.state_path elsewhere"
        )
    return bool(header)


def _inspect(path: Path, ours: set[str]) -> None:
    """An existing file, read-only: regionshift's, and intact."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open the state file {path}: {exc}; check the path and its permissions") from exc
    try:
        _check_ours(db, path, ours)
        _check_intact(db, path)
    except sqlite3.Error as exc:
        raise StateError(f"cannot use the state file {path}: {_sqlite_problem(exc)}") from exc
    finally:
        db.close()


def _check_ours(db: sqlite3.Connection, path: Path, ours: set[str]) -> None:
    """A SQLite file regionshift did not write is never written to."""
    application_id = db.execute("PRAGMA application_id").fetchone()[0]
    if application_id == APPLICATION_ID:
        return
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables -= {"sqlite_sequence"}
    # A state file from before application ids: only our tables, the audit log among them.
    if application_id == 0 and (not tables or ("audit" in tables and tables <= ours)):
        return
    foreign = ", ".join(sorted(tables - ours)) or "none of regionshift's"
    raise StateError(
        f"{path} is a SQLite file that regionshift did not create (tables: {foreign}); it was left untouched: "
        "point controller.state_path at another file"
    )


def _check_intact(db: sqlite3.Connection, path: Path) -> None:
    """Read every page once before the first write: a damaged file is refused untouched."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        raise StateError(
            f"the state file {path} is damaged ({'; '.join(problems)}); it was left untouched: "
            "move it aside, or restore it from a backup"
        )


def _sqlite_problem(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return f"{text}: regionshift needs to write the file and its directory (for the -wal and -shm files)"
    if "malformed" in text or "not a database" in text:
        return f"{text}: the file is damaged; it was left untouched: move it aside, or restore it from a backup"
    return text
