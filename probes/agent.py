"""`regionshift agent`: probes every region from where it runs and publishes the results over MQTT.

An agent needs only the broker's address, its credentials and its vantage name. What it probes
comes from the controller, as a retained, versioned plan on the agent's own topic (see
`probes.wire`): a configuration change on the controller reaches every agent without a redeploy.

It imports nothing from `controller/` (nor scipy): a small process, one per region.

- Results are published with QoS 1 in the order they were made, up to `inflight` (20) awaiting
  their acknowledgements at once: a far broker does not hold an agent to one result per round
  trip. One is forgotten only once the broker has acknowledged it.
- While the broker is unreachable, probing goes on and results wait in a bounded buffer
  (`buffer` results; the oldest are dropped first, and counted); on reconnect they are replayed,
  marked late. A result the broker may have received before the connection broke is sent again
  with its sequence number: the controller counts it once.
- The connection is retried with capped, jittered exponential backoff (aiomqtt does not reconnect).
- Presence: "online" (retained) on connect, a last will "offline" with the same session, and an
  orderly "offline" on SIGTERM or SIGINT.
- Suspicion: the controller names the targets it suspects at this vantage on the agent's hurry
  topic, renewed on every judge pass while the suspicion lasts; the agent probes them harder
  (extra runs, marked so) for the hold the message gives, then goes back to its plan's intervals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiomqtt
import structlog

from probes import logs, wire
from probes.connection import tls_trouble
from probes.scheduler import Scheduler, make_prober
from probes.spec import Secret

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

    from probes.results import Result

log = structlog.get_logger("regionshift.agent")
T = TypeVar("T")

# The most results `--buffer` keeps while the broker is away: each is about 0.7 KB in memory (a
# failed HTTP result with its phases and error sentence), so the bound is about 700 MB, not an
# agent that grows until the host kills it. At 10 probes a second it is a day of results.
MAX_BUFFER = 1_000_000
BACKOFF_FIRST = 0.5  # seconds before the first reconnect
BACKOFF_CAP = 30.0  # and at most this long between two
# Results published at once, each awaiting its PUBACK: paho's and mosquitto's default window of
# QoS 1 messages in flight. One at a time, an agent sent at most one result per round trip to its
# broker (10 a second at 100 ms), under one suspect's pace.
INFLIGHT = 20


# Seconds after a connect with no plan for this vantage before the agent says so: a vantage the
# controller's configuration does not list gets none, and the agent idled, saying nothing.
PLAN_WAIT = 10.0


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before reconnect `attempt` (1, 2, ...): exponential, capped, and jittered
    over its whole range ("full jitter") so agents cut off together do not return together."""
    return rng.uniform(0, min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (attempt - 1)))


# What an MQTT client's connect error says when the broker answered and refused the login
# (CONNACK "not authorised", or "bad user name or password" in MQTT 3.1.1's words).
_REFUSED = ("not authori", "bad user name or password")


def broker_trouble(exc: Exception) -> str:
    """What went wrong with a broker connection, for its log line: a password that cannot be
    read (it was there at the start: a rotated file, an unset variable), a login the broker
    refused (it is reachable: a wrong password said "broker unreachable ... Not authorized"), or
    the broker not reached."""
    if isinstance(exc, LookupError):
        return "broker password unreadable"
    said = f"{exc} {getattr(exc, 'rc', '')} {exc.args}".lower()  # the CONNACK's reason, however told
    if any(word in said for word in _REFUSED):
        return "broker refused the login"
    return "broker unreachable"


@dataclass(slots=True)
class AgentSettings:
    vantage: str
    host: str
    port: int = 1883
    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    buffer: int = 10_000  # results kept while the broker is unreachable
    keepalive: int = 15
    inflight: int = INFLIGHT  # results awaiting their acknowledgement at once


@dataclass(slots=True)
class AgentStats:
    published: int = 0
    replayed: int = 0  # published late, from the buffer
    dropped: int = 0  # pushed out of a full buffer
    connects: int = 0
    plan_version: int | None = None
    plans_refused: int = 0
    hurries: int = 0  # suspicion messages applied
    hurries_refused: int = 0


@dataclass(slots=True)
class _Pending:
    seq: int
    result: Result
    late: bool = False
    acked: bool = False  # acknowledged, behind one that is not yet (forgotten with it)
    dropped: bool = False  # pushed out of a full buffer (counted, unless it was on its way and arrives)


