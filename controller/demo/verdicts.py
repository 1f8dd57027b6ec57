"""`regionshift demo --scenario verdicts`: three simulated regions, the controller watching them,
a scripted fault. (The default scenario, a region launch, is in `controller.demo.launch`.)

The demo starts its own local world on loopback, configures the controller for it, prints the
API address and a live timeline of verdicts while a script injects a partial failure (40% of
API requests fail while `/healthz` stays 200) into one region and cuts another off entirely.
With `--duration` it stops by itself and exits 0 only when the verdicts followed the script.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from controller.daemon import Daemon
from controller.demo.world import API_PATHS, SimulatedRegion
from controller.events.kinds import VerdictChanged
from controller.judging.error_rate import OVER_AFTER
from controller.settings.policy import Policy, VerdictPolicy
from controller.settings.schema import Config, ControllerSettings, Region, RegionType
from probes.spec import HttpProbe

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from controller.events.bus import Subscription
    from controller.judging.verdicts import Status

# name, type, residency, max_share
DEMO_REGIONS: tuple[tuple[str, RegionType, str, float], ...] = (
    ("us-east-1", "full", "US", 100.0),
    ("eu-west-1", "full", "EU", 100.0),
    ("ap-southeast-2", "lightweight", "AU", 20.0),
)


def time_scaled(policy: VerdictPolicy, factor: float) -> VerdictPolicy:
    """`policy` with every duration it waits for multiplied by `factor` (windows, staleness,
    hysteresis, the patient error test's horizon, the slowdown baseline, the lag trend's spans,
    suspicion after a failure) and nothing else: its statistics (error ratios, false-alarm rates,
    peer significance, the slowdown's effect size) stay as shipped. A demo runs production's
    policy in minutes."""
    errors = [t.model_copy(update={"horizon": t.horizon * factor}) if t.horizon else t for t in policy.errors]
    return policy.model_copy(
        update={
            "window": policy.window * factor,
            "stale_after": policy.stale_after * factor,
            "recover_after": policy.recover_after * factor,
            "errors": errors,
            "slowdown": policy.slowdown.model_copy(update={"baseline": policy.slowdown.baseline * factor}),
            "lag": policy.lag.model_copy(
                update={
                    "trend_over": policy.lag.trend_over * factor,
                    "crosses_within": policy.lag.crosses_within * factor,
                }
            ),
            "suspicion": policy.suspicion.model_copy(update={"after_failure": policy.suspicion.after_failure * factor}),
        }
    )


# The verdict policy the project ships, its waits scaled down tenfold, its statistics untouched.
DEMO_POLICY = time_scaled(VerdictPolicy(), 0.1)
# Each region's distance, as its answers take (see SimulatedRegion.base_latency).
BASE_LATENCY = {"us-east-1": 0.02, "eu-west-1": 0.05, "ap-southeast-2": 0.09}
TIMELINE_EVERY = 3.0


@dataclass(frozen=True)
class Step:
    at: float
    region: str
    say: str
    act: Callable[[SimulatedRegion], Coroutine[None, None, None]]
    expect: Status  # the verdict this step must lead to before the next step


async def _partial(region: SimulatedRegion) -> None:
    region.set(error_ratio=0.4, error_paths=("/api/",), healthz_ok=True)


async def _heal(region: SimulatedRegion) -> None:
    region.heal()
    await region.accept()


async def _cut_off(region: SimulatedRegion) -> None:
    await region.refuse()


SCRIPT = (
    Step(8.0, "eu-west-1", "40% of API requests fail, /healthz stays 200", _partial, "degraded"),
    Step(18.0, "eu-west-1", "fault cleared", _heal, "healthy"),
    Step(20.0, "ap-southeast-2", "refuses every connection", _cut_off, "unhealthy"),
    Step(26.0, "ap-southeast-2", "accepts connections again", _heal, "healthy"),
)
PROBE_INTERVAL = 0.5
# The last step's recovery: a fault is over once its last `OVER_AFTER` results lean healthy, and
# the verdict turns healthy `recover_after` later.
SCRIPT_LENGTH = SCRIPT[-1].at + OVER_AFTER * PROBE_INTERVAL + DEMO_POLICY.recover_after + 3.0


def demo_config(regions: dict[str, SimulatedRegion], listen: str) -> Config:
    def probes(region: SimulatedRegion) -> list[HttpProbe]:
        paths = [("healthz", "/healthz"), *((p.rsplit("/", 1)[-1], p) for p in API_PATHS)]
        return [HttpProbe(name=n, target=region.url + p, interval=PROBE_INTERVAL, timeout=0.4) for n, p in paths]

    return Config(
        controller=ControllerSettings(listen=listen, tick=0.5),
        regions=[
            Region(name=n, type=t, residency=res, max_share=share, probes=probes(regions[n]))
            for n, t, res, share in DEMO_REGIONS
        ],
        policy=Policy(verdicts=DEMO_POLICY),
    )


class Timeline:
    """Prints the verdicts: a full line every few seconds and one for every change."""

    def __init__(self, daemon: Daemon, out: TextIO, start: float) -> None:
        self.daemon = daemon
        self.out = out
        self.start = start
        self.seen: dict[str, list[Status]] = {name: [] for name, *_ in DEMO_REGIONS}

    def _t(self) -> str:
        return f"+{self.daemon.clock() - self.start:5.1f}s"

    def say(self, text: str) -> None:
        print(f"{self._t()}  {text}", file=self.out, flush=True)

    def on_verdict(self, event: VerdictChanged) -> None:
        self.seen[event.region].append(event.status)  # type: ignore[arg-type]
        why = f"  ({'; '.join(event.reasons)})" if event.reasons else ""
        self.say(f"{event.region}: {event.previous or 'start'} -> {event.status.upper()}{why}")

    async def follow(self, events: Subscription) -> None:
        async for event in events:
            if isinstance(event, VerdictChanged):
                self.on_verdict(event)

    def summary(self) -> str:
        verdicts = self.daemon.judge.verdicts
        return "   ".join(f"{n} {verdicts[n].status if n in verdicts else '-':<9}" for n, *_ in DEMO_REGIONS)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TIMELINE_EVERY)
            self.say(self.summary())


def check_script(seen: dict[str, list[Status]], final: dict[str, Status]) -> list[str]:
    """What went wrong, if anything: each step's status must have followed, in order."""
    problems = []
    for region, history in seen.items():
        wanted = [s.expect for s in SCRIPT if s.region == region]
        position = 0
        for status in history:
            if position < len(wanted) and status == wanted[position]:
                position += 1
        if position < len(wanted):
            problems.append(f"{region}: expected verdicts {wanted} in order, saw {history}")
        if final.get(region) != "healthy":
            problems.append(f"{region}: expected healthy at the end, is {final.get(region)}")
    return problems


async def run_demo(stop: asyncio.Event, duration: float | None, listen: str, out: TextIO = sys.stdout) -> int:
    async with contextlib.AsyncExitStack() as stack:
        regions = {
            name: await stack.enter_async_context(SimulatedRegion(name, seed=i, base_latency=BASE_LATENCY[name]))
            for i, (name, *_) in enumerate(DEMO_REGIONS)
        }
        daemon = Daemon(demo_config(regions, listen))
        events = daemon.bus.subscribe()
        async with asyncio.TaskGroup() as group:
            if not await start_daemon(group, daemon, stop):
                return 1
            timeline = Timeline(daemon, out, daemon.clock())
            url = daemon.url
            print(
                f"regionshift demo: live page at {url}/  (state: {url}/api/v1/state, metrics: {url}/metrics)", file=out
            )
            for name, region in regions.items():
                print(
                    f"  region {name:<15} {region.url}  (POST {region.url}/_world/behaviour to break it yourself)",
                    file=out,
                )
            print(f"  script: {'; '.join(f'+{s.at:g}s {s.region} {s.say}' for s in SCRIPT)}", file=out, flush=True)
            helpers = [
                group.create_task(timeline.run(), name="timeline"),
                group.create_task(timeline.follow(events), name="events"),
                group.create_task(_play(SCRIPT, regions, timeline), name="script"),
            ]
            if duration is not None:
                helpers.append(group.create_task(stop_after(stop, duration), name="duration"))
            await stop.wait()
            for task in helpers:
                task.cancel()
        final = {n: v.status for n, v in daemon.judge.verdicts.items()}
    if duration is None or duration < SCRIPT_LENGTH:
        print(f"demo stopped; the script needs {SCRIPT_LENGTH:g}s to play out, so it was not checked", file=out)
        return 0
    problems = check_script(timeline.seen, final)
    for problem in problems:
        print(f"demo: FAILED: {problem}", file=out)
    if not problems:
        print(
            "demo: the verdicts followed the script: partial failure -> degraded, cut off -> unhealthy, both recovered",
            file=out,
        )
    return 1 if problems else 0


async def _play(script: tuple[Step, ...], regions: dict[str, SimulatedRegion], timeline: Timeline) -> None:
    for step in script:
        await asyncio.sleep(max(0.0, timeline.start + step.at - timeline.daemon.clock()))
        timeline.say(f"** script: {step.region} {step.say}")
        await step.act(regions[step.region])


async def stop_after(stop: asyncio.Event, seconds: float) -> None:
    await asyncio.sleep(seconds)
    stop.set()


async def start_daemon(group: asyncio.TaskGroup, daemon: Daemon, stop: asyncio.Event) -> bool:
    """Run the daemon in `group`; False when it failed to start (the group then re-raises why)."""
    daemon_task = group.create_task(daemon.run(stop), name="daemon")
    started = group.create_task(daemon.started.wait())
    await asyncio.wait([daemon_task, started], return_when=asyncio.FIRST_COMPLETED)
    if daemon_task.done():
        started.cancel()
        return False
    return True
