"""Agents over MQTT: how fast the controller takes agents' results in, and what an agent costs.

Run:  make bench   (installs mosquitto and prometheus-blackbox-exporter if missing)
 or:  .venv/bin/python bench/mqtt_ingest.py [--results 60000] [--rounds 2] [--probe-seconds 15]
                                            [--probe-rate 400]

1. Ingest. A real mosquitto on a loopback port (password file, ACL, as deployed). `--results`
   valid result messages from three agent vantages are published (QoS 1) while the receiver is
   away; its persistent session holds them. Then the receiver connects and drains them:
   - anchor: a bare aiomqtt subscriber that only counts messages (no parsing);
   - regionshift: a real daemon (three simulated regions, three agents configured) whose intake
     validates each message, checks it for duplicates and skew, records it (windows, metrics)
     and whose judge then judges them: timed from the first result accepted until a judge pass
     after the last one.
   Printed: results per second for each, and regionshift / anchor (target: at least 0.8x). The
   results wait queued in the broker, so "queued to judged" is the controller's whole share of
   "published to judged"; the publishing agent's share is the agent's (part 2).
   Rounds alternate the two so that a noisy minute hurts both.

2. Probing. The same local HTTP target (a minimal server in its own process) probed at
   `--probe-rate` probes a second for `--probe-seconds`, a fresh connection each:
   - a real `regionshift agent` process, its plan from the broker (plan interval x probes =
     the rate), publishing every result over MQTT (QoS 1) to a subscriber that counts them;
   - blackbox_exporter, driven through its /probe endpoint at the same rate.
   - two floors (`bench/floor_prober.py`, a process of its own at the same rate): a bare asyncio
     prober, and the same with one aiomqtt QoS 1 publish per probe. No agent in CPython that
     probes over asyncio and publishes each result with aiomqtt at QoS 1 costs less than the
     second, nor takes less memory (it imports what such an agent must: asyncio, ssl, aiomqtt,
     pydantic).
   Only each prober's own CPU time (from /proc) is counted. Printed: probes per CPU-second and
   peak RSS of each, and the ratios (targets: at least 2.5x the probes per CPU-second, RSS at
   most 1.2x blackbox_exporter's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import aiomqtt
import probe_throughput as pt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.daemon import Daemon
from controller.demo.broker import CONTROLLER_USER, Broker
from controller.demo.world import SimulatedRegion
from controller.settings.policy import Policy
from controller.settings.schema import AgentsSettings, Config, ControllerSettings, Region
from probes import wire
from probes.results import Result
from probes.spec import HttpProbe

REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")
if TYPE_CHECKING:
    from collections.abc import Callable

PROBES = ("healthz", "orders")
VANTAGES = ("agent-a", "agent-b", "agent-c")
PASSWORDS = {name: secrets.token_urlsafe(12) for name in (CONTROLLER_USER, *VANTAGES)}


async def until(condition: Callable[[], bool], what: str, within: float = 120.0) -> None:
    """Poll every millisecond: the figures are read at the moment a count is reached."""
    deadline = time.perf_counter() + within
    while not condition():  # counters kept by the daemon: no event to wait on
        if time.perf_counter() > deadline:
            raise SystemExit(f"mqtt_ingest: {what} did not happen within {within:g}s (results dropped?)")
        await asyncio.sleep(0.001)


def cpu_and_rss(pid: int) -> tuple[float, float]:
    """A process's CPU seconds so far and its peak RSS (MiB), from /proc."""
    return pt._proc_cpu(pid), pt._proc_rss_mib(pid)  # noqa: SLF001 - the throughput bench's readings


# --- 1. ingest -----------------------------------------------------------------------------------


