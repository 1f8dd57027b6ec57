"""The agents' wire format: every MQTT topic and payload between agents and the controller.

One module owns it, and nothing else builds or parses a payload. Payloads are JSON objects with a
`schema` version; both sides validate them (pydantic), and whatever does not validate is refused
with a reason, never trusted. Topics:

- `regionshift/v1/results/{region}/{probe}/{vantage}`: one probe result (QoS 1, not retained);
- `regionshift/v1/agents/{vantage}/status`: the agent's presence (retained; its last will says
  "offline" with the same session id, so a stale will never overwrites a newer session);
- `regionshift/v1/agents/{vantage}/plan`: what the agent probes, published by the controller
  (retained, versioned), so a configuration change reaches every agent without redeploying it;
- `regionshift/v1/agents/{vantage}/hurry`: the targets the controller suspects at that vantage,
  to be probed harder for the next few seconds (QoS 0, never retained: a suspicion is perishable
  and renewed on every judge pass while it lasts).

Each agent process is one session (a random id); its results carry the session and a sequence
number that starts at 1 and grows by one per result, so the controller counts a redelivered
message (QoS 1 is at-least-once) once.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Annotated, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from probes.results import Result, RunReason
from probes.spec import ProbeSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

SCHEMA: Final = 1
PREFIX = "regionshift/v1"
RESULTS = f"{PREFIX}/results"
AGENTS = f"{PREFIX}/agents"
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"  # a region, probe or vantage: no '/', '+', '#'
# The largest payload either side reads: a result is well under 2 KB, a plan of a few hundred
# probes under 200 KB.
MAX_PAYLOAD = 1_000_000

M = TypeVar("M", bound=BaseModel)
Name = Annotated[str, Field(pattern=NAME)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def valid_name(name: str) -> bool:
    """Whether `name` can stand in a topic as a region, probe or vantage."""
    return re.fullmatch(NAME, name) is not None


def result_topic(region: str, probe: str, vantage: str) -> str:
    return f"{RESULTS}/{region}/{probe}/{vantage}"


def status_topic(vantage: str) -> str:
    return f"{AGENTS}/{vantage}/status"


def plan_topic(vantage: str) -> str:
    return f"{AGENTS}/{vantage}/plan"


def hurry_topic(vantage: str) -> str:
    return f"{AGENTS}/{vantage}/hurry"


RESULTS_FILTER = f"{RESULTS}/+/+/+"
STATUS_FILTER = f"{AGENTS}/+/status"


class WireError(ValueError):
    """A payload or topic that does not validate; `reason` is the metric label for it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal[1] = Field(default=SCHEMA, alias="schema")


class ResultMessage(_Message):
    """One probe result as an agent sends it. Strict: "yes" is not a boolean, "1" not a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    session: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    seq: Annotated[int, Field(ge=1)]
    region: Name
    probe: Name
    vantage: Name
    started_at: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    ok: bool
    # Lag probes report an infinite lag when not replicating: JSON has no infinity, so null.
    latency: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None
    status: Annotated[int, Field(ge=100, le=599)] | None = None
    error_class: Annotated[str, Field(max_length=32)] | None = None
    error: Annotated[str, Field(max_length=512)] | None = None
    phases: dict[Annotated[str, Field(max_length=16)], Seconds] = Field(default_factory=dict, max_length=8)
    reason: RunReason = "scheduled"
    late: bool = False  # replayed from the agent's buffer after the broker was unreachable

    def result(self) -> Result:
        return Result(
            region=self.region,
            probe=self.probe,
            vantage=self.vantage,
            started_at=self.started_at,
            ok=self.ok,
            latency=math.inf if self.latency is None else self.latency,
            phases=dict(self.phases),
            status=self.status,
            error_class=self.error_class,
            error=self.error,
            reason=self.reason,
        )


class Presence(_Message):
    """An agent's status: online when it connects (retained), offline as its last will or when it
    stops in order."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    vantage: Name
    session: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    state: Literal["online", "offline"]
    at: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # absent in a last will
    plan_version: int | None = None  # the plan it runs


class PlannedProbe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    region: Name
    spec: ProbeSpec


class Plan(_Message):
    """What one agent probes: the controller's regions and probes, versioned (a newer version
    replaces the older one as a whole)."""

    version: Annotated[int, Field(ge=1)]
    vantage: Name
    probes: list[PlannedProbe] = Field(max_length=10_000)


MIN_EVERY, MAX_EVERY = 0.01, 3600.0  # seconds between two extra runs of one target
MAX_HOLD = 60.0  # seconds one hurry message hastens its targets, at most
MAX_BUDGET = 6000  # extra runs of one target a minute, at most
MAX_PARALLEL = 16  # extra runs of one target in flight at once, at most


