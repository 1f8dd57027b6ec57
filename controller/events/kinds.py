"""The events the controller publishes: each a frozen record of plain values, so that any
subscriber (the state API, the live page, a notifier, the metrics) can read it without the
objects it came from. `to_json` is what the API and the event stream show."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    kind: ClassVar[str]
    at: float
    id: int = 0  # set by the bus when published: increasing, one sequence for every kind

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class VerdictChanged(Event):
    kind: ClassVar[str] = "verdict"
    region: str
    previous: str | None
    status: str
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = Event.to_json(self)
        out["from"], out["to"] = out.pop("previous"), out.pop("status")
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionTaken(Event):
    """A weight change the reconciler made or was refused: applied, dry_run or refused."""

    kind: ClassVar[str] = "action"
    record: str
    action: str
    actor: str
    outcome: str
    reason: str
    weights: dict[str, int]
    # The regions it is about: losing share (evacuation, rollback) or gaining it (forward, restore).
    regions: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RampChanged(Event):
    kind: ClassVar[str] = "ramp"
    ramp: str
    previous: str
    status: str
    step: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftFound(Event):
    """Route 53 holds weights other than the ones last written (a hand edit); None when it ends."""

    kind: ClassVar[str] = "drift"
    record: str
    detail: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseChanged(Event):
    """This controller gained the writer lease (token) or lost it (token None)."""

    kind: ClassVar[str] = "lease"
    holder: str
    token: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorAction(Event):
    """An operator's command: a ramp action, freeze or unfreeze."""

    kind: ClassVar[str] = "operator"
    who: str
    action: str
    target: str
    reason: str