def messages(count: int) -> list[tuple[str, str, bytes]]:
    """(vantage, topic, payload) for `count` results, spread over vantages, regions and probes."""
    out = []
    now = time.time()
    sessions = {v: secrets.token_hex(8) for v in VANTAGES}
    for i in range(count):
        vantage = VANTAGES[i % len(VANTAGES)]
        region = REGIONS[(i // 3) % len(REGIONS)]
        probe = PROBES[(i // 9) % len(PROBES)]
        result = Result(region, probe, vantage, now - 1.0 + i * 1e-6, ok=True, latency=0.02, status=200)
        payload = wire.encode_result(result, sessions[vantage], i // len(VANTAGES) + 1)
        out.append((vantage, wire.result_topic(region, probe, vantage), payload))
    return out


async def publish(broker: Broker, batch: list[tuple[str, str, bytes]]) -> None:
    """Every message, QoS 1, each agent on its own connection (the ACL allows only its own topics)."""

    async def one_agent(vantage: str) -> None:
        mine = [(t, p) for v, t, p in batch if v == vantage]
        client = aiomqtt.Client(
            "127.0.0.1", broker.port, username=vantage, password=PASSWORDS[vantage], max_inflight_messages=200
        )
        client.pending_calls_threshold = 1_000  # 200 publishes in flight on purpose: no warning
        async with client:
            for start in range(0, len(mine), 200):
                await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in mine[start : start + 200]))

    await asyncio.gather(*(one_agent(v) for v in VANTAGES))


def controller_client(broker: Broker, client_id: str) -> aiomqtt.Client:
    """The controller's user on a persistent session: the broker queues results for it while away."""
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier=client_id,
        clean_session=False,
        username=CONTROLLER_USER,
        password=PASSWORDS[CONTROLLER_USER],
        max_queued_incoming_messages=0,
    )


async def subscribe_once(broker: Broker, client_id: str) -> None:
    """Open the persistent session (subscribed to every result) that will hold what is published."""
    async with controller_client(broker, client_id) as client:
        await client.subscribe(wire.RESULTS_FILTER, qos=1)
        await client.subscribe(wire.STATUS_FILTER, qos=1)


async def bare_drain(broker: Broker, count: int) -> float:
    """Seconds a bare aiomqtt subscriber takes to receive `count` queued messages."""
    client_id = f"bench-bare-{secrets.token_hex(4)}"
    await subscribe_once(broker, client_id)
    await publish(broker, messages(count))
    received = 0
    started = 0.0
    async with controller_client(broker, client_id) as client:
        async for message in client.messages:
            if message.topic.value.startswith(wire.RESULTS):
                received += 1
                if received == 1:
                    started = time.perf_counter()  # timed from the first result, as regionshift is
                if received == count:
                    break
    return time.perf_counter() - started


async def regionshift_drain(broker: Broker, count: int, state_dir: str) -> tuple[float, float]:
    """(seconds until every result was accepted, seconds until a judge pass after the last one),
    both from the first result accepted, for a real daemon's intake draining `count` results."""
    client_id = f"bench-regionshift-{secrets.token_hex(4)}"
    os.environ["BENCH_MQTT_PASSWORD"] = PASSWORDS[CONTROLLER_USER]
    agents = AgentsSettings.model_validate(
        {
            "broker": broker.address,
            "username": CONTROLLER_USER,
            "password": {"env": "BENCH_MQTT_PASSWORD"},
            "vantages": list(VANTAGES),
            "client_id": client_id,
        }
    )
    await subscribe_once(broker, client_id)
    await publish(broker, messages(count))
    async with contextlib_world() as regions:
        config = Config(
            controller=ControllerSettings(listen="127.0.0.1:0", state_path=f"{state_dir}/state.sqlite"),
            regions=[
                Region(
                    name=name,
                    probes=[
                        HttpProbe(name=p, target=regions[name].url + f"/{p}", interval=1.0, timeout=1.0) for p in PROBES
                    ],
                )
                for name in REGIONS
            ],
            policy=Policy(),
            agents=agents,
        )
        daemon = Daemon(config)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        await asyncio.wait_for(daemon.started.wait(), 30)
        intake = daemon.intake
        assert intake is not None  # noqa: S101 - configured above

        def accepted() -> int:
            return sum(a.received for a in intake.agents.values())

        await until(lambda: accepted() > 0, "the first result accepted")
        first = time.perf_counter()
        await until(lambda: accepted() >= count, f"all {count} results accepted")
        last, last_wall = time.perf_counter(), daemon.clock()
        await until(lambda: min(v.at for v in daemon.judge.verdicts.values()) >= last_wall, "a judge pass")
        judged = time.perf_counter()
        stop.set()
        await asyncio.wait_for(task, 30)
    return last - first, judged - first


class contextlib_world:  # noqa: N801 - reads as the context manager it is
    """The three simulated regions the daemon's own probes go to (they matter little here)."""

    async def __aenter__(self) -> dict[str, SimulatedRegion]:
        self.regions = {name: SimulatedRegion(name, seed=i) for i, name in enumerate(REGIONS)}
        for region in self.regions.values():
            await region.__aenter__()
        return self.regions

    async def __aexit__(self, *exc: object) -> None:
        for region in self.regions.values():
            await region.__aexit__(*exc)


def ingest(broker: Broker, count: int, rounds: int) -> None:
    bare_s, accepted_s, judged_s = [], [], []
    for n in range(1, rounds + 1):
        bare = asyncio.run(bare_drain(broker, count))
        with tempfile.TemporaryDirectory() as state_dir:
            accepted, judged = asyncio.run(regionshift_drain(broker, count, state_dir))
        bare_s.append(bare)
        accepted_s.append(accepted)
        judged_s.append(judged)
        print(
            f"round {n}: bare {count / bare:,.0f}/s, regionshift accepted {count / accepted:,.0f}/s, "
            f"judged {count / judged:,.0f}/s",
            file=sys.stderr,
        )
    total = count * rounds
    bare_rate, accepted_rate, judged_rate = (total / sum(s) for s in (bare_s, accepted_s, judged_s))
    print(f"\nIngest: {count:,} queued results x {rounds} rounds, mosquitto {broker_version()}, {os.cpu_count()} CPUs")
    print(f"{'receiver':<46} {'results/s':>10} {'vs anchor':>10}")
    print(f"{'bare aiomqtt subscriber (anchor: counts only)':<46} {bare_rate:>10,.0f} {1.0:>9.2f}x")
    print(f"{'regionshift intake, into the windows':<46} {accepted_rate:>10,.0f} {accepted_rate / bare_rate:>9.2f}x")
    print(f"{'regionshift, queued to judged':<46} {judged_rate:>10,.0f} {judged_rate / bare_rate:>9.2f}x")
    print(f"queued to judged / bare: {judged_rate / bare_rate:.2f}x (target for published to judged: at least 0.8x)")


def broker_version() -> str:
    proc = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True, check=False)
    first = (proc.stdout + proc.stderr).splitlines()[:1]
    return first[0].split("version")[-1].strip() if first else "?"


# --- 2. probing ----------------------------------------------------------------------------------


def agent_plan(target: str, rate: float) -> tuple[bytes, int, float]:
    """A plan probing `target` at `rate` a second: (encoded plan, probes, interval)."""
    probes = max(1, round(rate / 10))
    interval = probes / rate
    specs = [HttpProbe(name=f"p{i:03d}", target=target, interval=interval, timeout=interval) for i in range(probes)]
    # Newer than any plan a daemon of the ingest part left retained for agent-a (epoch milliseconds).
    version = int(time.time() * 1000)
    return wire.encode_plan(version, "agent-a", [("eu-west-1", s) for s in specs]), probes, interval


def run_agent(broker: Broker, target: str, rate: float, seconds: float) -> dict[str, float]:
    env = {**os.environ, "BENCH_AGENT_PASSWORD": PASSWORDS["agent-a"]}
    command = [sys.executable, "-m", "probes.agent", "--vantage", "agent-a", "--broker", broker.address]
    agent = subprocess.Popen(  # this interpreter, fixed arguments
        [*command, "--password-env", "BENCH_AGENT_PASSWORD"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    try:
        return asyncio.run(measure_agent(broker, agent.pid, target, rate, seconds))
    finally:
        agent.terminate()
        agent.wait(10)


async def measure_agent(broker: Broker, pid: int, target: str, rate: float, seconds: float) -> dict[str, float]:
    """Give the agent its plan, then count the results it publishes while its CPU is measured."""
    plan, _, _ = agent_plan(target, rate)
    counts = {"ok": 0, "failed": 0}
    measuring = False
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, username=CONTROLLER_USER, password=PASSWORDS[CONTROLLER_USER]
    ) as client:
        await client.subscribe(wire.RESULTS_FILTER, qos=1)
        await client.publish(wire.plan_topic("agent-a"), plan, qos=1, retain=True)

        async def count() -> None:
            async for message in client.messages:
                if measuring and isinstance(message.payload, bytes | bytearray):
                    counts["ok" if json.loads(message.payload)["ok"] else "failed"] += 1

        counting = asyncio.create_task(count())
        await asyncio.sleep(3.0)  # start-up, plan, first runs: not measured
        measuring = True
        (cpu0, _), wall0 = cpu_and_rss(pid), time.perf_counter()
        await asyncio.sleep(seconds)
        (cpu1, rss), wall = cpu_and_rss(pid), time.perf_counter() - wall0
        measuring = False
        counting.cancel()
        await asyncio.wait({counting})
    return {**counts, "cpu": cpu1 - cpu0, "wall": wall, "rss_mib": rss}


async def drive_blackbox_paced(pid: int, port: int, target: str, rate: float, seconds: float) -> dict[str, float]:
    """blackbox_exporter's /probe at `rate` a second (each probe at its own slot, as a schedule
    would run it; at most 256 in flight)."""
    url = f"http://127.0.0.1:{port}/probe"
    params = {"target": target, "module": "http_2xx"}
    counts = {"ok": 0, "failed": 0}
    slots = asyncio.Semaphore(256)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:

        async def one(measured: bool) -> None:  # noqa: FBT001
            async with slots, http.get(url, params=params) as response:
                body = await response.text()
            if measured:
                counts["ok" if "\nprobe_success 1" in body else "failed"] += 1

        async def run(duration: float, measured: bool) -> None:  # noqa: FBT001
            start = time.perf_counter()
            tasks = []
            for k in range(int(duration * rate)):
                await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
                tasks.append(asyncio.create_task(one(measured)))
            await asyncio.gather(*tasks)

        await run(3.0, measured=False)
        (cpu0, _), wall0 = cpu_and_rss(pid), time.perf_counter()
        await run(seconds, measured=True)
        (cpu1, rss), wall = cpu_and_rss(pid), time.perf_counter() - wall0
    return {**counts, "cpu": cpu1 - cpu0, "wall": wall, "rss_mib": rss}


def run_blackbox(target: str, rate: float, seconds: float, workdir: Path) -> dict[str, float]:
    config = workdir / "blackbox.yml"
    config.write_text(
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n"
    )
    port = pt._free_port()  # noqa: SLF001
    proc = subprocess.Popen(  # a fixed program
        [pt.BLACKBOX, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pt._wait_for_port(port)  # noqa: SLF001
        return asyncio.run(drive_blackbox_paced(proc.pid, port, target, rate, seconds))
    finally:
        proc.terminate()
        proc.wait(10)


def run_floor(broker: Broker, target: str, rate: float, seconds: float, *, publish: bool) -> dict[str, float]:
    """One floor prober in a process of its own, its CPU counted over `seconds` after 3 s of start-up."""
    command = [sys.executable, str(Path(__file__).with_name("floor_prober.py")), target, str(rate), str(seconds + 3.0)]
    env = {**os.environ, "BENCH_FLOOR_PUBLISH": f"{broker.port}:{PASSWORDS['agent-a']}" if publish else ""}
    child = subprocess.Popen(command, env=env)  # this interpreter, a file of this bench
    try:
        time.sleep(3.0)
        (cpu0, _), wall0 = cpu_and_rss(child.pid), time.perf_counter()
        time.sleep(seconds)
        (cpu1, rss), wall1 = cpu_and_rss(child.pid), time.perf_counter()
        if child.wait(30) != 0:
            raise SystemExit(f"mqtt_ingest: the floor prober exited with {child.returncode}")
    finally:
        if child.poll() is None:
            child.kill()
    # Every probe is counted as done: the floor prober exits non-zero when any did not complete.
    return {"ok": round(rate * (wall1 - wall0)), "failed": 0, "cpu": cpu1 - cpu0, "wall": wall1 - wall0, "rss_mib": rss}


def probing(broker: Broker, rate: float, seconds: float, rounds: int) -> None:
    if not Path(pt.BLACKBOX).exists():
        print("prometheus-blackbox-exporter is not installed: run `make bench` (it installs it)", file=sys.stderr)
        return
    blackbox = f"blackbox_exporter {pt.blackbox_version()}"
    with pt.local_target() as target, tempfile.TemporaryDirectory() as tmp:
        totals = pt.compare(
            rounds,
            {
                blackbox: lambda: run_blackbox(target, rate, seconds, Path(tmp)),
                "regionshift agent": lambda: run_agent(broker, target, rate, seconds),
                "floor: bare asyncio HTTP": lambda: run_floor(broker, target, rate, seconds, publish=False),
                "floor: + aiomqtt QoS 1 pub": lambda: run_floor(broker, target, rate, seconds, publish=True),
            },
        )
    _, probes, interval = agent_plan("http://127.0.0.1/", rate)
    print(
        f"\nProbing: HTTP, a fresh connection each, {rate:g}/s for {rounds} x {seconds:g}s per prober "
        f"(the agent: {probes} probes every {interval:g}s, each result published over MQTT)"
    )
    per_cpu = pt.print_table(totals)
    bb, agent = totals[blackbox], totals["regionshift agent"]
    print(f"agent / {blackbox}: {per_cpu:.2f}x probes per CPU-second (target: at least 2.5x)")
    for name in ("floor: bare asyncio HTTP", "floor: + aiomqtt QoS 1 pub"):
        floor = totals[name]
        print(
            f"{name} / {blackbox}: {per_cpu_second(floor) / per_cpu_second(bb):.2f}x probes per CPU-second, "
            f"{floor['rss_mib'] / bb['rss_mib']:.2f}x peak RSS"
        )
    print(f"agent / {blackbox}: {agent['rss_mib'] / bb['rss_mib']:.2f}x peak RSS (target: at most 1.2x)")


def per_cpu_second(m: dict[str, float]) -> float:
    return (m["ok"] + m["failed"]) / m["cpu"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=60_000, help="queued results each receiver drains")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probe-seconds", type=float, default=15.0)
    parser.add_argument("--probe-rate", type=float, default=400.0, help="probes a second for each prober")
    parser.add_argument("--only", choices=("ingest", "probing"))
    args = parser.parse_args()
    with Broker(dict(PASSWORDS)) as broker:
        if args.only in (None, "ingest"):
            ingest(broker, args.results, args.rounds)
        if args.only in (None, "probing"):
            probing(broker, args.probe_rate, args.probe_seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
