"""`regionshift demo --scenario launch`: a region launch played out on a local world.

Three simulated regions, a local Route 53 (moto's server) holding the weighted record, the
controller, three probe agents (separate `regionshift agent` processes, one per region, over a
real mosquitto: four vantages with the controller's own), and a population of clients that pick
a region the way Route 53 answers (share = weight / sum of weights) and send real requests to it.

First, one agent loses its network to every region: its vantage is set aside (named in the
verdicts' evidence) and no region is blamed. Then eu-west-1's replica falls behind (each region
has a simulated replication source publishing its lag to the local CloudWatch, read by a
CloudWatch lag probe): a ramp of eu-west-1 is started but holds at its start gate until the lag
recovers. Once it bakes at 10%, 40% of eu-west-1's API requests start failing while /healthz
stays 200; the ramp rolls back; the failure clears; the ramp resumes and completes. The timeline
shows the ramp step, the weights Route 53 holds, the traffic share each region actually served,
the verdicts and the agents. It exits 0 only when all of that happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, TextIO

import aiohttp
import boto3

from controller.acting.errors import Route53Error
from controller.acting.route53 import Actuator, make_client
from controller.daemon import Daemon
from controller.demo.agents import DemoAgents
from controller.demo.verdicts import BASE_LATENCY, DEMO_REGIONS, start_daemon, stop_after, time_scaled
from controller.demo.world import LocalRoute53, SimulatedRegion, SimulatedReplication, seed_weighted_group
from controller.events.kinds import ActionTaken
from controller.planning.weights import shares
from controller.settings.policy import (
    GuardrailPolicy,
    LagPolicy,
    Policy,
    RampPolicy,
    VerdictPolicy,
)
from controller.settings.schema import (
    AgentsSettings,
    Config,
    ControllerSettings,
    Member,
    RecordSet,
    Region,
    Route53Settings,
)
from probes.spec import CloudWatchLagProbe, HttpProbe

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from controller.events.bus import Subscription

RECORD = "api.demo.regionshift.internal"
RAMP = "launch-eu-west-1"
TARGET = "eu-west-1"
CLIENT_PATH = "/api/checkout"
CLIENT_RATE = 50.0  # requests per second, spread over the regions by weight
DEMO_KEY = "regionshift-demo"  # moto accepts any credentials
MEMBERS = (("use1", "us-east-1", 1), ("euw1", "eu-west-1", 0))  # set identifier, region, starting weight
# The record's TTL, scaled down from a production 60 s like every wait in the demo, never zero:
# each step bakes only after INSYNC + TTL, and the clients below cache an answer for the TTL.
TTL = 2
LAG_LIMIT = 5.0  # seconds of replica lag a region may have
LAG_SPIKE = 30.0  # how far eu-west-1's replica falls behind before the ramp
LAG_HOLD = 5.0  # seconds the started ramp is held by the lag before it recovers
# The verdict policy the project ships (policies/verdicts.yaml: the code's defaults), every wait
# in it scaled down tenfold like the rest of the demo, its statistics untouched; the lag limits are
# the demo's own (its replicas publish lag in seconds).
VERDICTS = time_scaled(VerdictPolicy(), 0.1).model_copy(
    update={
        "lag": LagPolicy(sources={"cloudwatch": LAG_LIMIT}, trend_over=3.0, crosses_within=5.0, min_trend_samples=3)
    }
)
LAUNCH = RampPolicy(
    record_set=RECORD,
    waves=[[TARGET]],
    steps=[1.0, 5.0, 10.0, 25.0, 50.0],
    bake=4.0,
    start_gate=3.0,
    on_failure="rollback",
    resume_after_rollback=True,
)
# One agent a region, each probing every region: four vantages with the controller.
AGENTS = tuple(f"agent-{name}" for name, *_ in DEMO_REGIONS)
CUT_AGENT = AGENTS[-1]  # the one that loses its network
CUT_SECONDS = 5.0  # how long the cut lasts once its vantage is set aside
AFTER_CUT = 3.0  # how long no region may be blamed once it counts again
INJECT_AT_STEP = 2  # 0-based: the failure starts while the 10% step bakes
FAILURE_SECONDS = 6.0
EVERY = 2.0


def launch_config(
    regions: dict[str, SimulatedRegion],
    listen: str,
    endpoint: str,
    zone_id: str,
    state_dir: str,
    agents: AgentsSettings | None = None,
) -> Config:
    def probes(name: str, region: SimulatedRegion) -> list[HttpProbe | CloudWatchLagProbe]:
        lag = CloudWatchLagProbe(
            name="replica-lag",
            metric="rds-replica",
            aws_region="us-east-1",
            dimensions={"DBInstanceIdentifier": SimulatedReplication.instance(name)},
            endpoint_url=endpoint,
            period=1.0,
            lookback=5.0,
            interval=0.5,
            timeout=0.4,
        )
        return [
            *(
                HttpProbe(name=n, target=region.url + p, interval=0.5, timeout=0.4)
                for n, p in (("healthz", "/healthz"), ("orders", "/api/orders"))
            ),
            lag,
        ]

    return Config(
        controller=ControllerSettings(
            listen=listen,
            tick=0.25,
            state_path=os.path.join(state_dir, "state.sqlite"),  # noqa: PTH118
            # 4 requests a second on the demo's time (it reconciles 40 times as often as the default).
            route53=Route53Settings(
                endpoint_url=endpoint, reconcile_every=0.25, poll_interval=0.1, max_requests_per_second=160
            ),
        ),
        regions=[
            Region(name=n, type=t, residency=r, max_share=m, probes=probes(n, regions[n]))
            for n, t, r, m in DEMO_REGIONS
        ],
        record_sets=[
            RecordSet(
                zone_id=zone_id,
                name=RECORD,
                ttl=TTL,
                members=[
                    Member(set_identifier=sid, region=region, value=f"192.0.2.{i + 10}", weight=w)
                    for i, (sid, region, w) in enumerate(MEMBERS)
                ],
            )
        ],
        policy=Policy(verdicts=VERDICTS, guardrails=GuardrailPolicy(max_step=25), ramps={RAMP: LAUNCH}),
        agents=agents,
    )


def create_zone(endpoint: str) -> str:
    """A hosted zone holding the weighted record at its starting weights, in the local Route 53."""
    client = make_client(endpoint, aws_access_key_id=DEMO_KEY, aws_secret_access_key=DEMO_KEY)
    zone = client.create_hosted_zone(Name="demo.regionshift.internal", CallerReference=uuid.uuid4().hex)
    zone_id = zone["HostedZone"]["Id"].split("/")[-1]
    members = [(sid, weight, f"192.0.2.{i + 10}") for i, (sid, _, weight) in enumerate(MEMBERS)]
    seed_weighted_group(client, zone_id, RECORD, members, ttl=TTL)
    return zone_id


class Clients:
    """Clients that resolve the record the way Route 53 answers and send real requests."""

    def __init__(self, regions: dict[str, SimulatedRegion], reader: Actuator, record_set: RecordSet) -> None:
        self.regions = regions
        self.reader = reader
        self.record_set = record_set
        self.region_of = {m.set_identifier: m.region for m in record_set.members}
        self.weights: dict[str, int] = {}
        self.sent = 0
        self.failed = 0
        self._rng = random.Random(1)  # noqa: S311 - simulated clients

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            refresh = 0.0
            while True:
                if time.monotonic() >= refresh:  # resolvers keep an answer for the record's TTL
                    observed = await self.reader.observed_weights(self.record_set)
                    self.weights = {k: v or 0 for k, v in observed.items()}
                    refresh = time.monotonic() + TTL
                if any(self.weights.values()):
                    sid = self._rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
                    asyncio.ensure_future(self._request(http, self.regions[self.region_of[sid]]))  # noqa: RUF006
                await asyncio.sleep(1 / CLIENT_RATE)

    async def _request(self, http: aiohttp.ClientSession, region: SimulatedRegion) -> None:
        self.sent += 1
        try:
            async with http.get(region.url + CLIENT_PATH) as response:
                self.failed += response.status >= 500  # noqa: PLR2004 - server errors
        except (aiohttp.ClientError, TimeoutError):
            self.failed += 1


class Story:
    """The timeline printer and the record of what happened, for the final check."""

    def __init__(self, daemon: Daemon, regions: dict[str, SimulatedRegion], clients: Clients, out: TextIO) -> None:
        self.daemon = daemon
        self.regions = regions
        self.clients = clients
        self.out = out
        self.start = time.monotonic()
        self.statuses: list[str] = []
        self.served: Counter[str] = Counter()
        self.last_share: dict[str, float] = {}
        self.actions: list[tuple[float, str]] = []  # (monotonic time, kind) of every Route 53 write
        self.lag_spike: list[float] = []  # when the lag spike started and when it was cleared
        # What the agent's cut showed: its vantage set aside, named in the evidence, regions blamed.
        self.cut_set_aside = False
        self.cut_named = False
        self.blamed_in_cut: list[str] = []

    def say(self, text: str) -> None:
        print(f"+{time.monotonic() - self.start:5.1f}s  {text}", file=self.out, flush=True)

    def ramp(self) -> tuple[str, int]:
        assert self.daemon.reconciler is not None  # noqa: S101 - the launch config has a record set
        state = self.daemon.reconciler.ramps[RAMP]
        if not self.statuses or self.statuses[-1] != state.status:
            self.statuses.append(state.status)
        return state.status, state.step

    async def follow(self, events: Subscription) -> None:
        async for event in events:
            if isinstance(event, ActionTaken):
                self.on_action(event)

    def on_action(self, action: ActionTaken) -> None:
        self.actions.append((time.monotonic(), action.action))
        share = shares(action.weights)
        weights = " ".join(f"{k}={v}" for k, v in action.weights.items())
        split = " ".join(f"{self.clients.region_of[k]} {v:.0f}%" for k, v in share.items())
        self.say(f"** route53 {action.action} ({action.outcome}): {weights} -> {split}; {action.reason}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EVERY)
            self.line()

    def line(self) -> None:
        status, step = self.ramp()
        now = Counter({name: r.served[CLIENT_PATH] for name, r in self.regions.items()})
        delta = now - self.served
        self.served = now
        total = sum(delta.values())
        self.last_share = {n: 100.0 * delta[n] / total for n in self.regions} if total else {}
        traffic = " ".join(f"{n} {self.last_share.get(n, 0):.0f}%" for n in self.regions if self.last_share.get(n))
        verdicts = self.daemon.judge.verdicts
        verdict = " ".join(f"{n}={verdicts[n].status if n in verdicts else '-'}" for n in self.regions)
        weights = " ".join(f"{k}={v}" for k, v in self.clients.weights.items())
        aside = self.daemon.judge.set_aside
        intake = self.daemon.intake
        online = sum(a.state == "online" for a in intake.agents.values()) if intake is not None else 0
        vantages = f"agents {online}/{len(AGENTS)} online" + (f", set aside: {', '.join(aside)}" if aside else "")
        at = f"step {step + 1}/{len(LAUNCH.steps)} ({LAUNCH.steps[step]:g}%)" if step >= 0 else "before step 1"
        # What the clients resolved (kept for the TTL, as resolvers keep it): it trails a write by
        # up to a TTL, so it is not called Route 53's (the `** route53` lines say what was written).
        traffic = f"traffic {traffic or '-':<36}"
        self.say(f"ramp {status:<11} {at:<17} resolved {weights:<15} {traffic} {verdict}  {vantages}")


async def wait_for(predicate: Callable[[], bool], story: Story) -> None:
    while not predicate():
        await asyncio.sleep(0.1)
        story.ramp()


async def script(
    daemon: Daemon,
    regions: dict[str, SimulatedRegion],
    replication: SimulatedReplication,
    story: Story,
    finished: asyncio.Event,
) -> None:
    assert daemon.reconciler is not None  # noqa: S101
    reconciler = daemon.reconciler
    await agent_cut(daemon, regions, story)
    story.say(f"** lag spike: {TARGET}'s replica falls {LAG_SPIKE:g}s behind (its limit is {LAG_LIMIT:g}s)")
    replication.lag[TARGET] = LAG_SPIKE
    story.lag_spike.append(time.monotonic())
    await wait_for(lambda: _status(daemon, TARGET) == "degraded", story)
    lag = [r for r in daemon.judge.verdicts[TARGET].reasons if "lag" in r]
    story.say(f"** verdict: {TARGET} degraded: {'; '.join(lag)}")
    story.say(f"** operator: start ramp {RAMP} ({', '.join(f'{s:g}%' for s in LAUNCH.steps)}, bake {LAUNCH.bake:g}s)")
    await reconciler.act(RAMP, "start", daemon.clock(), "demo operator")
    await asyncio.sleep(LAG_HOLD)
    story.say(f"** lag recovered: {TARGET}'s replica caught up")
    replication.lag[TARGET] = 0.2
    story.lag_spike.append(time.monotonic())
    await wait_for(lambda: story.ramp() == ("baking", INJECT_AT_STEP), story)
    story.say(f"** fault: {TARGET} fails 40% of API requests, /healthz stays 200")
    regions[TARGET].set(error_ratio=0.4)
    await wait_for(lambda: story.ramp()[0] == "rolled_back", story)
    await asyncio.sleep(FAILURE_SECONDS)
    story.say(f"** fault cleared on {TARGET}")
    regions[TARGET].heal()
    await wait_for(lambda: story.ramp()[0] == "done", story)
    finished.set()


async def agent_cut(daemon: Daemon, regions: dict[str, SimulatedRegion], story: Story) -> None:
    """One agent loses its network to every region: its vantage is set aside, and no region is blamed."""

    def every_vantage_reports() -> bool:
        return all(
            {"controller", *AGENTS} <= {v for w in daemon.windows.by_probe(r).values() for v in w} for r in regions
        )

    await wait_for(lambda: every_vantage_reports() and all(_status(daemon, r) == "healthy" for r in regions), story)
    story.say(f"** agents: {', '.join(AGENTS)} report on every region, beside the controller")
    story.say(f"** network: {CUT_AGENT} loses its path to every region (its link to the broker stays)")

    async def watch() -> None:  # from the cut until its vantage has counted again a while
        while True:
            for name, verdict in daemon.judge.verdicts.items():
                if verdict.status != "healthy" and name not in story.blamed_in_cut:
                    story.blamed_in_cut.append(name)
                    story.say(
                        f"** verdict: {name} {verdict.status} while {CUT_AGENT} was cut: {'; '.join(verdict.reasons)}"
                    )
                if CUT_AGENT in str(verdict.evidence.get("set_aside", {})):
                    story.cut_named = True
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        for region in regions.values():
            region.set(cut_vantages=(CUT_AGENT,))
        await wait_for(lambda: CUT_AGENT in daemon.judge.set_aside, story)
        story.cut_set_aside = True
        story.say(f"** verdicts: {CUT_AGENT} set aside ({daemon.judge.set_aside[CUT_AGENT]}); no region blamed for it")
        await asyncio.sleep(CUT_SECONDS)
        for region in regions.values():
            region.set(cut_vantages=())
        await wait_for(lambda: CUT_AGENT not in daemon.judge.set_aside, story)
        # Its failures from the cut are still in its windows: the quorum keeps them from blaming.
        await asyncio.sleep(AFTER_CUT)
    finally:
        watcher.cancel()
        await asyncio.wait({watcher})
    story.say(f"** network: {CUT_AGENT} reaches the regions again; its vantage counts again")


def _status(daemon: Daemon, region: str) -> str | None:
    verdict = daemon.judge.verdicts.get(region)
    return verdict.status if verdict is not None else None


def check(story: Story, finished: bool, final: dict[str, int]) -> list[str]:  # noqa: FBT001
    problems = []
    if not story.cut_set_aside:
        problems.append(f"{CUT_AGENT} was never set aside while its network was cut")
    elif not story.cut_named:
        problems.append(f"the verdicts' evidence never named {CUT_AGENT} as set aside")
    if story.blamed_in_cut:
        problems.append(f"{', '.join(story.blamed_in_cut)} blamed while {CUT_AGENT} alone had lost its network")
    if len(story.lag_spike) == 2:  # noqa: PLR2004 - started and cleared
        start, end = story.lag_spike
        during = [kind for at, kind in story.actions if start <= at <= end and kind == "forward"]
        if during:
            problems.append(f"the ramp stepped forward {len(during)} time(s) while {TARGET}'s replica lagged")
    else:
        problems.append("the lag spike did not play out")
    statuses = story.statuses
    if "rolled_back" not in statuses:
        problems.append(f"the ramp never rolled back (statuses: {statuses})")
    elif "baking" not in statuses[statuses.index("rolled_back") :]:
        problems.append(f"the ramp did not resume after the rollback (statuses: {statuses})")
    if not finished or statuses[-1:] != ["done"]:
        problems.append(f"the ramp did not complete (statuses: {statuses})")
    if final != {"use1": 1, "euw1": 1}:
        problems.append(f"Route 53 ends at {final}, not 50/50")
    return problems


# The longest the story may take: it played out in about 100 s here (the agents' act ~15 s of it).
# A bounded demo ends as soon as the story has, so this is a deadline it needs, not a wait.
STORY_SECONDS = 150.0


async def run_launch(stop: asyncio.Event, duration: float | None, listen: str, out: TextIO = sys.stdout) -> int:
    async with contextlib.AsyncExitStack() as stack:
        regions = {
            name: await stack.enter_async_context(SimulatedRegion(name, seed=i, base_latency=BASE_LATENCY[name]))
            for i, (name, *_) in enumerate(DEMO_REGIONS)
        }
        route53 = await stack.enter_async_context(LocalRoute53())
        zone_id = await asyncio.to_thread(create_zone, route53.url)
        cloudwatch = boto3.client(
            "cloudwatch",
            region_name="us-east-1",
            endpoint_url=route53.url,
            aws_access_key_id=DEMO_KEY,
            aws_secret_access_key=DEMO_KEY,
        )
        replication = SimulatedReplication(cloudwatch, regions)
        await asyncio.to_thread(replication.publish)  # the lag probes find data from the start
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="regionshift-demo-"))
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(key, DEMO_KEY)  # the daemon uses the usual credential chain
        agents = stack.enter_context(DemoAgents(AGENTS))
        config = launch_config(regions, listen, route53.url, zone_id, state_dir, agents.settings())
        agents.start_agents()
        daemon = Daemon(config)
        events = daemon.bus.subscribe()
        reader = Actuator(make_client(route53.url, aws_access_key_id=DEMO_KEY, aws_secret_access_key=DEMO_KEY))
        clients = Clients(regions, reader, config.record_sets[0])
        finished = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            if not await start_daemon(group, daemon, stop):
                return 1
            story = Story(daemon, regions, clients, out)
            url = daemon.url
            print(
                f"regionshift demo (launch): live page at {url}/  (state: {url}/api/v1/state, metrics: {url}/metrics)",
                file=out,
            )
            print(f"  local Route 53 (moto) at {route53.url}, zone {zone_id}, record {RECORD}", file=out)
            print(f"  replication: each region's replica lag published to CloudWatch at {route53.url}", file=out)
            for name, region in regions.items():
                print(f"  region {name:<15} {region.url}", file=out)
            print(
                f"  agents: {', '.join(AGENTS)}, each its own process, over mosquitto at {agents.broker.address} "
                f"(password file, ACL); their logs in {agents.logs}",
                file=out,
            )
            print(
                f"  clients: {CLIENT_RATE:g} requests/s to {CLIENT_PATH}, spread by the weights Route 53 holds",
                file=out,
                flush=True,
            )
            helpers = [
                group.create_task(clients.run(), name="clients"),
                group.create_task(story.run(), name="timeline"),
                group.create_task(story.follow(events), name="events"),
                group.create_task(replication.run(), name="replication"),
                group.create_task(script(daemon, regions, replication, story, finished), name="script"),
            ]
            if duration is not None:  # a bounded run ends when the story does, or at the deadline
                helpers.append(group.create_task(stop_after(stop, duration), name="duration"))
                helpers.append(group.create_task(_stop_when(finished, stop), name="end of story"))
            started = time.monotonic()
            await stop.wait()
            for task in helpers:
                task.cancel()
        # Stopped (Ctrl-C, SIGTERM) before the story played out: as the verdicts demo, said and
        # not checked. It printed "FAILED" for every act it had not reached, and exit 1.
        interrupted = not finished.is_set() and (duration is None or time.monotonic() - started < duration)
        final: dict[str, int] = {}
        if not interrupted:
            try:
                final = {k: v or 0 for k, v in (await reader.observed_weights(config.record_sets[0])).items()}
            except Route53Error as exc:  # the local Route 53 gone under it: a failed check, not a crash
                print(f"demo: the final weights could not be read from the local Route 53: {exc}", file=out)
    return _outcome(story, final, finished=finished.is_set(), interrupted=interrupted, logs=agents.logs, out=out)


def _outcome(
    story: Story,
    final: dict[str, int],
    *,
    finished: bool,
    interrupted: bool,
    logs: Path,
    out: TextIO,
) -> int:
    """What the demo says at its end, and its exit code."""
    if interrupted:
        print(f"demo stopped; the story needs about {STORY_SECONDS:g}s to play out, so it was not checked", file=out)
        shutil.rmtree(logs, ignore_errors=True)
        return 0
    problems = check(story, finished, final)
    for problem in problems:
        print(f"demo: FAILED: {problem}", file=out)
    if not problems:
        print(
            "demo: the launch played out: cut agent set aside, no region blamed -> lag spike holds the ramp -> "
            "lag recovers -> ramp -> partial failure -> rollback -> recovery -> resumed -> 50% done",
            file=out,
        )
        shutil.rmtree(logs, ignore_errors=True)  # kept for a look only when something went wrong
    else:
        print(f"demo: the agents' logs are in {logs}", file=out)
    return 1 if problems else 0


async def _stop_when(finished: asyncio.Event, stop: asyncio.Event) -> None:
    await finished.wait()
    await asyncio.sleep(3 * EVERY + 0.1)  # three timeline periods of traffic at 50%
    stop.set()
