"""The controller's side of the agents: one MQTT subscriber that feeds their results to the windows.

It publishes each configured agent's plan (retained, versioned: see `probes.wire`), then reads
every result and presence message. Nothing from the wire is trusted: a message is dropped, and
counted by reason, when its payload does not validate, when it names a region or probe the
controller does not know, a vantage other than its topic's (or one that is not a configured
agent's), a sequence number its session has sent already (QoS 1 redelivers), or a start time too
far from the receive time (clock skew; a result replayed late may be older, up to `max_age`).

It also passes the judge's suspicions on: `hurry` asks an agent to probe the targets suspected at
its vantage harder, on that agent's hurry topic (QoS 0, never retained; renewed every judge pass
while the suspicion lasts, so one lost message costs a pass, and a broker that is away keeps none).

`accept` is the whole decision and is pure (payload and receive time in, a verdict out), so the
fuzz tests and the benchmark drive it without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiomqtt
import structlog

from probes import wire
from probes.agent import acked, backoff, broker_trouble, cancel_all

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from controller.judging.suspicion import Suspicion
    from controller.settings.policy import SuspicionPolicy
    from controller.settings.schema import AgentsSettings
    from probes.results import Result

log = structlog.get_logger("regionshift.intake")

DROP_REASONS = (
    "too_large",
    "not_json",
    "schema",
    "invalid",
    "topic",
    "vantage_mismatch",
    "unknown_vantage",
    "unknown_target",
    "duplicate",
    "clock_skew",
    "too_old",
)
OTHER_VANTAGE = "other"  # the label for a message whose topic names no configured agent
# Sequence numbers remembered per session below its highest: a redelivery comes within seconds,
# a replay after an outage within the agent's buffer (10,000 by default).
SEQ_MEMORY = 20_000


@dataclass(slots=True)
class _Session:
    highest: int = 0
    seen: set[int] = field(default_factory=set)

    def saw(self, seq: int) -> bool:
        """Whether `seq` came before (or is too old to tell): a redelivery."""
        return seq in self.seen or seq <= self.highest - SEQ_MEMORY

    def first_time(self, seq: int) -> bool:
        if self.saw(seq):
            return False
        self.seen.add(seq)
        if seq > self.highest:
            self.highest = seq
            if len(self.seen) > 2 * SEQ_MEMORY:
                self.seen = {s for s in self.seen if s > seq - SEQ_MEMORY}
        return True


@dataclass(slots=True)
class AgentView:
    """What the controller knows of one agent: its presence, and how its results arrive."""

    vantage: str
    state: str = "never seen"  # online | offline | never seen
    session: str | None = None
    since: float | None = None  # when the state last changed (receive time)
    last_result: float | None = None  # receive time of its newest accepted result
    lag: float | None = None  # seconds from a result's end to its receipt, the newest one's
    skew: float | None = None  # the newest result's end minus its receipt (negative: behind)
    plan_version: int | None = None
    received: int = 0
    late: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # The sessions whose live results came lately, the newest last, and how many times an older
    # one reported again after a newer one had: two agents run under this one vantage name.
    sessions: list[str] = field(default_factory=list)
    twins: int = 0

    def state_view(self, now: float) -> dict[str, object]:
        return {
            "state": self.state,
            "session": self.session,
            "since": self.since,
            "last_result_age": None if self.last_result is None else round(now - self.last_result, 3),
            "lag_seconds": None if self.lag is None else round(self.lag, 3),
            "clock_skew_seconds": None if self.skew is None else round(self.skew, 3),
            "plan_version": self.plan_version,
            "received": self.received,
            "late": self.late,
            "dropped": dict(self.dropped),
        }


# Sessions of one vantage remembered, and how often an older one must report again after a newer
# one before two agents under one name are told (once: a restart's in-flight results may cross).
SESSIONS_KEPT = 4
TWINS_TOLD = 3

# Kinds of dropped message (vantage, reason) told as a warning, at most: the vantage of a message
# from an unknown agent is what its topic says, and the set must not grow with what strangers send.
TOLD_KEPT = 256


class Intake:
    def __init__(
        self,
        settings: AgentsSettings,
        targets: Iterable[tuple[str, str]],
        sink: Callable[[Result], None],
        *,
        dropped: Callable[[str, str], None] | None = None,
        plans: dict[str, bytes] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.targets = set(targets)
        self.sink = sink
        self._dropped = dropped
        self.plans = plans or {}  # vantage -> encoded plan, published retained on connect
        self.clock = clock
        self.agents = {v: AgentView(v) for v in settings.vantages}
        self._sessions: dict[tuple[str, str], _Session] = {}
        self.connected = False
        self.rng = random.Random()  # noqa: S311 - reconnect jitter
        self._outbox: dict[str, bytes] = {}  # vantage -> the newest suspicion not yet sent
        self._told: set[tuple[str, str]] = set()  # (vantage, reason) of drops logged as a warning
        self._send = asyncio.Event()
        self.hurries_sent = 0

    def hurry(
        self, vantage: str, suspects: Mapping[tuple[str, str], Suspicion], *, held: float, policy: SuspicionPolicy
    ) -> None:
        """Ask the agent at `vantage` to probe these (region, probe) harder for `held` seconds, as
        the suspicion policy paces it (each suspect's runs, when it counts them). Sent at once while
        connected; while not, nothing is kept (a suspicion is renewed by the next pass, or is over)."""
        if vantage not in self.agents or not suspects or not self.connected:
            return
        message = wire.Hurry(  # within the wire's bounds whatever the policy and the pass took
            vantage=vantage,
            every=min(max(policy.every, wire.MIN_EVERY), wire.MAX_EVERY),
            hold=min(held, wire.MAX_HOLD),
            budget=min(policy.budget, wire.MAX_BUDGET),
            parallel=min(policy.parallel, wire.MAX_PARALLEL),
            suspects=[
                wire.Suspect(
                    region=r,
                    probe=p,
                    why=s.why[:200],
                    runs=None if s.runs is None else min(s.runs, wire.MAX_BUDGET),
                    seen=s.seen,
                )
                for (r, p), s in sorted(suspects.items())
            ],
        )
        self._outbox[vantage] = wire.encode_hurry(message)
        self._send.set()

    # -- the decision -------------------------------------------------------------------------

    def accept(self, topic: str, payload: bytes, now: float) -> Result | None:
        """The result in a results message, or None when it is dropped (and counted)."""
        vantage = _vantage_of(topic, 5)
        try:
            message = wire.decode_result(topic, payload)
        except wire.WireError as exc:
            self._drop(vantage, exc.reason, str(exc))
            return None
        agent = self.agents.get(message.vantage)
        if agent is None:
            self._drop(vantage, "unknown_vantage", f"vantage {message.vantage!r} is not a configured agent")
            return None
        if (message.region, message.probe) not in self.targets:
            self._drop(message.vantage, "unknown_target", f"{message.region}/{message.probe} is not configured")
            return None
        ended = message.started_at + (message.latency or 0.0)
        known = self._sessions.get((message.vantage, message.session))
        if not message.late and (known is None or not known.saw(message.seq)):
            # Before the clock checks: an agent whose clock is off has every result dropped by
            # them, and its skew (and lag) must show it (they stayed at the last accepted
            # result's, -0.001 s, while all of them were dropped, and no alert could fire). Not
            # from a redelivery: its lag is the broker's, not the agent's.
            agent.lag = max(0.0, now - ended)
            agent.skew = ended - now
        if message.started_at > now + self.settings.max_skew:
            self._drop(message.vantage, "clock_skew", f"started {message.started_at - now:.1f}s ahead of this clock")
            return None
        limit = self.settings.max_age if message.late else self.settings.max_skew + self.settings.max_result_age
        if now - message.started_at > limit:
            self._drop(message.vantage, "too_old", f"started {now - message.started_at:.1f}s ago (at most {limit:g}s)")
            return None
        session = self._sessions.setdefault((message.vantage, message.session), _Session())
        if not session.first_time(message.seq):
            self._drop(message.vantage, "duplicate", f"session {message.session} sequence {message.seq} again")
            return None
        agent.received += 1
        agent.late += message.late
        if not message.late:
            self._one_agent_each(agent, message.session)
            if (
                agent.state == "offline"
                and agent.session != message.session
                and message.started_at > (agent.since if agent.since is not None else -math.inf)
            ):
                # Another agent under this name said goodbye (or its will came) while this one
                # goes on: the vantage reports. Trial G: a second agent started by hand under a
                # running one's name and stopped left the vantage offline while results came.
                # Only a result started after the goodbye: one queued by a dead session says
                # nothing of who is alive now.
                log.info("agent presence", state="online", vantage=agent.vantage, session=message.session,
                         why=f"session {agent.session} went offline, this one reports")  # fmt: skip
                agent.state, agent.session, agent.since = "online", message.session, now
        agent.last_result = now
        return message.result()

    def _one_agent_each(self, agent: AgentView, session: str) -> None:
        """Say (once) when two agents report under one vantage name: an older session's live
        results go on after a newer one's began (a restarted agent's never do). Merged, their
        results counted as one vantage's, and the first to stop marked the other offline."""
        sessions = agent.sessions
        if sessions and sessions[-1] != session and session in sessions:
            agent.twins += 1
            if agent.twins == TWINS_TOLD:
                log.warning(
                    "two agents report as one vantage: give each its own --vantage and broker user",
                    vantage=agent.vantage,
                    sessions=sorted(set(sessions[-2:]) | {session}),
                )
        if session in sessions:
            sessions.remove(session)
        sessions.append(session)
        del sessions[:-SESSIONS_KEPT]

    def presence(self, topic: str, payload: bytes, now: float) -> None:
        vantage = _vantage_of(topic, 3)
        if not payload:
            return  # a retained status cleared
        try:
            presence = wire.decode_presence(topic, payload)
        except wire.WireError as exc:
            self._drop(vantage, exc.reason, str(exc))
            return
        agent = self.agents.get(presence.vantage)
        if agent is None:  # a decommissioned agent's retained presence says so at every start
            topic = wire.status_topic(presence.vantage)
            clear = f"if it is gone for good, clear its retained presence: mosquitto_pub -r -n -t {topic}"
            self._drop(vantage, "unknown_vantage", f"vantage {presence.vantage!r} is not a configured agent; {clear}")
            return
        if presence.state == "offline" and agent.session not in (None, presence.session):
            return  # the will of an older session, delivered after a newer one said hello
        if agent.state != presence.state:
            log.info("agent presence", state=presence.state, vantage=presence.vantage, session=presence.session)
            agent.since = now
        agent.state, agent.session = presence.state, presence.session
        if presence.plan_version is not None:
            agent.plan_version = presence.plan_version

    def _drop(self, vantage: str, reason: str, detail: str) -> None:
        label = vantage if vantage in self.agents else OTHER_VANTAGE
        if label in self.agents:
            agent = self.agents[label]
            agent.dropped[reason] = agent.dropped.get(reason, 0) + 1
        if self._dropped is not None:
            self._dropped(label, reason)
        # The first of each kind from each vantage is a warning: an agent whose every result is
        # refused (its clock minutes off, a vantage name the configuration does not list) looked
        # merely "stale" on the page, and said so nowhere. The rest are counted (the metric
        # regionshift_agent_messages_dropped_total), and logged at debug.
        # A duplicate is QoS 1 doing its work after a reconnect (the alert leaves it out too): info.
        first = (vantage, reason) not in self._told and len(self._told) < TOLD_KEPT
        if first:
            self._told.add((vantage, reason))
        (log.debug if not first else log.info if reason == "duplicate" else log.warning)(
            "agent message dropped" + (" (the first of its kind from this vantage)" if first else ""),
            vantage=vantage,
            reason=reason,
            detail=detail,
        )

    # -- the connection -----------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        tls = None
        if s.tls is not None:
            tls = aiomqtt.TLSParameters(ca_certs=s.tls.ca_file, certfile=s.tls.cert_file, keyfile=s.tls.key_file)
        host, port = s.host_port
        return aiomqtt.Client(
            host,
            port,
            # A persistent session under a fixed id: the broker keeps the subscriptions and queues
            # the agents' QoS 1 results while the controller is away (a restart of either).
            identifier=s.client_id,
            clean_session=False,
            username=s.username,
            password=s.password.read() if s.password is not None else None,
            tls_params=tls,
            keepalive=5,  # a dead connection is noticed within about 7 s
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribe until `stop`, reconnecting with capped, jittered backoff."""
        attempt = 0
        while not stop.is_set():
            try:
                async with self._client() as client:
                    attempt = 0
                    for vantage, plan in self.plans.items():
                        await acked(client.publish(wire.plan_topic(vantage), plan, qos=1, retain=True))
                    await acked(client.subscribe(wire.RESULTS_FILTER, qos=1))
                    await acked(client.subscribe(wire.STATUS_FILTER, qos=1))
                    self.connected = True
                    log.info("agents' broker connected", broker=self.settings.broker, plans=len(self.plans))
                    reading = asyncio.create_task(self._read(client))
                    sending = asyncio.create_task(self._send_hurries(client))
                    stopping = asyncio.create_task(stop.wait())
                    tasks = {reading, sending, stopping}
                    try:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        await cancel_all(tasks)
                    for task in done - {stopping}:
                        task.result()  # raises MqttError: the connection broke
            except (aiomqtt.MqttError, LookupError) as exc:  # LookupError: the password (`Secret.read`)
                attempt += 1
                wait = backoff(attempt, self.rng)
                if self.connected or attempt == 1:
                    trouble = f"agents' {broker_trouble(exc)}"
                    log.warning(trouble, broker=self.settings.broker, error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
            finally:
                self.connected = False
                self._outbox.clear()

    async def _send_hurries(self, client: aiomqtt.Client) -> None:
        while True:
            await self._send.wait()
            self._send.clear()
            while self._outbox:
                vantage, payload = self._outbox.popitem()
                try:
                    await acked(client.publish(wire.hurry_topic(vantage), payload, qos=0))
                except aiomqtt.MqttError as exc:
                    # A lost suspicion costs a pass; the reader, not this, tells a broken connection.
                    log.warning("suspicion not sent", vantage=vantage, error=str(exc))
                    continue
                self.hurries_sent += 1

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            topic = message.topic.value
            now = self.clock()
            try:
                if topic.startswith(wire.RESULTS + "/"):
                    result = self.accept(topic, bytes(payload), now)
                    if result is not None:
                        self.sink(result)
                elif topic.startswith(wire.AGENTS + "/"):
                    self.presence(topic, bytes(payload), now)
            except Exception as exc:  # noqa: BLE001 - one message, however made, never stops the intake
                self._drop(_vantage_of(topic, 5 if topic.startswith(wire.RESULTS) else 3), "invalid", repr(exc))


def _vantage_of(topic: str, index: int) -> str:
    parts = topic.split("/")
    return parts[index] if len(parts) > index else OTHER_VANTAGE
