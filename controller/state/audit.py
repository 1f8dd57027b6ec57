"""The audit log: every weight change and every operator's action, append-only.

Every change is written here before it is sent (an intent: who or what, why, from which weights
to which) and after (its result: change id, INSYNC time, or the error), so a restart can tell a
change that was sent from one that was not, and an auditor can see why traffic moved. Triggers
refuse any UPDATE or DELETE of the log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from controller.state.database import Database

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
-- What operators did (a ramp's start, pause, resume or abort; a freeze or unfreeze; an adopt),
-- who and why. The weight changes that follow are above, under the ramp or evacuation making them.
CREATE TABLE IF NOT EXISTS operator_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operator_actions_at ON operator_actions (at);
CREATE TRIGGER IF NOT EXISTS operator_actions_no_update BEFORE UPDATE ON operator_actions
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS operator_actions_no_delete BEFORE DELETE ON operator_actions
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
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


# The result a restart records for an open intent whose weights Route 53 does not hold.
NOT_APPLIED_LATER = "result recorded later: not applied"


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

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
            cursor = self._db.db.execute(
                "INSERT INTO audit (at, phase, record, actor, action, reason, from_weights, to_weights)"
                " VALUES (?, 'intent', ?, ?, ?, ?, ?, ?)",
                (at, record, actor, action, reason, json.dumps(dict(from_weights)), json.dumps(dict(to_weights))),
            )
            return int(cursor.lastrowid or 0)

        return await self._db.run(write)

    async def operator(self, at: float, who: str, action: str, target: str, reason: str) -> None:
        """Record an operator's action (`target`: `ramp:NAME`, `shifting` or a record set's key)."""

        def write() -> None:
            self._db.db.execute(
                "INSERT INTO operator_actions (at, who, action, target, reason) VALUES (?, ?, ?, ?, ?)",
                (at, who, action, target, reason),
            )

        await self._db.run(write)

    async def operator_actions(
        self,
        *,
        targets: Sequence[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Operators' actions, newest first, on any of `targets` (None: all), since <= at < until."""

        def read() -> list[dict[str, Any]]:
            rows = self._db.db.execute(
                "SELECT id, at, who, action, target, reason FROM operator_actions"
                " WHERE (:targets IS NULL OR target IN (SELECT value FROM json_each(:targets)))"
                " AND (:since IS NULL OR at >= :since) AND (:until IS NULL OR at < :until)"
                " ORDER BY id DESC LIMIT :limit",
                {
                    "targets": None if targets is None else json.dumps(list(targets)),
                    "since": since,
                    "until": until,
                    "limit": limit,
                },
            ).fetchall()
            return [dict(row) for row in rows]

        return await self._db.run(read)

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
            self._db.db.execute(
                "INSERT INTO audit (at, phase, intent_id, record, actor, action, reason, to_weights,"
                " outcome, change_id, insync_at, error)"
                " SELECT ?, 'result', id, record, actor, action, reason, to_weights, ?, ?, ?, ?"
                " FROM audit WHERE id = ? AND phase = 'intent'",
                (at, outcome, change_id, insync_at, error, intent_id),
            )

        await self._db.run(write)

    async def open_intent(self, record: str) -> Intent | None:
        """The newest intent for `record` that has no result: sent or not, nobody knows yet."""

        def read() -> Intent | None:
            row = self._db.db.execute(
                "SELECT * FROM audit i WHERE i.record = ? AND i.phase = 'intent' AND NOT EXISTS"
                " (SELECT 1 FROM audit r WHERE r.intent_id = i.id) ORDER BY i.id DESC LIMIT 1",
                (record,),
            ).fetchone()
            return None if row is None else _intent(row)

        return await self._db.run(read)

    async def settled_unsent(self, record: str, weights: Mapping[str, int | None], since: float) -> Intent | None:
        """The newest intent for `record` since `since` that a restart settled as not applied
        (`NOT_APPLIED_LATER`) and that would have written exactly `weights`: a request still in
        flight when its process stopped may land after that (the intent is then told from a
        hand edit by what it wrote)."""

        def read() -> Intent | None:
            rows = self._db.db.execute(
                "SELECT i.* FROM audit i JOIN audit r ON r.intent_id = i.id AND r.phase = 'result'"
                " WHERE i.record = ? AND i.phase = 'intent' AND i.at >= ? AND r.outcome = 'not_applied'"
                " AND r.error = ? AND NOT EXISTS (SELECT 1 FROM audit a WHERE a.intent_id = i.id"
                " AND a.outcome = 'applied') ORDER BY i.id DESC",
                (record, since, NOT_APPLIED_LATER),
            ).fetchall()
            for row in rows:
                if json.loads(row["to_weights"]) == dict(weights):
                    return _intent(row)
            return None

        return await self._db.run(read)

    async def submitted(self, intent_id: int, change_id: str, at: float) -> None:
        """Route 53 accepted the intent's batch as `change_id`: durable before the INSYNC wait."""
        await self._change(intent_id, "submitted", change_id, at)

    async def insync(self, intent_id: int, change_id: str | None, at: float) -> None:
        """The intent's change was seen INSYNC at `at`, after its result was written."""
        await self._change(intent_id, "insync", change_id, at)

    async def _change(self, intent_id: int, status: str, change_id: str | None, at: float) -> None:
        def write() -> None:
            self._db.db.execute(
                "INSERT INTO changes (intent_id, status, change_id, at) VALUES (?, ?, ?, ?)",
                (intent_id, status, change_id, at),
            )

        await self._db.run(write)

    async def last_forward(self, record: str, actions: Sequence[str]) -> ForwardChange | None:
        """The newest intent for `record` with one of `actions` that was applied or is still open
        (a change that failed or was found not applied moved nothing)."""

        def read() -> ForwardChange | None:
            row = self._db.db.execute(
                "SELECT i.id, i.at, i.action, r.outcome, r.at AS settled_at, r.change_id, r.insync_at"
                " FROM audit i LEFT JOIN audit r ON r.intent_id = i.id AND r.phase = 'result'"
                " WHERE i.record = ? AND i.phase = 'intent' AND i.action IN (SELECT value FROM json_each(?))"
                " AND (r.id IS NULL OR r.outcome = 'applied') ORDER BY i.id DESC LIMIT 1",
                (record, json.dumps(list(actions))),
            ).fetchone()
            if row is None:
                return None
            changes = self._db.db.execute(
                "SELECT status, change_id, at FROM changes WHERE intent_id = ? ORDER BY id", (row["id"],)
            )
            change_id, insync_at = _known(row["change_id"], row["insync_at"], changes)
            return ForwardChange(
                row["id"], row["action"], row["at"], row["outcome"], row["settled_at"], change_id, insync_at
            )

        return await self._db.run(read)

    async def last_applied(self, record: str) -> dict[str, int] | None:
        """The weights last written to `record` and seen applied; None before the first write."""

        def read() -> dict[str, int] | None:
            row = self._db.db.execute(
                "SELECT to_weights FROM audit WHERE record = ? AND phase = 'result' AND outcome = 'applied'"
                " ORDER BY id DESC LIMIT 1",
                (record,),
            ).fetchone()
            return json.loads(row["to_weights"]) if row else None

        return await self._db.run(read)

    async def changes(
        self,
        *,
        record: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Weight changes, newest first: each intent (who, why, the weights before and after) with
        what came of it (outcome, change id, when it was seen INSYNC, the error), filtered by
        record and by when it was sent (since <= at < until), paged by id (`before`)."""

        def read() -> list[dict[str, Any]]:
            rows = self._db.db.execute(
                "SELECT i.id, i.at, i.record, i.actor, i.action, i.reason, i.from_weights, i.to_weights,"
                " r.outcome, r.at AS settled_at, r.change_id, r.insync_at, r.error"
                # Its newest result: a write that landed after a restart settled it has two.
                " FROM audit i LEFT JOIN audit r ON r.id ="
                " (SELECT max(id) FROM audit WHERE intent_id = i.id AND phase = 'result')"
                " WHERE i.phase = 'intent' AND (:record IS NULL OR i.record = :record)"
                " AND (:since IS NULL OR i.at >= :since) AND (:until IS NULL OR i.at < :until)"
                " AND (:before IS NULL OR i.id < :before) ORDER BY i.id DESC LIMIT :limit",
                {"record": record, "since": since, "until": until, "before": before, "limit": limit},
            ).fetchall()
            out = [dict(row) for row in rows]
            by_id: dict[int, list[Any]] = {change["id"]: [] for change in out}
            if by_id:
                for row in self._db.db.execute(
                    "SELECT intent_id, status, change_id, at FROM changes"
                    " WHERE intent_id IN (SELECT value FROM json_each(?)) ORDER BY id",
                    (json.dumps(list(by_id)),),
                ):
                    by_id[row["intent_id"]].append(row)
            for change in out:
                change["change_id"], change["insync_at"] = _known(
                    change["change_id"], change["insync_at"], by_id[change["id"]]
                )
                before_weights, after_weights = change.pop("from_weights"), change.pop("to_weights")
                change["from"] = json.loads(before_weights) if before_weights else None
                change["to"] = json.loads(after_weights) if after_weights else None
            return out

        return await self._db.run(read)

    async def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit rows, oldest first."""

        def read() -> list[dict[str, Any]]:
            rows = self._db.db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            out = []
            for row in reversed(rows):
                event = dict(row)
                for key in ("from_weights", "to_weights"):
                    event[key] = json.loads(event[key]) if event[key] else None
                out.append(event)
            return out

        return await self._db.run(read)


def _intent(row: Any) -> Intent:
    """An intent row as an `Intent`."""
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


def _known(change_id: str | None, insync_at: float | None, changes: Iterable[Any]) -> tuple[str | None, float | None]:
    """A change's id and INSYNC time from its result row, completed from what Route 53 said of it
    later (rows of `changes`, oldest first): the id once submitted, the first INSYNC seen."""
    for change in changes:
        change_id = change_id or change["change_id"]
        if change["status"] == "insync" and insync_at is None:
            insync_at = change["at"]
    return change_id, insync_at