@dataclass
class Agent:
    settings: AgentSettings
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    stats: AgentStats = field(default_factory=AgentStats)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._buffer: deque[_Pending] = deque()  # every result not yet acknowledged, in order
        self._unsent: deque[_Pending] = deque()  # those of them not handed to this connection yet
        self._ready = asyncio.Event()  # something to send, or a publish ended
        self._seq = 0
        self._scheduler: asyncio.Task[None] | None = None
        self._probes: Scheduler | None = None
        self._suspected: set[tuple[str, str]] = set()  # the targets of the last hurry, for the log
        self._targets: frozenset[tuple[str, str]] = frozenset()  # (region, probe) of the plan running
        self._connected = False
        self._overflowing = False  # the buffer dropped results, and has not drained to half since
        self.plan: wire.Plan | None = None

    # -- results ----------------------------------------------------------------------------

    def record(self, result: Result) -> None:
        """The scheduler's sink: number the result and queue it for publishing."""
        self._seq += 1
        buffer = self._buffer
        while buffer and buffer[0].acked:  # delivered, behind one dropped while in flight
            buffer.popleft()
        if len(buffer) >= self.settings.buffer:
            dropped = buffer.popleft()
            if self._unsent and self._unsent[0] is dropped:
                self._unsent.popleft()
            dropped.dropped = True
            self.stats.dropped += 1
            if not self._overflowing:  # once per overflow: the count is in the stop and connect lines
                self._overflowing = True
                log.warning(
                    "result buffer full: the oldest results are dropped until the broker takes them",
                    vantage=self.settings.vantage,
                    buffer=self.settings.buffer,
                    oldest_kept=round(buffer[0].result.started_at, 3) if buffer else None,
                )
        elif self._overflowing and len(buffer) < self.settings.buffer // 2:
            self._overflowing = False
        pending = _Pending(self._seq, result, late=not self._connected)
        self._buffer.append(pending)
        self._unsent.append(pending)
        self._ready.set()

    async def _publish_all(self, client: aiomqtt.Client) -> None:
        """Publish what waits, in order, up to `inflight` at once; a publish that fails (the
        connection broke) ends the loop with its error."""
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._ready.clear()
                for task in [t for t in in_flight if t.done()]:
                    in_flight.discard(task)
                    task.result()
                while self._unsent and len(in_flight) < self.settings.inflight:
                    task = asyncio.create_task(self._publish(client, self._unsent.popleft()))
                    task.add_done_callback(lambda _: self._ready.set())
                    in_flight.add(task)
                await self._ready.wait()
        finally:
            if in_flight:
                await cancel_all(in_flight)

    async def _publish(self, client: aiomqtt.Client, pending: _Pending) -> None:
        r = pending.result
        payload = wire.encode_result(r, self.session, pending.seq, late=pending.late)
        await acked(client.publish(wire.result_topic(r.region, r.probe, r.vantage), payload, qos=1))
        # Acknowledged (aiomqtt waits for PUBACK at QoS 1): only now is it forgotten, with any
        # acknowledged before it (one dropped from a full buffer meanwhile is gone already).
        pending.acked = True
        buffer = self._buffer
        while buffer and buffer[0].acked:
            buffer.popleft()
        self.stats.published += 1
        self.stats.replayed += pending.late
        if pending.dropped:  # pushed out of a full buffer while on its way, and it got there
            self.stats.dropped -= 1

    # -- the plan ---------------------------------------------------------------------------

    def _apply(self, payload: bytes) -> None:
        try:
            plan = wire.decode_plan(payload)
        except wire.WireError as exc:
            self.stats.plans_refused += 1
            log.warning("plan refused", vantage=self.settings.vantage, reason=exc.reason, detail=str(exc))
            return
        if plan.vantage != self.settings.vantage:
            self.stats.plans_refused += 1
            log.warning("plan refused", vantage=self.settings.vantage, reason="vantage_mismatch", plan=plan.vantage)
            return
        if self.plan is not None and plan.version <= self.plan.version:
            return  # the same plan again (retained, on every reconnect), or an older one
        self.plan = plan
        self.stats.plan_version = plan.version
        if self._scheduler is not None:
            self._scheduler.cancel()
        probers = [make_prober(p.spec, p.region, self.settings.vantage) for p in plan.probes]
        self._probes = Scheduler(probers, self.record)
        self._targets = frozenset((p.region, p.spec.name) for p in plan.probes)
        self._scheduler = asyncio.create_task(self._probes.run(), name="agent-probes")
        log.info("plan applied", vantage=self.settings.vantage, version=plan.version, probes=len(probers))

    def _hurry(self, topic: str, payload: bytes) -> None:
        """Probe the controller's suspects harder, those of the plan that runs; others are ignored."""
        try:
            hurry = wire.decode_hurry(topic, payload)
        except wire.WireError as exc:
            self.stats.hurries_refused += 1
            log.warning("suspicion refused", vantage=self.settings.vantage, reason=exc.reason, detail=str(exc))
            return
        if self._probes is None:  # no plan yet: nothing of its to hasten
            self.stats.hurries_refused += 1
            return
        before, self._suspected = self._suspected, set()
        for suspect in hurry.suspects:
            key = (suspect.region, suspect.probe)
            if key not in self._targets:
                continue
            self._probes.hasten(
                *key,
                every=hurry.every,
                hold=hurry.hold,
                budget=hurry.budget,
                runs=suspect.runs,
                parallel=hurry.parallel,
                seen=suspect.seen,
            )
            self._suspected.add(key)
            if key not in before:  # logged when it starts, not at each renewal
                log.info(
                    "probing a suspect harder",
                    vantage=self.settings.vantage,
                    region=suspect.region,
                    probe=suspect.probe,
                    why=suspect.why,
                    every=hurry.every,
                )
        self.stats.hurries += 1

    # -- the connection ---------------------------------------------------------------------

    def _presence(self, state: Literal["online", "offline"], *, at: float | None = None) -> bytes:
        presence = wire.Presence(
            vantage=self.settings.vantage,
            session=self.session,
            state=state,
            at=at,
            plan_version=self.stats.plan_version,
        )
        return wire.encode_presence(presence)

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        tls = None
        if s.ca_file is not None or s.cert_file is not None:
            tls = aiomqtt.TLSParameters(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file)
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=f"regionshift-agent-{s.vantage}-{self.session}",
            username=s.username,
            password=s.password.read() if s.password is not None else None,
            keepalive=s.keepalive,
            tls_params=tls,
            will=aiomqtt.Will(wire.status_topic(s.vantage), self._presence("offline"), qos=1, retain=True),
            max_inflight_messages=s.inflight,
        )
        # aiomqtt warns of more than 10 calls awaiting an answer; the window is meant to fill.
        client.pending_calls_threshold = s.inflight + 2
        return client

    async def _session(self, client: aiomqtt.Client) -> None:
        status = wire.status_topic(self.settings.vantage)
        await acked(client.publish(status, self._presence("online", at=time.time()), qos=1, retain=True))
        await acked(client.subscribe(wire.plan_topic(self.settings.vantage), qos=1))
        await acked(client.subscribe(wire.hurry_topic(self.settings.vantage), qos=0))
        self._connected = True
        self._unsent = deque(p for p in self._buffer if not p.acked)
        for pending in self._unsent:
            pending.late = True  # made while cut off, or not acknowledged before the cut
        # Two loops on one connection; whichever ends first (only by an error: the connection
        # broke) ends the other, and its error is the session's.
        tasks = {asyncio.create_task(self._read(client)), asyncio.create_task(self._publish_all(client))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_all(tasks)
        for task in done:
            task.result()

    async def _read(self, client: aiomqtt.Client) -> None:
        hurry = wire.hurry_topic(self.settings.vantage)
        waiting = asyncio.get_running_loop().call_later(PLAN_WAIT, self._no_plan_yet)
        try:
            async for message in client.messages:
                if not isinstance(message.payload, bytes | bytearray):
                    continue
                running = self.stats.plan_version
                try:
                    if message.topic.value == hurry:
                        self._hurry(hurry, bytes(message.payload))
                    else:
                        self._apply(bytes(message.payload))
                except Exception as exc:  # noqa: BLE001 - one message, however made, never stops the agent
                    log.warning("message from the controller ignored", topic=message.topic.value, error=repr(exc))
                if self.stats.plan_version != running:
                    # Which plan runs now, in its presence: said only at connect, before the plan
                    # came, the controller showed none (or the one before a change).
                    status = wire.status_topic(self.settings.vantage)
                    await acked(client.publish(status, self._presence("online", at=time.time()), qos=1, retain=True))
        finally:
            waiting.cancel()

    def _no_plan_yet(self) -> None:
        if self.plan is None:
            log.warning(
                "no plan from the controller yet: it probes nothing until one comes",
                vantage=self.settings.vantage,
                waited=PLAN_WAIT,
                check="is this vantage among agents.vantages in the controller's configuration?",
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, probe and publish until `stop` is set; then say "offline" in order."""
        try:
            await self._connected_until(stop)
        finally:
            self._connected = False
            if self._scheduler is not None:
                await cancel_all({self._scheduler})

    async def _connected_until(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                client = self._client()
                async with client:
                    self.stats.connects += 1
                    attempt = 0
                    log.info(
                        "connected",
                        vantage=self.settings.vantage,
                        broker=self._where(),
                        session=self.session,
                        to_replay=len(self._buffer),
                        dropped=self.stats.dropped,
                    )
                    session = asyncio.create_task(self._session(client))
                    stopping = asyncio.create_task(stop.wait())
                    try:
                        done, _ = await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        await cancel_all({session, stopping})
                    if session in done:
                        session.result()  # the connection broke: its error
                    log.info("stopping", vantage=self.settings.vantage, buffered=len(self._buffer))
                    status = wire.status_topic(self.settings.vantage)
                    try:
                        offline = self._presence("offline", at=time.time())
                        await acked(client.publish(status, offline, qos=1, retain=True))
                    except aiomqtt.MqttError as exc:
                        log.warning("offline status not sent", vantage=self.settings.vantage, error=str(exc))
                    break
            except (aiomqtt.MqttError, LookupError) as exc:  # LookupError: the password (`Secret.read`)
                self._connected = False
                attempt += 1
                wait = backoff(attempt, self.rng)
                log.warning(
                    broker_trouble(exc),
                    vantage=self.settings.vantage,
                    broker=self._where(),
                    error=str(exc),
                    retry_in=round(wait, 2),
                    buffered=len(self._buffer),
                    dropped=self.stats.dropped,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"


async def acked(call: Awaitable[T]) -> T:
    """Await one aiomqtt call (a publish waiting for its PUBACK, a subscribe for its SUBACK), and
    let a cancellation that came meanwhile through. On Python 3.11, `asyncio.wait_for` (aiomqtt
    waits with it) returns the result when a cancellation meets the acknowledgement, and the
    cancellation is lost: the publishing loop then lived on, waiting for results, and a session
    that had ended (or a stop) waited for it forever (about one broker restart in five)."""
    result = await call
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return result


async def cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until they have ended. Their errors are left for whoever reads
    them (`result()`); a cancellation of the caller meanwhile still reaches the caller (awaiting
    each task under `suppress(CancelledError)` would swallow it, and the caller would go on)."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio would otherwise log it as never read


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="regionshift agent",
        description="probe every region from here and publish the results to the controller over MQTT",
    )
    p.add_argument("--vantage", required=True, help="this agent's vantage name, e.g. agent-eu-west-1")
    p.add_argument("--broker", required=True, metavar="HOST:PORT", help="the MQTT broker")
    p.add_argument("--username", help="the broker user (default: the vantage name)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--password-env", metavar="VAR", help="read the broker password from this variable")
    secret.add_argument("--password-file", metavar="FILE", help="read the broker password from this file")
    p.add_argument("--ca-file", help="PEM CA bundle: connect with TLS and trust it")
    p.add_argument("--cert-file", help="PEM client certificate (with --key-file)")
    p.add_argument("--key-file", help="PEM key of the client certificate")
    p.add_argument(
        "--buffer",
        type=int,
        default=10_000,
        help=f"results kept while the broker is unreachable (about 0.7 KB each; at most {MAX_BUFFER:,})",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"], help="to stderr, one event a line")
    return p


def settings_from(args: argparse.Namespace) -> AgentSettings:
    """Settings from the command line; raises ValueError with a sentence naming the mistake."""
    if not wire.valid_name(args.vantage):
        raise ValueError(f"--vantage {args.vantage!r}: letters, digits, '.', '_' or '-', at most 63")
    host, sep, port = args.broker.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:  # noqa: PLR2004
        raise ValueError(f"--broker {args.broker!r} is not HOST:PORT (e.g. 'mqtt.internal:8883')")
    if (args.cert_file is None) != (args.key_file is None):
        raise ValueError("--cert-file and --key-file go together")
    if not 1 <= args.buffer <= MAX_BUFFER:
        most = f"{MAX_BUFFER:,} results (about 0.7 KB each, {MAX_BUFFER * 7 // 10_000:,} MB)"
        raise ValueError(f"--buffer {args.buffer}: from 1 to {most}")
    password = None
    if args.password_env is not None:
        password = Secret(env=args.password_env)
    elif args.password_file is not None:
        password = Secret(file=args.password_file)
    return AgentSettings(
        vantage=args.vantage,
        host=host.strip("[]"),
        port=int(port),
        username=args.username or args.vantage,
        password=password,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        buffer=args.buffer,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)  # the controller's lines, on stderr (not stdout)
    try:
        settings = settings_from(args)
        if settings.password is not None:
            settings.password.read()  # missing or empty: say so now, not at the first connect
    except (ValueError, LookupError) as exc:
        print(f"regionshift agent: {exc}", file=sys.stderr)
        return 2
    files = tls_trouble(
        ("--ca-file", settings.ca_file), ("--cert-file", settings.cert_file), ("--key-file", settings.key_file)
    )
    if files is not None:  # said now: a missing or wrong file was retried for ever as "broker unreachable"
        print(f"regionshift agent: {files}", file=sys.stderr)
        return 2
    agent = Agent(settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    try:
        asyncio.run(run())
    except Exception as exc:  # noqa: BLE001 - a fault at run time: one sentence, never a traceback
        print(f"regionshift agent {settings.vantage}: stopped by an unexpected error: {exc}", file=sys.stderr)
        return 1
    log.info("stopped", vantage=settings.vantage, published=agent.stats.published, dropped=agent.stats.dropped)
    return 0


if __name__ == "__main__":  # `python -m probes.agent`: how the demo starts its agents
    sys.exit(main())
