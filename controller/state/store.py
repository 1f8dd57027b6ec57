"""The state store: ramp state and an append-only audit log of every weight change, in SQLite.

Every change is written here before it is sent (an intent: who or what, why, from which weights
to which) and after (its result: change id, INSYNC time, or the error), so a restart can tell a
change that was sent from one that was not, and an auditor can see why traffic moved. Triggers
refuse any UPDATE or DELETE of the log. SQLite runs in WAL mode on one thread of its own, so
the event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from types import TracebackType

T = TypeVar("T")
Outcome = Literal["applied", "failed", "dry_run", "not_applied"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    phase TEXT NOT NULL CHECK (phase IN ('intent', 'result')),
    intent_id INTEGER REFERENCES audit(id),
    record TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    from_weights TEXT,
    to_weights TEXT,
    outcome TEXT,
    change_id TEXT,
    insync_at REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS audit_record ON audit (record, id);
CREATE INDEX IF NOT EXISTS audit_intent ON audit (intent_id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
-- What Route 53 said of a change after its intent: its id once the batch was accepted
-- ('submitted'), and when it was seen INSYNC if that came after the result ('insync'). Kept
-- apart from the audit rows so a crash during the INSYNC wait still leaves the change id.
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    intent_id INTEGER NOT NULL REFERENCES audit(id),
    status TEXT NOT NULL CHECK (status IN ('submitted', 'insync')),
    change_id TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_intent ON changes (intent_id);
CREATE TRIGGER IF NOT EXISTS changes_no_update BEFORE UPDATE ON changes
    BEGIN SELECT RAISE(ABORT, 'the change log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS changes_no_delete BEFORE DELETE ON changes
    BEGIN SELECT RAISE(ABORT, 'the change log is append-only'); END;
CREATE TABLE IF NOT EXISTS ramps (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Intent:
    id: int
    at: float
    record: str
    actor: str
    action: str
    reason: str
    from_weights: dict[str, int | None]
    to_weights: dict[str, int]


@dataclass(frozen=True, slots=True)
class ForwardChange:
    """The newest change to a record that gave some region more share, and what is known of it:
    what the pacing of the next such change counts from."""

    intent_id: int
    action: str
    sent_at: float  # when its intent was written, just before the request
    outcome: str | None  # None while its intent is open
    settled_at: float | None  # when its result was written
    change_id: str | None
    insync_at: float | None  # when it was seen INSYNC; None while that is not known


class Store:
    """Use as `async with Store(path) as store:`; every method is a coroutine."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regionshift-store")
        self._db: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        await self._run(self._open)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; transactions explicit
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an intent must survive a power cut
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
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

    # --- the audit log -------------------------------------------------------------------------

    async def intent(
        self,
        record: str,
        actor: str,
        action: str,
        reason: str,
        from_weights: Mapping[str, int | None],
        to_weights: Mapping[str, int],
        at: float,
    ) -> int:
        """Record what is about to be sent; returns its id for the result."""

        def write() -> int:
            cursor = self.db.execute(
                "INSERT INTO audit (at, phase, record, actor, action, reason, from_weights, to_weights)"
                " VALUES (?, 'intent', ?, ?, ?, ?, ?, ?)",
                (at, record, actor, action, reason, json.dumps(dict(from_weights)), json.dumps(dict(to_weights))),
            )
            return int(cursor.lastrowid or 0)

        return await self._run(write)

    async def result(
        self,
        intent_id: int,
        outcome: Outcome,
        at: float,
        *,
        change_id: str | None = None,
        insync_at: float | None = None,
        error: str | None = None,
    ) -> None:
        def write() -> None:
            self.db.execute(
                "INSERT INTO audit (at, phase, intent_id, record, actor, action, reason, to_weights,"
                " outcome, change_id, insync_at, error)"
                " SELECT ?, 'result', id, record, actor, action, reason, to_weights, ?, ?, ?, ?"
                " FROM audit WHERE id = ? AND phase = 'intent'",
                (at, outcome, change_id, insync_at, error, intent_id),
            )

        await self._run(write)

    async def open_intent(self, record: str) -> Intent | None:
        """The newest intent for `record` that has no result: sent or not, nobody knows yet."""

        def read() -> Intent | None:
            row = self.db.execute(
                "SELECT * FROM audit i WHERE i.record = ? AND i.phase = 'intent' AND NOT EXISTS"
                " (SELECT 1 FROM audit r WHERE r.intent_id = i.id) ORDER BY i.id DESC LIMIT 1",
                (record,),
            ).fetchone()
            if row is None:
                return None
            return Intent(
                row["id"],
                row["at"],
                row["record"],
                row["actor"],
                row["action"],
                row["reason"],
                json.loads(row["from_weights"]),
                json.loads(row["to_weights"]),
            )

        return await self._run(read)

    async def submitted(self, intent_id: int, change_id: str, at: float) -> None:
        """Route 53 accepted the intent's batch as `change_id`: durable before the INSYNC wait."""
        await self._change(intent_id, "submitted", change_id, at)

    async def insync(self, intent_id: int, change_id: str | None, at: float) -> None:
        """The intent's change was seen INSYNC at `at`, after its result was written."""
        await self._change(intent_id, "insync", change_id, at)

    async def _change(self, intent_id: int, status: str, change_id: str | None, at: float) -> None:
        def write() -> None:
            self.db.execute(
                "INSERT INTO changes (intent_id, status, change_id, at) VALUES (?, ?, ?, ?)",
                (intent_id, status, change_id, at),
            )

        await self._run(write)

    async def last_forward(self, record: str, actions: Sequence[str]) -> ForwardChange | None:
        """The newest intent for `record` with one of `actions` that was applied or is still open
        (a change that failed or was found not applied moved nothing)."""

        def read() -> ForwardChange | None:
            row = self.db.execute(
                "SELECT i.id, i.at, i.action, r.outcome, r.at AS settled_at, r.change_id, r.insync_at"
                " FROM audit i LEFT JOIN audit r ON r.intent_id = i.id AND r.phase = 'result'"
                " WHERE i.record = ? AND i.phase = 'intent' AND i.action IN (SELECT value FROM json_each(?))"
                " AND (r.id IS NULL OR r.outcome = 'applied') ORDER BY i.id DESC LIMIT 1",
                (record, json.dumps(list(actions))),
            ).fetchone()
            if row is None:
                return None
            change_id, insync_at = row["change_id"], row["insync_at"]
            for change in self.db.execute(
                "SELECT status, change_id, at FROM changes WHERE intent_id = ? ORDER BY id", (row["id"],)
            ):
                change_id = change_id or change["change_id"]
                if change["status"] == "insync" and insync_at is None:
                    insync_at = change["at"]
            return ForwardChange(
                row["id"], row["action"], row["at"], row["outcome"], row["settled_at"], change_id, insync_at
            )

        return await self._run(read)

    async def last_applied(self, record: str) -> dict[str, int] | None:
        """The weights last written to `record` and seen applied; None before the first write."""

        def read() -> dict[str, int] | None:
            row = self.db.execute(
                "SELECT to_weights FROM audit WHERE record = ? AND phase = 'result' AND outcome = 'applied'"
                " ORDER BY id DESC LIMIT 1",
                (record,),
            ).fetchone()
            return json.loads(row["to_weights"]) if row else None

        return await self._run(read)

    async def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit rows, oldest first."""

        def read() -> list[dict[str, Any]]:
            rows = self.db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            out = []
            for row in reversed(rows):
                event = dict(row)
                for key in ("from_weights", "to_weights"):
                    event[key] = json.loads(event[key]) if event[key] else None
                out.append(event)
            return out

        return await self._run(read)

    # --- ramps and flags -------------------------------------------------------------------------

    async def save_ramp(self, name: str, state: Mapping[str, Any], at: float) -> None:
        def write() -> None:
            self.db.execute(
                "INSERT INTO ramps (name, state, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                (name, json.dumps(dict(state)), at),
            )

        await self._run(write)

    async def load_ramps(self) -> dict[str, dict[str, Any]]:
        def read() -> dict[str, dict[str, Any]]:
            return {row["name"]: json.loads(row["state"]) for row in self.db.execute("SELECT * FROM ramps")}

        return await self._run(read)

    async def set_flag(self, name: str, value: Any, at: float) -> None:
        def write() -> None:
            self.db.execute(
                "INSERT INTO flags (name, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (name, json.dumps(value), at),
            )

        await self._run(write)

    async def flag(self, name: str, default: Any = None) -> Any:
        def read() -> Any:
            row = self.db.execute("SELECT value FROM flags WHERE name = ?", (name,)).fetchone()
            return json.loads(row["value"]) if row else default

        return await self._run(read)

    # --- the writer lease ---------------------------------------------------------------------

    async def acquire_lease(
        self,
        holder: str,
        ttl: float,
        now: float,
        name: str = "writer",
        *,
        gone: Callable[[str], bool] | None = None,
    ) -> int | None:
        """Take or renew the lease; its fencing token while `holder` has it, None while another does.

        The token grows by one each time the lease changes hands, so a writer that lost the lease
        (paused, partitioned) is recognised by its old token even if it still believes it leads.
        A lease whose holder `gone` proves dead is taken before it expires.
        """

        def swap() -> int | None:
            db = self.db
            db.execute("BEGIN IMMEDIATE")  # one acquirer at a time across processes
            try:
                row = db.execute("SELECT holder, token, expires_at FROM lease WHERE name = ?", (name,)).fetchone()
                if row is None:
                    token = 1
                    db.execute("INSERT INTO lease VALUES (?, ?, ?, ?)", (name, holder, token, now + ttl))
                elif row["holder"] == holder and row["expires_at"] > now:
                    token = int(row["token"])
                    db.execute("UPDATE lease SET expires_at = ? WHERE name = ?", (now + ttl, name))
                elif row["expires_at"] <= now or (gone is not None and gone(str(row["holder"]))):
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

        return await self._run(swap)

    async def holds_lease(self, holder: str, token: int, now: float, name: str = "writer") -> bool:
        """Whether `holder` still has the lease with this token: checked right before every write."""

        def read() -> bool:
            row = self.db.execute("SELECT holder, token, expires_at FROM lease WHERE name = ?", (name,)).fetchone()
            return row is not None and row["holder"] == holder and row["token"] == token and row["expires_at"] > now

        return await self._run(read)