class Suspect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    region: Name
    probe: Name
    why: Annotated[str, Field(max_length=200)] = ""
    # The extra runs that would settle it (a lone failure's), replacing the count of the message
    # before; absent, it is hastened for the hold alone.
    runs: Annotated[int, Field(ge=0, le=MAX_BUDGET)] | None = None
    # When the newest result the count was made from started (the agent's own stamp): runs the
    # agent started since are on their way and count against it.
    seen: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class Hurry(_Message):
    """Targets one agent should probe harder: every `every` seconds at most, for `hold` seconds
    from receipt (renewed while the suspicion lasts) and each suspect's `runs` at most, within
    `budget` extra runs a minute and `parallel` in flight at once."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    vantage: Name
    # The same bounds as the suspicion policy's, and a hold of a minute at most: a suspicion is
    # renewed every judge pass, so one message (however wrong) never hastens a target for long.
    every: Annotated[float, Field(ge=MIN_EVERY, le=MAX_EVERY, allow_inf_nan=False)]
    hold: Annotated[float, Field(gt=0, le=MAX_HOLD, allow_inf_nan=False)]
    budget: Annotated[int, Field(ge=1, le=MAX_BUDGET)]
    parallel: Annotated[int, Field(ge=1, le=MAX_PARALLEL)] = 1
    suspects: list[Suspect] = Field(max_length=10_000)


def encode_result(result: Result, session: str, seq: int, *, late: bool = False) -> bytes:
    message = ResultMessage(
        session=session,
        seq=seq,
        region=result.region,
        probe=result.probe,
        vantage=result.vantage,
        started_at=result.started_at,
        ok=result.ok,
        latency=None if math.isinf(result.latency) else result.latency,
        status=result.status,
        error_class=result.error_class,
        error=result.error[:512] if result.error else result.error,
        phases={k: v for k, v in result.phases.items() if math.isfinite(v) and v >= 0},
        reason=result.reason,
        late=late,
    )
    return _dump(message)


def encode_presence(presence: Presence) -> bytes:
    return _dump(presence)


def encode_plan(version: int, vantage: str, probes: Sequence[tuple[str, object]]) -> bytes:
    """A plan of (region, probe spec) pairs; the specs are the configuration's own models."""
    plan = Plan.model_validate(
        {"version": version, "vantage": vantage, "probes": [{"region": r, "spec": s} for r, s in probes]}
    )
    return _dump(plan)


def encode_hurry(hurry: Hurry) -> bytes:
    return _dump(hurry)


def _dump(message: BaseModel) -> bytes:
    return message.model_dump_json(by_alias=True).encode()


def _load(model: type[M], payload: bytes | bytearray | str) -> M:
    if len(payload) > MAX_PAYLOAD:
        raise WireError("too_large", f"a payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: not JSON we read
        raise WireError("not_json", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("invalid", "not a JSON object")
    if data.get("schema") != SCHEMA:
        raise WireError("schema", f"schema {data.get('schema')!r}, this side reads {SCHEMA}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise WireError("invalid", f"{where}: {first['msg']}") from None


def decode_result(topic: str, payload: bytes | bytearray | str) -> ResultMessage:
    """A result message from its topic and payload; raises WireError (with the drop reason)."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:3]) != RESULTS:  # noqa: PLR2004 - regionshift/v1/results/r/p/v
        raise WireError("topic", f"not a results topic: {topic!r}")
    message = _load(ResultMessage, payload)
    if (message.region, message.probe) != (parts[3], parts[4]):
        raise WireError("topic", f"a result for {message.region}/{message.probe} on {topic!r}")
    if message.vantage != parts[5]:
        raise WireError("vantage_mismatch", f"vantage {message.vantage!r} published on {topic!r}")
    return message


def decode_presence(topic: str, payload: bytes | bytearray | str) -> Presence:
    return _decode_agent_topic(topic, "status", Presence, payload)


def decode_plan(payload: bytes | bytearray | str) -> Plan:
    return _load(Plan, payload)


def decode_hurry(topic: str, payload: bytes | bytearray | str) -> Hurry:
    return _decode_agent_topic(topic, "hurry", Hurry, payload)


A = TypeVar("A", Presence, Hurry)


def _decode_agent_topic(topic: str, leaf: str, model: type[A], payload: bytes | bytearray | str) -> A:
    """A message on `regionshift/v1/agents/{vantage}/{leaf}`, whose payload names that vantage."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != AGENTS or parts[4] != leaf:  # noqa: PLR2004
        raise WireError("topic", f"not a {leaf} topic: {topic!r}")
    message = _load(model, payload)
    if message.vantage != parts[3]:
        raise WireError("vantage_mismatch", f"vantage {message.vantage!r} published on {topic!r}")
    return message
