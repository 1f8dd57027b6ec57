"""Probe agents over MQTT: the wire format, the controller's intake, and agents against a real
mosquitto (password file, ACL) on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import pytest
from structlog.testing import capture_logs

from controller.daemon import Daemon
from controller.demo.broker import ACL, CONTROLLER_USER, Broker, BrokerTlsFiles
from controller.intake import DROP_REASONS, Intake
from controller.judging.suspicion import Suspicion
from controller.settings.policy import SuspicionPolicy
from controller.settings.schema import AgentsSettings
from controller.web.views import text
from probes import agent as agent_module
from probes import wire
from probes.agent import Agent, AgentSettings, backoff, broker_trouble
from probes.agent import main as agent_main
from probes.results import Result
from probes.spec import HttpProbe, Secret
from tests.conftest import REGIONSHIFT
from tests.links import DelayedLink
from tests.test_daemon import Running, world_config

if TYPE_CHECKING:
    from controller.demo.world import SimulatedRegion

SESSION = "0123456789abcdef"
PASSWORDS = {CONTROLLER_USER: "controller-pw", "agent-a": "a-pw", "agent-b": "b-pw", "agent-c": "c-pw"}


def result(region="eu-west-1", probe="home", vantage="agent-a", at=None, ok=True, latency=0.05) -> Result:
    return Result(region, probe, vantage, time.time() if at is None else at, ok=ok, latency=latency)


def intake_settings(broker: Broker | None = None, **changes) -> AgentsSettings:
    return AgentsSettings.model_validate(
        {
            "broker": broker.address if broker else "127.0.0.1:1883",
            "username": CONTROLLER_USER,
            "password": {"env": "TEST_MQTT_CONTROLLER_PASSWORD"},
            "vantages": ["agent-a", "agent-b"],
            **changes,
        }
    )


def make_intake(broker: Broker | None = None, sink=None, plans=None, **changes) -> tuple[Intake, Counter, list]:
    dropped: Counter[tuple[str, str]] = Counter()
    accepted: list[Result] = []
    intake = Intake(
        intake_settings(broker, **changes),
        [("eu-west-1", "home"), ("eu-west-1", "orders")],
        sink or accepted.append,
        dropped=lambda v, r: dropped.update([(v, r)]),
        plans=plans,
    )
    return intake, dropped, accepted


def accepted_seqs(intake: Intake) -> list[int]:
    """The sequence numbers of the results `intake` accepts from now on, as they come."""
    seqs: list[int] = []
    accept = intake.accept

    def counting(t, payload, now):
        found = accept(t, payload, now)
        if found is not None:
            seqs.append(json.loads(payload)["seq"])
        return found

    intake.accept = counting  # type: ignore[method-assign]
    return seqs


def topic(vantage="agent-a", region="eu-west-1", probe="home") -> str:
    return wire.result_topic(region, probe, vantage)


# -- the wire format and the intake's decisions, without a broker -------------------------------


def test_a_result_goes_over_the_wire_and_comes_back_the_same():
    sent = Result("eu-west-1", "lag", "agent-a", 1_800_000_000.5, ok=False, latency=math.inf, error_class="stalled")
    message = wire.decode_result(topic(probe="lag"), wire.encode_result(sent, SESSION, 7, late=True))
    assert (message.session, message.seq, message.late, message.latency) == (SESSION, 7, True, None)
    assert message.result() == sent


def test_the_intake_drops_what_it_cannot_trust_and_counts_each_by_reason():
    with capture_logs() as logs:
        cases = _drop_every_kind()
    # The first drop of each kind from each vantage is a warning (an agent whose clock is off
    # had every result dropped, and only the debug log said so), a duplicate's info (QoS 1 doing
    # its work); a repeat is not told.
    told = [e for e in logs if e["log_level"] in ("warning", "info") and e["event"].startswith("agent message dropped")]
    assert len(told) == len(cases)  # "duplicate" came twice, told once
    assert [e["reason"] for e in told if e["log_level"] == "info"] == ["duplicate"]
    assert {(e["vantage"], e["reason"]) for e in told} >= {("agent-a", "clock_skew"), ("agent-z", "unknown_vantage")}


def test_an_agent_whose_clock_is_off_shows_its_skew_though_every_result_is_dropped():
    # The skew (and lag) stayed at the last accepted result's while every result was dropped:
    # regionshift_agent_clock_skew_seconds read -0.001 and RegionshiftAgentClockAhead never fired.
    intake, dropped, _ = make_intake()
    now = time.time()
    assert intake.accept(topic(), wire.encode_result(result(at=now - 0.5), SESSION, 1), now) is not None
    assert intake.accept(topic(), wire.encode_result(result(at=now + 60), SESSION, 2), now) is None
    assert intake.agents["agent-a"].skew == pytest.approx(60, abs=1)
    assert intake.accept(topic(), wire.encode_result(result(at=now - 300), SESSION, 3), now) is None
    assert intake.agents["agent-a"].skew == pytest.approx(-300, abs=1)
    assert intake.agents["agent-a"].lag == pytest.approx(300, abs=1)
    assert dropped == Counter({("agent-a", "clock_skew"): 1, ("agent-a", "too_old"): 1})


def test_two_agents_under_one_vantage_name_are_told_a_restarted_one_is_not():
    # Merged in silence: the vantage showed three times the results, and the first to stop
    # marked the other offline while it still reported.
    intake, _, _ = make_intake()
    now = time.time()
    other = "fedcba9876543210"
    with capture_logs() as logs:
        for seq in range(1, 6):  # a restart: the old session stops, the new one goes on
            intake.accept(topic(), wire.encode_result(result(at=now - 2), SESSION, seq), now)
        for seq in range(1, 6):
            intake.accept(topic(), wire.encode_result(result(at=now - 1), other, seq), now)
    assert not [e for e in logs if e["event"].startswith("two agents")]
    with capture_logs() as logs:
        for seq in range(6, 10):  # then both, in turn
            intake.accept(topic(), wire.encode_result(result(at=now), SESSION, seq), now)
            intake.accept(topic(), wire.encode_result(result(at=now), other, seq), now)
    (told,) = [e for e in logs if e["event"].startswith("two agents report as one vantage")]
    assert (told["vantage"], told["sessions"], told["log_level"]) == ("agent-a", sorted([SESSION, other]), "warning")


def _drop_every_kind():
    intake, dropped, _ = make_intake()
    now = time.time()
    good = wire.encode_result(result(at=now - 1), SESSION, 1)
    assert intake.accept(topic(), good, now) is not None
    assert intake.accept(topic(), good, now) is None  # QoS 1 redelivered it
    cases = {
        "duplicate": (topic(), good),
        "vantage_mismatch": (topic("agent-b"), wire.encode_result(result(at=now), SESSION, 2)),
        "unknown_vantage": (topic("agent-z"), wire.encode_result(result(vantage="agent-z", at=now), SESSION, 3)),
        "unknown_target": (
            topic(probe="nope"),
            wire.encode_result(result(probe="nope", at=now), SESSION, 4),
        ),
        "clock_skew": (topic(), wire.encode_result(result(at=now + 120), SESSION, 5)),
        "too_old": (topic(), wire.encode_result(result(at=now - 400), SESSION, 6)),
        "schema": (topic(), json.dumps({**json.loads(good), "schema": 2, "seq": 8}).encode()),
        "not_json": (topic(), b"\xff{"),
        "invalid": (topic(), json.dumps({**json.loads(good), "ok": "yes", "seq": 9}).encode()),
        "topic": ("regionshift/v1/results/eu-west-1/home", good),
        "too_large": (topic(), b" " * (wire.MAX_PAYLOAD + 1)),
    }
    for reason, (t, payload) in cases.items():
        assert intake.accept(t, payload, now) is None, reason
    assert dropped == Counter(
        {("agent-a", r): 1 for r in cases if r not in ("duplicate", "unknown_vantage", "vantage_mismatch", "topic")}
        | {("agent-a", "duplicate"): 2, ("other", "unknown_vantage"): 1, ("agent-b", "vantage_mismatch"): 1}
        | {("other", "topic"): 1}  # a topic without a vantage in it
    )
    # A result replayed late after an outage may be older than a live one, up to max_age.
    late = wire.encode_result(result(at=now - 400), SESSION, 10, late=True)
    assert intake.accept(topic(), late, now) is not None
    assert set(DROP_REASONS) >= {r for _, r in dropped}
    return cases


def test_a_broker_connection_s_trouble_is_named_for_what_it_is():
    assert broker_trouble(LookupError("$X is empty or not set")) == "broker password unreadable"
    assert broker_trouble(aiomqtt.MqttCodeError(5, "Connection refused: Not authorised")) == "broker refused the login"
    assert broker_trouble(aiomqtt.MqttCodeError(4, "no connection")) == "broker unreachable"
    assert broker_trouble(aiomqtt.MqttError("[code:135] Not authorized")) == "broker refused the login"
    assert broker_trouble(aiomqtt.MqttError("[Errno 111] Connection refused")) == "broker unreachable"


def test_the_agent_command_names_a_tls_file_it_cannot_read(capsys):
    # It was retried for ever as "broker unreachable", naming no file.
    args = ["--vantage", "a", "--broker", "127.0.0.1:1", "--ca-file", "/nonexistent/ca.pem"]
    assert agent_main(args) == 2
    assert (
        capsys.readouterr().err.strip() == "regionshift agent: --ca-file /nonexistent/ca.pem: No such file or directory"
    )


def test_tls_files_that_are_no_certificates_are_refused_before_the_first_connect(capsys, tmp_path):
    # A readable file that is no certificate (a wrong secret mounted) was retried for ever as
    # "broker unreachable", by the agent and by the controller alike (trial G).
    wrong = tmp_path / "hostname"
    wrong.write_text("a-host\n")
    base = ["--vantage", "a", "--broker", "127.0.0.1:1"]
    assert agent_main([*base, "--ca-file", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"regionshift agent: --ca-file {wrong}: no CA certificate in it (PEM) (NO_CERTIFICATE_OR_CRL_FOUND)"
    assert agent_main([*base, "--cert-file", str(wrong), "--key-file", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    said = (
        f"regionshift agent: --cert-file {wrong} with --key-file {wrong}: not a certificate and its private key (PEM)"
    )
    assert err == said


def _fuzzed(rng: random.Random, now: float) -> tuple[str, bytes]:
    base = json.loads(wire.encode_result(result(at=now - rng.uniform(0, 5)), SESSION, rng.randint(1, 50)))
    choice = rng.randrange(8)
    if choice == 0:  # random bytes
        return topic(), rng.randbytes(rng.randint(0, 64))
    if choice == 1:  # a field removed
        base.pop(rng.choice(list(base)))
    elif choice == 2:  # a field of the wrong type or out of range
        base[rng.choice(list(base))] = rng.choice([None, -1, 1e308, "x" * 600, [], {}, True, math.nan, "∞"])
    elif choice == 3:  # an extra field
        base[rng.choice(["x", "admin", "__class__"])] = 1
    elif choice == 4:  # time far off
        base["started_at"] = now + rng.choice([-1e6, -900, 45, 1e6])
    elif choice == 5:  # a truncated payload
        text = json.dumps(base)
        return topic(), text[: rng.randrange(len(text))].encode()
    elif choice == 6:  # the wrong topic
        return rng.choice(["regionshift/v1/results", topic("agent-b"), topic(probe="other"), "x/y/z/a/b/c"]), (
            json.dumps(base).encode()
        )
    return topic(), json.dumps(base, allow_nan=True).encode()


def test_ten_thousand_fuzzed_payloads_never_crash_the_intake_and_every_one_is_counted():
    intake, dropped, _ = make_intake()
    rng = random.Random(13)
    now = time.time()
    accepted = 0
    for _ in range(10_000):
        t, payload = _fuzzed(rng, now)
        accepted += intake.accept(t, payload, now) is not None
    assert accepted + sum(dropped.values()) == 10_000
    assert accepted > 0  # the generator's unmutated messages pass
    assert {r for _, r in dropped} >= {"invalid", "not_json", "duplicate", "topic", "clock_skew", "too_old"}


def test_a_deeply_nested_payload_is_dropped_by_the_intake_and_refused_by_the_agent_never_raised():
    deep = b'{"a":' * 3000  # 15 KB: json.loads raises RecursionError, not ValueError
    intake, dropped, accepted = make_intake()
    assert intake.accept(topic(), deep, time.time()) is None
    intake.presence(wire.status_topic("agent-a"), deep, time.time())
    assert dropped == Counter({("agent-a", "not_json"): 2})
    assert accepted == []
    agent = Agent(AgentSettings(vantage="agent-a", host="127.0.0.1"))
    agent._hurry(wire.hurry_topic("agent-a"), deep)
    agent._apply(deep)
    assert (agent.stats.hurries_refused, agent.stats.plans_refused) == (1, 1)


def test_a_suspicion_hastens_within_bounds_whatever_the_policy_or_the_message_says():
    long_hold = wire.Hurry(vantage="agent-a", every=0.1, hold=60.0, budget=300, suspects=[]).model_dump(by_alias=True)
    for wrong in ({"hold": 3600.0}, {"every": 0.001}, {"budget": 100_000}, {"parallel": 17}, {"parallel": 0}):
        payload = json.dumps({**long_hold, **wrong}).encode()
        with pytest.raises(wire.WireError, match=next(iter(wrong))) as refused:
            wire.decode_hurry(wire.hurry_topic("agent-a"), payload)
        assert refused.value.reason == "invalid"
    counted = {**long_hold, "suspects": [{"region": "eu-west-1", "probe": "orders", "runs": -1}]}
    with pytest.raises(wire.WireError, match="runs"):
        wire.decode_hurry(wire.hurry_topic("agent-a"), json.dumps(counted).encode())
    # The controller clamps what it sends: a policy's `every` of an hour and a slow pass still fit.
    intake, _, _ = make_intake()
    intake.connected = True
    policy = SuspicionPolicy(every=86_400.0, budget=6_000, parallel=16)
    suspected = {("eu-west-1", "orders"): Suspicion("x", runs=40), ("eu-west-1", "home"): Suspicion("y")}
    intake.hurry("agent-a", suspected, held=5_000.0, policy=policy)
    sent = dict(intake._outbox)
    hurry = wire.decode_hurry(wire.hurry_topic("agent-a"), sent["agent-a"])
    assert (hurry.every, hurry.hold, hurry.budget, hurry.parallel) == (wire.MAX_EVERY, wire.MAX_HOLD, 6_000, 16)
    assert [(s.probe, s.runs) for s in hurry.suspects] == [("home", None), ("orders", 40)]


def test_a_will_from_an_older_session_does_not_mark_a_newer_one_offline():
    intake, _, _ = make_intake()
    status = wire.status_topic("agent-a")
    new = wire.Presence(vantage="agent-a", session="bbbbbbbbbbbbbbbb", state="online", at=time.time())
    old_will = wire.Presence(vantage="agent-a", session="aaaaaaaaaaaaaaaa", state="offline")
    intake.presence(status, wire.encode_presence(new), time.time())
    intake.presence(status, wire.encode_presence(old_will), time.time())
    assert intake.agents["agent-a"].state == "online"


def test_a_decommissioned_agent_s_retained_presence_says_how_to_clear_it():
    intake, _, _ = make_intake()
    gone = wire.Presence(vantage="agent-old", session="cccccccccccccccc", state="offline")
    with capture_logs() as logs:
        intake.presence(wire.status_topic("agent-old"), wire.encode_presence(gone), time.time())
    [told] = [e for e in logs if e["event"].startswith("agent message dropped")]
    assert told["reason"] == "unknown_vantage"
    assert told["detail"].endswith("mosquitto_pub -r -n -t regionshift/v1/agents/agent-old/status"), told


def test_a_redelivered_duplicate_is_told_as_info_a_refused_result_as_a_warning():
    # Trial G: QoS 1 redelivering after a broker restart, the designed path, was a warning.
    intake, _, _ = make_intake()
    now = time.time()
    good = wire.encode_result(result(at=now - 1), SESSION, 1)
    with capture_logs() as logs:
        intake.accept(topic(), good, now)
        intake.accept(topic(), good, now)
        intake.accept(topic(), wire.encode_result(result(at=now + 120), SESSION, 2), now)
    told = [(e["reason"], e["log_level"]) for e in logs if e["event"].startswith("agent message dropped")]
    assert told == [("duplicate", "info"), ("clock_skew", "warning")]


def test_a_second_agent_under_one_name_that_stops_leaves_the_one_still_reporting_online():
    # Trial G: an agent started by hand under a running one's name, then stopped: its goodbye
    # marked the vantage offline (agent_up 0, the AgentDown alert) while the first kept reporting.
    intake, _, _ = make_intake()
    status, now = wire.status_topic("agent-a"), time.time()
    running, second = SESSION, "fedcba9876543210"
    intake.presence(
        status, wire.encode_presence(wire.Presence(vantage="agent-a", session=running, state="online", at=now)), now
    )
    intake.accept(topic(), wire.encode_result(result(at=now - 1), running, 1), now)
    intake.presence(
        status, wire.encode_presence(wire.Presence(vantage="agent-a", session=second, state="online", at=now)), now
    )
    intake.accept(topic(), wire.encode_result(result(at=now - 1), second, 1), now)
    intake.presence(
        status, wire.encode_presence(wire.Presence(vantage="agent-a", session=second, state="offline")), now + 1
    )
    assert intake.agents["agent-a"].state == "offline"  # what the broker said, until a result says otherwise
    # One started before the goodbye (queued, perhaps by a session now dead) says nothing of now.
    intake.accept(topic(), wire.encode_result(result(at=now + 0.5), running, 2), now + 1.5)
    assert intake.agents["agent-a"].state == "offline"
    intake.accept(topic(), wire.encode_result(result(at=now + 1.5), running, 3), now + 2)
    agent = intake.agents["agent-a"]
    assert (agent.state, agent.session) == ("online", running)
    # A late result (replayed after an outage) says nothing of who is alive now.
    intake.presence(
        status, wire.encode_presence(wire.Presence(vantage="agent-a", session=running, state="offline")), now + 3
    )
    intake.accept(topic(), wire.encode_result(result(at=now + 3.5), second, 2, late=True), now + 4)
    assert intake.agents["agent-a"].state == "offline"


def test_reconnect_backoff_is_jittered_and_capped():
    rng = random.Random(1)
    waits = [backoff(attempt, rng) for attempt in range(1, 40)]
    assert max(waits) <= 30.0
    assert len({round(w, 3) for w in waits}) > 30  # not one fixed schedule


async def test_a_full_buffer_drops_the_oldest_and_counts_only_what_never_arrived():
    """Buffer 3, one publish in flight at a time: the oldest result is dropped for a new one.
    Dropped while on its way and then acknowledged, it arrived: published, not dropped. Dropped
    before it was sent, it is never sent."""
    agent = Agent(AgentSettings(vantage="agent-a", host="127.0.0.1", buffer=3, inflight=1))

    class Broker:  # a publish is acknowledged once released
        def __init__(self) -> None:
            self.sent: list[int] = []
            self.release = asyncio.Event()

        async def publish(self, _topic: str, payload: bytes, qos: int) -> None:
            assert qos == 1
            self.sent.append(json.loads(payload)["seq"])
            await self.release.wait()

    broker = Broker()
    for i in range(3):
        agent.record(result(at=1_800_000_000 + i))
    publishing = asyncio.create_task(agent._publish_all(broker))  # type: ignore[arg-type]
    await until(lambda: broker.sent == [1], what="the first result on its way")
    with capture_logs() as logs:
        agent.record(result(at=1_800_000_003))  # full: 1 (on its way) goes
        agent.record(result(at=1_800_000_004))  # full: 2 (never sent) goes
    assert agent.stats.dropped == 2
    # Told once, not at every result that pushes one out.
    told = [e for e in logs if e["event"].startswith("result buffer full")]
    assert [(e["log_level"], e["buffer"], e["oldest_kept"]) for e in told] == [("warning", 3, 1_800_000_001)]
    broker.release.set()
    await until(lambda: agent.stats.published == 4, what="every result still held published")
    publishing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publishing
    assert broker.sent == [1, 3, 4, 5]
    assert agent.stats.dropped == 1  # 2 only: 1 got there


# -- against a real mosquitto -----------------------------------------------------------------


@pytest.fixture
def broker(monkeypatch):
    monkeypatch.setenv("TEST_MQTT_CONTROLLER_PASSWORD", PASSWORDS[CONTROLLER_USER])
    for vantage in ("agent-a", "agent-b", "agent-c"):
        monkeypatch.setenv(f"TEST_MQTT_{vantage[-1].upper()}_PASSWORD", PASSWORDS[vantage])
    monkeypatch.setenv("TEST_MQTT_WRONG_PASSWORD", "not-the-password")
    with Broker(dict(PASSWORDS)) as b:
        yield b


def agent_for(broker: Broker, vantage="agent-a", password_env="TEST_MQTT_A_PASSWORD", **settings) -> Agent:  # noqa: S107 - a variable's name
    return Agent(
        AgentSettings(
            **{
                "vantage": vantage,
                "host": "127.0.0.1",
                "port": broker.port,
                "username": vantage,
                "password": Secret(env=password_env),
                "keepalive": 5,
                **settings,
            }
        )
    )


def daemon_with_agents(broker: Broker, world, agents: tuple[str, ...]) -> tuple[Daemon, list[Agent]]:
    """A daemon watching `world` with these agents configured, and the agents (not yet running)."""
    config = world_config(world).model_copy(update={"agents": intake_settings(broker, vantages=list(agents))})
    return Daemon(config), [agent_for(broker, v, f"TEST_MQTT_{v[-1].upper()}_PASSWORD") for v in agents]


def plan_for(region: SimulatedRegion, vantage="agent-a", version=1, interval=0.1) -> dict[str, bytes]:
    specs = [
        HttpProbe(name="home", target=region.url + "/healthz", interval=interval, timeout=interval),
        HttpProbe(name="orders", target=region.url + "/api/orders", interval=interval, timeout=interval),
    ]
    return {vantage: wire.encode_plan(version, vantage, [("eu-west-1", s) for s in specs])}


async def until(condition, within=10.0, what="condition", explain=None):
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            for task in asyncio.all_tasks():  # where everything waits: what a hang needs explained
                task.print_stack(limit=8, file=sys.stdout)
            pytest.fail(f"timed out waiting for {what}" + (f": {explain()}" if explain is not None else ""))
        await asyncio.sleep(0.05)


async def test_an_agent_takes_its_plan_from_the_controller_and_its_results_reach_the_windows(broker, region):
    received: list[Result] = []
    intake, dropped, _ = make_intake(broker, sink=received.append, plans=plan_for(region))
    agent = agent_for(broker)
    stop_intake, stop_agent = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(intake.run(stop_intake))
        await until(lambda: intake.connected, what="the intake's connection")
        group.create_task(agent.run(stop_agent))
        await until(lambda: len({r.probe for r in received}) == 2 and len(received) >= 10, what="results")
        view = intake.agents["agent-a"]
        assert view.state == "online"
        assert view.session == agent.session
        # Which plan runs, said once it does (at connect it had none yet: the state showed null).
        await until(lambda: view.plan_version == 1, what="the plan's version in the agent's presence")
        assert {r.vantage for r in received} == {"agent-a"}
        assert all(r.ok for r in received)
        assert view.lag is not None
        assert 0 <= view.lag < 1.0
        stop_agent.set()
        await until(lambda: view.state == "offline", what="the orderly offline status")
        stop_intake.set()
    assert agent.plan is not None
    assert agent.plan.version == 1
    assert not dropped


async def test_an_agent_that_gets_no_plan_says_so(broker, monkeypatch):
    # A vantage the controller's configuration does not list gets no plan: the agent said
    # "connected" and then idled, probing nothing and saying nothing.
    monkeypatch.setattr(agent_module, "PLAN_WAIT", 0.3)
    agent = agent_for(broker)
    stop = asyncio.Event()
    with capture_logs() as logs:
        running = asyncio.create_task(agent.run(stop))
        await until(lambda: any(e["event"].startswith("no plan from the controller yet") for e in logs), what="it")
        stop.set()
        await running
    (told,) = [e for e in logs if e["event"].startswith("no plan from the controller yet")]
    assert (told["vantage"], told["log_level"]) == ("agent-a", "warning")
    assert "agents.vantages" in told["check"]


async def test_an_agent_probes_the_controllers_suspects_harder_while_it_is_asked_to(broker, region):
    received: list[Result] = []
    intake, _, _ = make_intake(broker, sink=received.append, plans=plan_for(region, interval=1.0))
    agent = agent_for(broker)
    stop_intake, stop_agent = asyncio.Event(), asyncio.Event()

    def extra(probe: str) -> int:
        return sum(r.reason == "suspicion" and r.probe == probe for r in received)

    async with asyncio.TaskGroup() as group:
        group.create_task(intake.run(stop_intake))
        await until(lambda: intake.connected, what="the intake's connection")
        group.create_task(agent.run(stop_agent))
        await until(lambda: len(received) >= 2, what="scheduled results")
        assert extra("orders") == 0
        # One suspect, renewed every quarter second for 2 s as the judge renews it.
        suspected = {
            ("eu-west-1", "orders"): Suspicion("failed 0.1s ago at agent-a"),
            ("eu-west-1", "unknown"): Suspicion("not planned"),
        }
        for _ in range(8):
            intake.hurry("agent-a", suspected, held=0.5, policy=SuspicionPolicy(every=0.05, budget=300))
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.2)
        during = extra("orders")
        # The suspicion is over half a second after the last renewal: back to one run a second.
        await asyncio.sleep(1.0)
        after = extra("orders")
        assert extra("home") == 0  # not suspected, not hastened
        # A counted suspicion (a lone failure's) runs what it asks for, however long its hold.
        counted = {("eu-west-1", "home"): Suspicion("failed 0.1s ago at agent-a", runs=6)}
        intake.hurry("agent-a", counted, held=30.0, policy=SuspicionPolicy(every=0.05, budget=300, parallel=2))
        await until(lambda: extra("home") >= 6, what="the counted runs")
        await asyncio.sleep(1.0)
        stop_agent.set()
        await until(lambda: intake.agents["agent-a"].state == "offline", what="offline")
        stop_intake.set()
    # 2 s at one run every 50 ms at most (each takes a few ms here): about 40, never above 50.
    assert 15 <= during <= 50, during
    assert extra("orders") == after  # nothing more once the suspicion ended
    assert extra("home") == 6  # its count exactly
    assert agent.stats.hurries == 9
    assert agent.stats.hurries_refused == 0
    assert intake.hurries_sent == 9


def test_an_agent_refuses_a_suspicion_that_is_not_for_it():
    agent = Agent(AgentSettings(vantage="agent-a", host="127.0.0.1"))  # never connected: the decision alone
    message = wire.Hurry(vantage="agent-b", every=0.1, hold=1.0, budget=10, suspects=[])
    agent._hurry(wire.hurry_topic("agent-a"), wire.encode_hurry(message))
    agent._hurry(wire.hurry_topic("agent-a"), b'{"schema": 1, "vantage": "agent-a"}')
    assert (agent.stats.hurries, agent.stats.hurries_refused) == (0, 2)
    with pytest.raises(wire.WireError, match="not a hurry topic"):
        wire.decode_hurry(wire.plan_topic("agent-a"), wire.encode_hurry(message))


async def test_the_broker_refuses_a_wrong_password_and_a_topic_of_another_vantage(broker, region):
    received: list[Result] = []
    intake, dropped, _ = make_intake(broker, sink=received.append, plans=plan_for(region))
    wrong = agent_for(broker, password_env="TEST_MQTT_WRONG_PASSWORD")
    stop = asyncio.Event()
    with capture_logs() as logs:
        await _forge_beside(intake, wrong, stop, broker, received)
    assert [(r.vantage, r.region) for r in received] == [("agent-a", "eu-west-1")]
    assert dropped == Counter({("agent-a", "vantage_mismatch"): 1})
    assert wrong.stats.connects == 0
    assert intake.agents["agent-a"].state == "never seen"  # the wrong password never said hello
    assert "not authorised" in broker.log
    # Said as what it is: the broker answered (it said "broker unreachable ... Not authorized").
    assert any(e["event"] == "broker refused the login" for e in logs), [e["event"] for e in logs]


async def _forge_beside(intake, wrong, stop, broker, received):
    async with asyncio.TaskGroup() as group:
        group.create_task(intake.run(stop))
        group.create_task(wrong.run(stop))
        await until(lambda: intake.connected, what="the intake's connection")
        # agent-a, with its own good password, forges a result under agent-b's topic: the ACL
        # drops it at the broker. Its own topic with agent-b's name inside: the controller does.
        now = time.time()
        async with aiomqtt.Client("127.0.0.1", broker.port, username="agent-a", password=PASSWORDS["agent-a"]) as a:
            forged = result(vantage="agent-b", at=now)
            await a.publish(topic("agent-b"), wire.encode_result(forged, SESSION, 1), qos=1)
            await a.publish(topic("agent-a"), wire.encode_result(forged, SESSION, 2), qos=1)
            await a.publish(topic("agent-a"), wire.encode_result(result(at=now), SESSION, 3), qos=1)
        await until(lambda: received, what="agent-a's own result")
        await asyncio.sleep(0.3)
        stop.set()


@pytest.fixture
def tls_broker(tmp_path, monkeypatch):
    """mosquitto behind TLS only, with client certificates required: a CA of the test's own
    (trustme), the server's certificate for 127.0.0.1, and one client certificate."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("agent-a@regionshift.test")
    files = {
        "ca": tmp_path / "ca.pem",
        "server": tmp_path / "server.pem",
        "server-key": tmp_path / "server.key",
        "client": tmp_path / "client.pem",
        "client-key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["server"])
    server.private_key_pem.write_to_path(files["server-key"])
    client.cert_chain_pems[0].write_to_path(files["client"])
    client.private_key_pem.write_to_path(files["client-key"])
    monkeypatch.setenv("TEST_MQTT_CONTROLLER_PASSWORD", PASSWORDS[CONTROLLER_USER])
    monkeypatch.setenv("TEST_MQTT_A_PASSWORD", PASSWORDS["agent-a"])
    tls = BrokerTlsFiles(str(files["ca"]), str(files["server"]), str(files["server-key"]), require_certificate=True)
    with Broker(dict(PASSWORDS), tls=tls) as b:
        yield b, {k: str(v) for k, v in files.items()}


# paho leaves the socket of a failed TLS handshake to the garbage collector (it is freed at once,
# unclosed): a warning about the library, not a leak of the agent's.
@pytest.mark.filterwarnings("ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(90)
async def test_agents_and_the_controller_speak_tls_with_client_certificates_and_nothing_else(tls_broker, region):
    broker, files = tls_broker
    received: list[Result] = []
    tls = {"ca_file": files["ca"], "cert_file": files["client"], "key_file": files["client-key"]}
    intake, dropped, _ = make_intake(broker, sink=received.append, plans=plan_for(region), tls=tls)

    def agent(**changes) -> Agent:
        return agent_for(broker, **changes)

    plain = agent()  # no TLS at all: the broker never answers it (its connect times out in 10 s)
    untrusting = agent(cert_file=files["client"], key_file=files["client-key"])  # TLS, no CA: system roots
    no_certificate = agent(ca_file=files["ca"])  # trusts the broker, shows no certificate
    good = agent(ca_file=files["ca"], cert_file=files["client"], key_file=files["client-key"])
    stop_agents, stop_intake = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(intake.run(stop_intake))
        await until(lambda: intake.connected, what="the intake's TLS connection")
        for refused in (plain, untrusting, no_certificate):
            group.create_task(refused.run(stop_agents))
        await asyncio.sleep(2.0)  # each tried (and was refused) at least once
        group.create_task(good.run(stop_agents))
        await until(lambda: len(received) >= 10, what="results over TLS")
        stop_agents.set()
        await until(lambda: intake.agents["agent-a"].state == "offline", what="offline")
        stop_intake.set()
    assert {r.vantage for r in received} == {"agent-a"}
    assert {(a.stats.connects, a.stats.published) for a in (plain, untrusting, no_certificate)} == {(0, 0)}
    assert good.stats.connects == 1
    assert not dropped


async def test_a_wrong_password_over_tls_is_refused_too(tls_broker, monkeypatch):
    broker, files = tls_broker
    stop = asyncio.Event()
    tls = {"ca_file": files["ca"], "cert_file": files["client"], "key_file": files["client-key"]}
    agent = agent_for(broker, password_env="TEST_MQTT_WRONG_PASSWORD", **tls)
    monkeypatch.setenv("TEST_MQTT_WRONG_PASSWORD", "not-the-password")
    async with asyncio.TaskGroup() as group:
        group.create_task(agent.run(stop))
        await asyncio.sleep(1.5)
        stop.set()
    assert agent.stats.connects == 0
    assert "not authorised" in broker.log.lower() or "bad user name or password" in broker.log.lower(), broker.log


@pytest.mark.timeout(150)
async def test_a_broker_restart_loses_nothing_and_counts_nothing_twice(broker, region):
    received: list[Result] = []
    intake, dropped, _ = make_intake(broker, sink=received.append, plans=plan_for(region, interval=0.05))
    seqs = accepted_seqs(intake)
    agent = agent_for(broker)
    stop_intake, stop_agent = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(intake.run(stop_intake))
        group.create_task(agent.run(stop_agent))
        await until(lambda: len(received) >= 20, what="results before the restart")
        await asyncio.to_thread(broker.restart, 1.5)  # results made meanwhile wait in the agent
        before = len(received)
        # A connection the broker restart left half-open is noticed by keepalive (5 s): up to 40 s.
        await until(lambda: agent.stats.replayed > 0 and len(received) > before + 40, within=40, what="replay")
        stop_agent.set()
        await until(lambda: intake.agents["agent-a"].state == "offline", within=30, what="offline")
        stop_intake.set()
    assert agent.stats.connects >= 2
    assert len(seqs) == len(set(seqs)), "a result counted twice"
    # Every result the agent had the broker acknowledge arrived: 1..N, none missing.
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert len(seqs) >= agent.stats.published - agent.stats.replayed  # nothing acknowledged was lost
    assert sum(r.reason == "scheduled" for r in received) == len(received)
    late = intake.agents["agent-a"].late
    # Replayed, marked late, once: those still awaiting their acknowledgement when the agent
    # stopped (up to its window in flight) arrived without being counted as published.
    assert 0 < late <= agent.stats.replayed + agent.settings.inflight, (late, agent.stats, dropped)


def test_the_agent_command_checks_its_arguments_and_loads_none_of_the_controller():
    regionshift = str(Path(sys.executable).with_name("regionshift"))

    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "NOPE_NOT_SET"}
        command = [regionshift, "agent", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False, env=env)

    bad = agent("--vantage", "a/b", "--broker", "127.0.0.1:1883")
    assert bad.returncode == 2
    assert "--vantage 'a/b'" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = agent("--vantage", "a", "--broker", "127.0.0.1:1883", "--password-env", "NOPE_NOT_SET")
    assert missing.returncode == 2
    assert "$NOPE_NOT_SET is empty or not set" in missing.stderr
    huge = agent("--vantage", "a", "--broker", "127.0.0.1:1883", "--buffer", "50000000")
    assert huge.returncode == 2
    assert "--buffer 50000000: from 1 to 1,000,000 results" in huge.stderr, huge.stderr
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys; import controller.entry, probes.agent; "
                "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'boto3', 'controller')))"
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert loaded.stdout.strip() == "['controller', 'controller.entry']"


def test_the_agent_takes_the_global_log_options_and_logs_to_stderr():
    # `regionshift --log-format json agent ...` was "unrecognized arguments", and the agent's
    # lines went to stdout in another format than the controller's.
    regionshift = str(Path(sys.executable).with_name("regionshift"))
    agent = subprocess.Popen(
        [regionshift, "--log-format", "json", "agent", "--vantage", "a", "--broker", "127.0.0.1:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # it tries the broker (nothing listens on port 1) and says so
    finally:
        agent.terminate()
        out, err = agent.communicate(timeout=30)
    assert out == ""
    events = [json.loads(line) for line in err.splitlines()]
    assert events[0]["event"] == "broker unreachable"
    assert events[0]["level"] == "warning"
    assert events[-1]["event"] == "stopped"


async def test_three_agents_feed_the_daemon_a_shared_fault_blames_the_region_a_cut_agent_is_set_aside(broker, world):
    agents = ("agent-a", "agent-b", "agent-c")
    daemon, running_agents = daemon_with_agents(broker, world, agents)
    stop_agents = asyncio.Event()
    async with Running(daemon) as running, asyncio.TaskGroup() as group:
        for agent in running_agents:
            group.create_task(agent.run(stop_agents))
        for name in world:
            await running.status_becomes(name, "healthy", within=10)
        await until(lambda: all(daemon.windows.by_probe(r) for r in world), what="windows")
        seen = {v for w in daemon.windows.by_probe("eu-west-1").values() for v in w}
        assert seen == {"controller", *agents}

        # agent-c loses its network to every region (its broker link stays): its vantage is set
        # aside, named in the evidence, and no region is blamed meanwhile.
        with capture_logs() as logs:
            for region in world.values():
                region.set(cut_vantages=("agent-c",))
            await until(lambda: "agent-c" in daemon.judge.set_aside, within=20, what="agent-c set aside")
            await asyncio.sleep(0.2)  # the pass that set it aside has announced it
        (told,) = [e for e in logs if e["event"] == "vantage set aside"]
        assert (told["vantage"], told["log_level"]) == ("agent-c", "warning")
        assert "sees all 3 regions failing" in told["why"]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            blamed = {r: (v.status, v.reasons) for r, v in daemon.judge.verdicts.items() if v.status != "healthy"}
            assert not blamed, (blamed, daemon.judge.set_aside)
            await asyncio.sleep(0.05)
        assert "agent-c" in json.dumps(daemon.judge.verdicts["us-east-1"].evidence["set_aside"])
        for region in world.values():
            region.heal()
        await until(lambda: not daemon.judge.set_aside, within=10, what="agent-c back")

        # A fault every vantage sees: the region is blamed, on the word of every vantage.
        world["eu-west-1"].set(error_ratio=0.4)
        await running.status_becomes("eu-west-1", "degraded", within=10)
        # The first verdict may come from the controller's own results alone (the agents' lag a
        # loaded loop behind); while it holds, every agent's word joins it.
        await until(
            lambda: (
                all(v in json.dumps(daemon.judge.verdicts["eu-west-1"].evidence) for v in agents)
                and daemon.judge.verdicts["eu-west-1"].status == "degraded"
            ),
            within=20,
            what="every agent's results in the degraded verdict's evidence",
            explain=lambda: (
                daemon.judge.verdicts["eu-west-1"].status,
                {p: e.get("vantages") for p, e in daemon.judge.verdicts["eu-west-1"].evidence["threshold"].items()},
                {
                    vantage: round(time.time() - w.newest(1)[0][0], 2)
                    for (_, vantage), w in daemon.windows.region("eu-west-1").items()
                    if w.newest(1)
                },
            ),
        )
        # The judge's suspicion reached the agents too: each was asked to probe harder.
        assert daemon.intake is not None
        assert daemon.intake.hurries_sent > 0
        assert all(a.stats.hurries > 0 for a in running_agents), [a.stats for a in running_agents]
        world["eu-west-1"].heal()

        state = await (await running.http.get("/api/v1/state")).json()
        assert state["agents"]["connected"] is True
        assert {v: a["state"] for v, a in state["agents"]["vantages"].items()} == dict.fromkeys(agents, "online")
        metrics = await (await running.http.get("/metrics")).text()
        assert 'regionshift_agent_up{vantage="agent-b"} 1.0' in metrics
        assert 'regionshift_agent_messages_dropped_total{reason="duplicate",vantage="agent-a"}' in metrics
        assert (
            'regionshift_probe_results_total{outcome="timeout",probe="orders",region="us-east-1",vantage="agent-c"}'
            in metrics
        )
        for region in world.values():
            region.heal()
        stop_agents.set()


async def test_with_the_broker_gone_the_agents_stop_counting_and_with_every_path_gone_the_controller_is_blind(
    broker, world
):
    agents = ("agent-a", "agent-b")
    daemon, running_agents = daemon_with_agents(broker, world, agents)
    stop_agents = asyncio.Event()
    async with Running(daemon) as running, asyncio.TaskGroup() as group:
        for agent in running_agents:
            group.create_task(agent.run(stop_agents))
        await until(lambda: daemon.intake is not None and daemon.intake.agents["agent-b"].received > 20, what="agents")
        for name in world:
            await running.status_becomes(name, "healthy", within=10)

        # The broker goes away: the agents' vantages drop out of the evidence as their results go
        # stale; the controller's own still judges every region, and none is blamed.
        broker.stop()
        await until(lambda: daemon._agent_looks("agent-a")[0] is False, within=15, what="agents down")
        stale = daemon.config.policy.verdicts.stale_after
        await asyncio.sleep(stale + 0.5)
        for name in world:
            verdict = daemon.judge.verdicts[name]
            assert verdict.status == "healthy", (name, verdict.reasons)
            assert not any(a in json.dumps(verdict.evidence) for a in agents), verdict.evidence
        metrics = await (await running.http.get("/metrics")).text()
        assert 'regionshift_agent_up{vantage="agent-a"} 0.0' in metrics
        async with running.http.get("/healthz") as response:  # up, but short of its agents: not "ok"
            assert response.status == 200
            health = await response.json()
        assert health["status"] == "degraded", health
        assert health["agents"].startswith(f"not connected to the agents' broker {daemon.config.agents.broker}")
        state = await (await running.http.get("/api/v1/state")).json()
        said = f"AGENTS' BROKER NOT CONNECTED ({daemon.config.agents.broker})"
        assert said in text(state, daemon.url, time.time()).splitlines()[0]

        # The controller's own path to one region breaks while the agents are away: one vantage
        # is short of the quorum of two, so the region is unknown, never blamed (trial G: with
        # the broker stopped, a controller-only path fault evacuated a healthy region).
        first, cut = next(iter(world.items()))
        cut.set(cut_vantages=("controller",))
        seen = set()
        for _ in range(int(4 * stale / 0.1)):
            seen.add(daemon.judge.verdicts[first].status)
            await asyncio.sleep(0.1)
        assert seen - {"healthy"} == {"unknown"}, seen
        verdict = daemon.judge.verdicts[first]
        assert verdict.status == "unknown"
        assert verdict.reasons[0].startswith("only controller reports (agent-a, agent-b: no result in the last")
        assert verdict.reasons[0].endswith("2 vantages needed to hold a finding: not held, and not healthy either")
        cut.heal()
        await running.status_becomes(first, "healthy", within=15)

        # Then the controller's own path to every region goes too: every region fails alike at the
        # one vantage left, a shared cause held against none, so every region is unknown: what the
        # blind alert and the fail-static planners read (weights hold; guardrail 6).
        for region in world.values():
            region.set(cut_vantages=("controller",))
        await until(lambda: all(daemon.judge.verdicts[n].status == "unknown" for n in world), within=15, what="blind")
        metrics = await (await running.http.get("/metrics")).text()
        for name in world:
            assert f'regionshift_region_status{{region="{name}",status="unknown"}} 1.0' in metrics
        for region in world.values():
            region.heal()
        broker.start()
        stop_agents.set()


def test_the_deployed_acl_is_the_one_the_tests_run_mosquitto_with():
    shipped = (Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "regionshift.acl").read_text()
    assert shipped.split("\n", 1)[1] == ACL


def test_a_configuration_with_agents_is_checked_where_it_is_wrong(write, cli_env):
    base = (
        "regions:\n  - name: eu-west-1\n    probes:\n      - {name: home, kind: http, target: 'http://127.0.0.1:1/'}\n"
    )
    cases = {
        "agents:\n  broker: 'no-port'\n  vantages: [agent-a]\n": "agents.broker",
        "agents:\n  broker: '127.0.0.1:1883'\n  vantages: [controller]\n": "agents.vantages",
        # Plain names: no `.name` after the index.
        "agents:\n  broker: '127.0.0.1:1883'\n  vantages: [a, a]\n": "agents.vantages[1]: duplicate vantage 'a'",
        "agents:\n  broker: '127.0.0.1:1883'\n  vantages: [agent-a]\n  password: 'hunter2'\n": "agents.password",
    }
    for i, (agents, where) in enumerate(cases.items()):
        path = write(f"bad{i}.yaml", base + agents)
        done = subprocess.run(
            [REGIONSHIFT, "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            env=cli_env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert where in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert "hunter2" not in done.stderr


@pytest.mark.timeout(60)
async def test_a_far_broker_gets_many_results_in_flight_in_order_each_once(broker, region, monkeypatch):
    """A broker 200 ms away (a delayed link on loopback): the agent has up to `inflight` results
    awaiting their acknowledgements at once, never more; the controller takes them in the order
    they were made, none missing, none twice."""
    intake, _, received = make_intake(broker, plans=plan_for(region, interval=0.02))
    seqs = accepted_seqs(intake)
    waiting = most = 0
    publish = aiomqtt.Client.publish

    async def counted(self, topic, *args, **kwargs):
        nonlocal waiting, most
        if not topic.startswith(wire.RESULTS + "/"):
            return await publish(self, topic, *args, **kwargs)
        waiting += 1
        most = max(most, waiting)
        try:
            return await publish(self, topic, *args, **kwargs)
        finally:
            waiting -= 1

    monkeypatch.setattr(aiomqtt.Client, "publish", counted)
    stop_intake, stop_agent = asyncio.Event(), asyncio.Event()
    async with DelayedLink(broker.port, delay=0.1) as link:
        agent = agent_for(broker, port=link.port, inflight=5)
        async with asyncio.TaskGroup() as group:
            group.create_task(intake.run(stop_intake))
            group.create_task(agent.run(stop_agent))
            await until(lambda: len(received) >= 60, within=30, what="60 results over the far link")
            stop_agent.set()
            await until(lambda: intake.agents["agent-a"].state == "offline", within=20, what="offline")
            stop_intake.set()
    # One at a time, a 200 ms round trip would allow five results a second; the window was used.
    assert most == 5, most
    assert seqs == list(range(1, len(seqs) + 1)), "out of order, missing or twice"
    # Every acknowledged result arrived; at most the window's were on their way when it stopped.
    assert agent.stats.published <= len(seqs) <= agent.stats.published + 5
