"""The pacing check of guardrail 2, read from what was recorded, independently of the code that
paces: the audit log (intents, results, change ids, INSYNC times) and Route 53's own history
(the change requests that reached it, with their times, as the fault proxy saw them)."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.planning.guardrails import moved_share
from controller.planning.weights import shares

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    from tests.faults import Seen

FORWARD = ("forward", "evacuation", "restore")


@dataclass(frozen=True)
class Step:
    """One forward change and the wait before it."""

    action: str
    sent_at: float
    due: float | None  # the previous forward change's INSYNC + TTL + bake; None for the first
    moved: float  # percent of traffic it moved

    @property
    def early(self) -> float:
        return 0.0 if self.due is None else max(0.0, self.due - self.sent_at)

    def line(self, t0: float) -> str:
        due = "-" if self.due is None else f"{self.due - t0:8.2f}"
        return f"{self.action:10s} sent {self.sent_at - t0:8.2f}s  due {due}s  moved {self.moved:5.2f}%"


def from_audit(
    path: Path, record: str, ttl: float, bake_of: Callable[[str], float], insync_timeout: float
) -> list[Step]:
    """Every forward change to `record` the audit log says was applied (or may have been: an
    intent never settled), each with the earliest time it was allowed. INSYNC is the recorded
    time; seen later (GetChange) when that is all there is; for an answer that was lost, the
    time the change was found applied plus the longest INSYNC wait."""
    return audit_walk(path, record, ttl, bake_of, insync_timeout)[0]


def audit_walk(
    path: Path, record: str, ttl: float, bake_of: Callable[[str], float], insync_timeout: float
) -> tuple[list[Step], float | None]:
    """`from_audit`, and when the next forward change is due (None before the first)."""
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            "SELECT i.id, i.at, i.action, i.from_weights, i.to_weights, r.outcome, r.at AS settled, r.insync_at"
            " FROM audit i LEFT JOIN audit r ON r.intent_id = i.id AND r.phase = 'result'"
            " WHERE i.phase = 'intent' AND i.record = ? ORDER BY i.id",
            (record,),
        ).fetchall()
        seen_insync = {
            row["intent_id"]: row["at"]
            for row in db.execute("SELECT intent_id, at FROM changes WHERE status = 'insync'")
        }
    finally:
        db.close()
    steps: list[Step] = []
    due: float | None = None
    for row in rows:
        if row["action"] not in FORWARD or row["outcome"] not in ("applied", None):
            continue
        before = {k: v or 0 for k, v in json.loads(row["from_weights"]).items()}
        after = json.loads(row["to_weights"])
        steps.append(Step(row["action"], row["at"], due, moved_share(before, after)))
        insync = row["insync_at"] or seen_insync.get(row["id"])
        if insync is None:
            insync = max(row["at"], row["settled"] or row["at"]) + insync_timeout
        due = insync + ttl + bake_of(row["action"])
    return steps, due


def weights_sent(seen: Iterable[Seen]) -> list[tuple[float, dict[str, int]]]:
    """(time it reached Route 53, the weights it set) for every change request that reached it."""
    out = []
    for s in seen:
        if s.operation != "ChangeResourceRecordSets" or s.answered == 0:
            continue
        ids = re.findall(r"<SetIdentifier>([^<]+)</SetIdentifier>", s.body)
        weights = [int(w) for w in re.findall(r"<Weight>(\d+)</Weight>", s.body)]
        out.append((s.at, dict(zip(ids, weights, strict=True))))
    return out


def from_route53(
    changes: Iterable[tuple[float, Mapping[str, int]]], start: Mapping[str, int], ttl: float, bake: float
) -> list[Step]:
    """Forward changes as Route 53 received them, each due the previous forward one's arrival +
    TTL + bake (moto is INSYNC at once: arrival is the earliest the change could be INSYNC).
    A request repeating the weights Route 53 already holds (a retry) changes nothing. For
    histories without rollbacks: here every change that grows a share counts as forward."""
    steps: list[Step] = []
    held, due = dict(start), None
    for at, weights in changes:
        if dict(weights) == held:
            continue
        old, new = shares(held), shares(weights)
        if any(new[k] > old.get(k, 0.0) + 1e-9 for k in new):
            steps.append(Step("forward", at, due, moved_share(held, weights)))
            due = at + ttl + bake
        held = dict(weights)
    return steps


def report(steps: list[Step]) -> str:
    t0 = steps[0].sent_at if steps else 0.0
    return "\n".join(s.line(t0) for s in steps)
