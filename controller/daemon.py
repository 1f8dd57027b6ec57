"""The daemon: probes every region on schedule, judges each one, and serves what it sees.

Every long-lived part runs under one `asyncio.TaskGroup` inside the API server's context, so a
crash in any part stops the whole daemon loudly and a stop request (SIGTERM, SIGINT) shuts it
down in order: probes stop, the last verdicts stay readable until the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from controller.acting.reconciler import Reconciler
from controller.acting.route53 import READ_TIMEOUT, Actuator, make_client
from controller.events.bus import Bus
from controller.events.kinds import VerdictChanged
from controller.intake import DROP_REASONS, Intake
from controller.judging.baselines import Baselines
from controller.judging.detectors import detectors_for
from controller.judging.lag import LagDetector
from controller.judging.suspicion import Suspicion, hold, judge_delay, suspect_steps, wakes_judge
from controller.judging.verdicts import Judge, finish_async
from controller.judging.windows import WindowStore
from controller.sinks.prometheus import Metrics
from controller.state.database import StateError
from controller.state.holder import this_process
from controller.state.store import Store
from controller.web.api import ApiServer, make_app
from probes.scheduler import Scheduler, make_prober
from probes.wire import encode_plan

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from controller.judging.verdicts import Transition, Verdict
    from controller.settings.schema import Config
    from probes.results import Result

log = structlog.get_logger("regionshift.daemon")
# A failing probe is logged as recovered after this many passes in a row, so a probe that
# fails every other run logs once, not on every result.
RECOVERED_AFTER = 3
# How often the latency baselines are saved to the state store.
BASELINES_EVERY = 60.0
VERDICT_LOG = 2000  # verdict changes kept for the live page's chart (an hour's, and then some)
# How long a stop waits for a Route 53 request still in flight before it leaves the writer lease
# to expire: a read's own timeout, and then some. A stop can take this long.
STOP_WAITS_FOR_ROUTE53 = READ_TIMEOUT + 10


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        settings = config.controller
        self.vantage = settings.vantage
        verdict_policy = config.policy.verdicts
        self.windows = WindowStore(verdict_policy.history)
        # Lag probes are judged by the lag detector alone: their latency is a lag, their limits
        # are the lag policy's, not the latency objective's.
        self.lag_sources = {
            (r.name, p.name): p.source for r in config.regions for p in r.probes if p.kind == "replication-lag"
        }
        lag_probes: dict[str, dict[str, str]] = {}
        for (region, probe), source in self.lag_sources.items():
            lag_probes.setdefault(region, {})[probe] = source
            self.metrics.set_lag_limit(region, source, verdict_policy.lag.limit(region, source))
        self.baselines = Baselines(verdict_policy)
        self.judge = Judge(
            [
                *detectors_for(verdict_policy, self.baselines),
                LagDetector(verdict_policy, lag_probes, {r.name: r.type for r in config.regions}),
            ],
            {
                r.name: tuple(p.name for p in r.probes if (r.name, p.name) not in self.lag_sources)
                for r in config.regions
            },
            verdict_policy,
            # With agents, a finding needs its quorum of these, not of whichever still report.
            (config.controller.vantage, *config.agents.vantages) if config.agents is not None else None,
        )
        # Agents (over MQTT) feed the same windows; each gets a plan of every region's probes.
        self.intake: Intake | None = None
        agent_targets: list[tuple[str, str]] = []  # (region, probe) the agents probe
        agents = config.agents
        if agents is not None:
            version = int(clock() * 1000)  # grows from one start of the daemon to the next
            # Replication lag is the data's, not the path's: read from anywhere it is the same, so
            # the controller alone measures it and agents need no database or cloud clients.
            planned = [(r.name, spec) for r in config.regions for spec in r.probes if spec.kind != "replication-lag"]
            agent_targets = [(region, spec.name) for region, spec in planned]
            self.intake = Intake(
                agents,
                agent_targets,
                self.record,
                dropped=self.metrics.drop,
                plans={v: encode_plan(version, v, planned) for v in agents.vantages},
                clock=clock,
            )
            self.metrics.watch_agents(agents.vantages, DROP_REASONS, self._agent_looks)
        probers = [make_prober(spec, r.name, self.vantage) for r in config.regions for spec in r.probes]
        self.scheduler = Scheduler(
            probers, self.record, max_concurrency=settings.max_concurrency, jitter=settings.jitter
        )
        self.metrics.precreate(
            (
                *((r.name, p.name, self.vantage) for r in config.regions for p in r.probes),
                *((region, name, v) for v in (agents.vantages if agents else ()) for region, name in agent_targets),
            ),
            (r.name for r in config.regions),
        )
        # Every change (verdicts, actions, ramps, drift, the lease, operators) is published once;
        # the API, the metrics and the demo's timeline subscribe.
        self.bus = Bus()
        # The verdict changes of the last hour at least (the live page charts them).
        self.verdict_log: deque[VerdictChanged] = deque(maxlen=VERDICT_LOG)
        self._aside: dict[str, str] = {}  # the vantages set aside as of the last pass, and why
        self.started = asyncio.Event()
        self.started_at = clock()  # when this daemon began (the live page's chart starts no earlier)
        self.url: str | None = None
        self._passes_since_failure: dict[tuple[str, str, str], int] = {}  # only for failing probes
        self._suspects: set[tuple[str, str]] = set()
        # Set by a failed result while suspicion is on: the judge looks at once (after its
        # minimum gap, `suspicion.judge_every`) instead of at its next tick.
        self._judge_wake = asyncio.Event()
        self._judge_behind = False  # the last judge pass took longer than the tick (logged once)
        self._tasks: list[asyncio.Task[None]] = []
        self.reconciler: Reconciler | None = None
        # Set on every verdict change: the reconciler looks at once instead of at its next tick.
        self._wake = asyncio.Event()
        self.metrics.precreate_shifting(config.policy, config.record_sets)
        self._metric_events = self.bus.subscribe()

    # --- the flow: results -> windows -> verdicts ------------------------------------------

    def record(self, result: Result) -> None:
        """Sink for every probe result, from the scheduler or (later) from agents."""
        self.windows.add(result)
        self.metrics.observe(result)
        if (source := self.lag_sources.get((result.region, result.probe))) is not None:
            self.metrics.set_lag(result.region, source, result)
        key = (result.region, result.probe, result.vantage)
        failing = self._passes_since_failure
        if not result.ok:
            if self.config.policy.verdicts.suspicion.enabled and wakes_judge(
                result, self.judge.verdicts, self.judge.set_aside
            ):
                self._judge_wake.set()
            if key not in failing:
                log.info(
                    "probe failing",
                    region=result.region,
                    probe=result.probe,
                    vantage=result.vantage,
                    error_class=result.error_class,
                    error=result.error,
                )
            failing[key] = 0
        elif key in failing:
            failing[key] += 1
            if failing[key] >= RECOVERED_AFTER:
                del failing[key]
                log.info(
                    "probe recovered",
                    region=result.region,
                    probe=result.probe,
                    vantage=result.vantage,
                    passes=RECOVERED_AFTER,
                )

    def tick(self) -> list[Transition]:
        """Recompute every verdict now; log, count and announce the ones that changed."""
        now = self.clock()
        self.windows.trim(now)
        return self._announce(self.judge.judge(self.windows, now), now)

    async def tick_async(self) -> list[Transition]:
        """`tick`, letting the event loop run between its steps (probes in flight are timed truly:
        see `finish_async`)."""
        now = self.clock()
        await finish_async(self.windows.trim_steps(now))
        return self._announce(await finish_async(self.judge.steps(self.windows, now)), now)

    def _announce(self, transitions: list[Transition], now: float) -> list[Transition]:
        for region, verdict in self.judge.verdicts.items():  # every pass: troubles move without a transition
            self.metrics.set_troubles(region, len(verdict.troubles))
        aside = dict(self.judge.set_aside)  # said as it changes (only the verdicts' evidence named it)
        for vantage in sorted(aside.keys() - self._aside.keys()):
            log.warning("vantage set aside", vantage=vantage, why=aside[vantage])
        for vantage in sorted(self._aside.keys() - aside.keys()):
            log.info("vantage counts again", vantage=vantage)
        self._aside = aside
        for t in transitions:
            v = t.verdict
            self.metrics.set_status(t.region, v.status)
            self.verdict_log.append(
                self.bus.publish(
                    VerdictChanged(at=now, region=t.region, previous=t.previous, status=v.status, reasons=v.reasons)
                )
            )
            log.info("verdict changed", region=t.region, previous=t.previous, status=v.status, reasons=list(v.reasons))
        if transitions:
            self._wake.set()
        return transitions

    async def _reconcile_loop(self, reconciler: Reconciler) -> None:
        every = self.config.controller.route53.reconcile_every
        while True:
            self._wake.clear()  # a verdict changing during the tick wakes the next one at once
            await reconciler.tick(self.judge.verdicts, self.clock())
            self.metrics.export(self.config.record_sets, reconciler)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._wake.wait()

    async def _judge_loop(self) -> None:
        tick = self.config.controller.tick
        policy = self.config.policy.verdicts.suspicion
        while True:
            self._judge_wake.clear()
            started = time.monotonic()
            await self.tick_async()
            # A suspicion lasts until a little past the next pass, however long this one took.
            suspecting = await self._probe_suspects(hold(tick, policy, time.monotonic() - started))
            took = time.monotonic() - started  # the pass and its suspects, as the loop saw them
            self.metrics.judge_duration.observe(took)
            self._judge_pace(took, tick)
            delay = judge_delay(tick, suspecting, policy, took)
            gap = max(min(delay, policy.judge_every), took)
            await asyncio.sleep(gap)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, delay - gap)):
                    await self._judge_wake.wait()  # a failure is judged (and suspected) at once

    def _judge_pace(self, took: float, tick: float) -> None:
        """Say when a judge pass takes longer than the tick (the next waits as long, so probing
        keeps half the loop and verdicts come less often), and when passes keep pace again."""
        behind = took > tick
        if behind and not self._judge_behind:
            log.warning(
                "judge behind its tick",
                took=round(took, 3),
                tick=tick,
                windows=self.windows.count(),
                effect="the next pass waits as long as this one took: verdicts come less often",
            )
        elif not behind and self._judge_behind:
            log.info("judge keeps pace again", took=round(took, 3), tick=tick)
        self._judge_behind = behind

    async def _probe_suspects(self, held: float) -> bool:
        """Probe harder where the evidence leans toward a finding: renewed on every judge pass
        while it does (each for `held` seconds, and for the runs that would settle it when the
        suspicion counts them), so a suspicion ends about a pass after the evidence fades or a
        verdict holds. This vantage's targets here; each agent's are sent to it
        (`Intake.hurry`), and it hastens them the same way.
        Returns whether any target at any vantage is a suspect (the judge then runs faster)."""
        policy = self.config.policy.verdicts.suspicion
        everywhere = await finish_async(
            suspect_steps(
                self.windows,
                self.judge.probes,
                self.judge.verdicts,
                self.clock(),
                self.config.policy.verdicts,
                self.judge.set_aside,
            )
        )
        found = {(region, probe): s for (region, probe, vantage), s in everywhere.items() if vantage == self.vantage}
        for (region, probe), suspicion in found.items():
            self.scheduler.hasten(
                region,
                probe,
                every=policy.every,
                hold=held,
                budget=policy.budget,
                runs=suspicion.runs,
                parallel=policy.parallel,
                seen=suspicion.seen,
            )
            if (region, probe) not in self._suspects:
                log.info(
                    "probing a suspect harder",
                    region=region,
                    probe=probe,
                    why=suspicion.why,
                    runs=suspicion.runs,
                    every=policy.every,
                )
        for region, probe in self._suspects - found.keys():
            log.info("suspicion over", region=region, probe=probe)
        self._suspects = set(found)
        if self.intake is not None:
            by_agent: dict[str, dict[tuple[str, str], Suspicion]] = {}
            for (region, probe, vantage), suspicion in everywhere.items():
                if vantage != self.vantage:
                    by_agent.setdefault(vantage, {})[region, probe] = suspicion
            for vantage, targets in by_agent.items():
                self.intake.hurry(vantage, targets, held=held, policy=policy)
        return bool(everywhere)

    async def _keep_baselines(self, store: Store) -> None:
        """Save the latency baselines every `BASELINES_EVERY`, so a restart judges slowdowns at once."""
        while True:
            await asyncio.sleep(BASELINES_EVERY)
            await self._save_baselines(store)

    async def _save_baselines(self, store: Store) -> None:
        """Save the baselines; a state file that cannot take them (a full disk) is a warning:
        they are a head start for the next run, and a stop still releases the writer lease."""
        current = self.baselines.current()
        if not current:
            return
        try:
            await store.baselines.save(current)
        except StateError as exc:
            log.warning("latency baselines not saved: a restart will relearn them", error=str(exc))

    # --- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; raise `ListenError` when the API cannot bind."""
        host, port = self.config.controller.host_port
        async with contextlib.AsyncExitStack() as stack:
            if self.config.record_sets:
                store = await stack.enter_async_context(Store(self.config.state_file))
                r53 = self.config.controller.route53
                actuator = Actuator(
                    make_client(r53.endpoint_url),
                    dry_run=r53.dry_run,
                    poll_interval=r53.poll_interval,
                    insync_timeout=r53.insync_timeout,
                    max_attempts=r53.max_attempts,
                    clock=self.clock,
                    max_rate=r53.max_requests_per_second,
                )
                reads = len(self.config.record_sets) / r53.reconcile_every
                if reads > r53.max_requests_per_second:
                    log.warning(
                        "Route 53 reads alone need more than route53.max_requests_per_second: each reconcile "
                        "takes longer than reconcile_every",
                        record_sets=len(self.config.record_sets),
                        reconcile_every=r53.reconcile_every,
                        reads_per_second=round(reads, 2),
                        max_requests_per_second=r53.max_requests_per_second,
                        fix="reconcile less often, or split the record sets between controllers",
                    )
                stack.callback(actuator.close)  # after the stop has waited for its requests
                lease = store.lease(str(this_process()), r53.lease_ttl)
                self.reconciler = Reconciler(
                    self.config, actuator, store, lease, publish=self.bus.publish, clock=self.clock
                )
                await self.reconciler.load()
                self.metrics.watch_route53(self.reconciler)
                stored = await store.baselines.load()
                self.baselines.stored = dict(stored)  # (slow, median, floor, samples, at), as baselines keep them
                if stored:
                    log.info("latency baselines loaded", baselines=len(stored), state_file=str(self.config.state_file))
            # Served once everything it shows is ready.
            server = await stack.enter_async_context(ApiServer(make_app(self), host, port))
            self.url = server.url
            log.info(
                "started",
                api=server.url,
                regions=len(self.config.regions),
                probes=len(self.scheduler.probers),
                vantage=self.vantage,
            )
            if self.config.controller.read_only:
                log.info("read-only: operator actions (ramps, freeze, adopt) are refused over the API")
            elif self.api_token() is None:
                log.warning(
                    "no API token: operator actions (ramp start, pause, resume, abort; freeze; adopt) are refused",
                    set=self.config.controller.api_token_env,
                )
            async with asyncio.TaskGroup() as group:
                self._tasks = [
                    group.create_task(self.scheduler.run(), name="scheduler"),
                    group.create_task(self._judge_loop(), name="judge"),
                    group.create_task(self.metrics.follow(self._metric_events), name="metrics"),
                ]
                if self.intake is not None:
                    self._tasks.append(group.create_task(self.intake.run(stop), name="intake"))
                if self.reconciler is not None:
                    lease_ttl = self.config.controller.route53.lease_ttl
                    self._tasks += [
                        group.create_task(self.reconciler.keep_lease(lease_ttl / 3, self.clock), name="lease"),
                        group.create_task(self._reconcile_loop(self.reconciler), name="reconciler"),
                        group.create_task(self._keep_baselines(store), name="baselines"),
                    ]
                self.started.set()
                await stop.wait()
                log.info("stopping")
                for task in self._tasks:
                    task.cancel()
            if self.reconciler is not None:
                await self._save_baselines(store)
                # A batch sent before the stop must land (or fail) before another controller may
                # write: the lease is given up only once no Route 53 request is in flight.
                if await self.reconciler.actuator.quiesce(within=STOP_WAITS_FOR_ROUTE53):
                    await self.reconciler.release_lease()
                else:
                    log.warning("a Route 53 request is still running: the writer lease is left to expire")
        log.info("stopped", probe_runs=self.scheduler.stats.runs)

    # --- what the API shows (built by controller.web.views) ------------------------------------

    @property
    def verdicts(self) -> Mapping[str, Verdict]:
        return self.judge.verdicts

    @property
    def set_aside(self) -> Mapping[str, str]:
        return self.judge.set_aside

    def agents(self) -> dict[str, Any] | None:
        if self.intake is None:
            return None
        now = self.clock()
        return {
            "broker": self.intake.settings.broker,
            "connected": self.intake.connected,
            "vantages": {v: a.state_view(now) for v, a in self.intake.agents.items()},
        }

    def _agent_looks(self, vantage: str) -> tuple[bool, float | None, float | None]:
        if self.intake is None:
            return False, None, None
        agent = self.intake.agents[vantage]
        return self.intake.connected and agent.state == "online", agent.lag, agent.skew

    def probe_stats(self) -> tuple[int, int]:
        return self.scheduler.stats.runs, self.scheduler.stats.missed_ticks

    def api_token(self) -> str | None:
        # Surrounding whitespace is the file or secret store's, not the token's (a trailing newline).
        return os.environ.get(self.config.controller.api_token_env, "").strip() or None

    def actuation(self) -> dict[str, str]:
        """Record sets whose actuation is impaired (Route 53 unreachable, no credentials, denied)."""
        if self.reconciler is None:
            return {}
        every = self.config.controller.route53.reconcile_every
        return self.reconciler.actuation(self.clock(), stale_after=max(3 * every, 60.0))

    def problems(self) -> list[str]:
        return (
            [f"task {t.get_name()} ended" for t in self._tasks if t.done()] if self.started.is_set() else ["starting"]
        )
