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
from controller.acting.route53 import Actuator, make_client
from controller.judging.detectors import detectors_for
from controller.judging.lag import LagDetector
from controller.judging.verdicts import Judge
from controller.judging.windows import WindowStore
from controller.planning.ramps import RAMP_STATUSES
from controller.planning.weights import shares
from controller.sinks.prometheus import Metrics
from controller.state.holder import this_process
from controller.state.store import Store
from controller.web.api import ApiServer, make_app
from probes.scheduler import Scheduler, make_prober

if TYPE_CHECKING:
    from collections.abc import Callable

    from controller.acting.reconciler import Action
    from controller.judging.verdicts import Transition
    from controller.settings.schema import Config, RecordSet
    from probes.results import Result

log = structlog.get_logger("regionshift.daemon")
EVENT_HISTORY = 500
# A failing probe is logged as recovered after this many passes in a row, so a probe that
# fails every other run logs once, not on every result.
RECOVERED_AFTER = 3


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
        self.judge = Judge(
            [
                *detectors_for(verdict_policy),
                LagDetector(verdict_policy, lag_probes, {r.name: r.type for r in config.regions}),
            ],
            {
                r.name: tuple(p.name for p in r.probes if (r.name, p.name) not in self.lag_sources)
                for r in config.regions
            },
            verdict_policy,
        )
        probers = [make_prober(spec, r.name, self.vantage) for r in config.regions for spec in r.probes]
        self.scheduler = Scheduler(
            probers, self.record, max_concurrency=settings.max_concurrency, jitter=settings.jitter
        )
        self.metrics.precreate(
            ((r.name, p.name, self.vantage) for r in config.regions for p in r.probes),
            (r.name for r in config.regions),
        )
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)
        self.listeners: list[Callable[[Transition], None]] = []
        self.started = asyncio.Event()
        self.url: str | None = None
        self._passes_since_failure: dict[tuple[str, str, str], int] = {}  # only for failing probes
        self._tasks: list[asyncio.Task[None]] = []
        self.reconciler: Reconciler | None = None
        # Set on every verdict change: the reconciler looks at once instead of at its next tick.
        self._wake = asyncio.Event()
        self.action_listeners: list[Callable[[Action], None]] = []
        self._precreate_actions()

    def _precreate_actions(self) -> None:
        policy = self.config.policy
        for name, ramp in policy.ramps.items():
            for region in (r for wave in ramp.waves for r in wave):
                for action in ("forward", "rollback"):
                    self.metrics.actions.labels(action, region, f"ramp:{name}")
            self.metrics.set_ramp(name, -1, "pending", RAMP_STATUSES)
        for rs in self.config.record_sets:
            self.metrics.route53_drift.labels(rs.key).set(0)
            for member in rs.members:
                for action in ("evacuation", "restore"):
                    self.metrics.actions.labels(action, member.region, "evacuation")

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
        transitions = self.judge.judge(self.windows, now)
        for t in transitions:
            v = t.verdict
            self.metrics.set_status(t.region, v.status)
            event = {
                "at": now,
                "kind": "verdict",
                "region": t.region,
                "from": t.previous,
                "to": v.status,
                "reasons": list(v.reasons),
            }
            self.events.append(event)
            log.info("verdict changed", region=t.region, previous=t.previous, status=v.status, reasons=list(v.reasons))
            for listener in self.listeners:
                listener(t)
        if transitions:
            self._wake.set()
        return transitions

    def _on_action(self, action: Action) -> None:
        if action.outcome in ("applied", "dry_run"):
            for region in action.regions:
                self.metrics.actions.labels(action.kind, region, action.actor).inc()
        self.events.append(
            {
                "at": self.clock(),
                "kind": "action",
                "record": action.record,
                "action": action.kind,
                "actor": action.actor,
                "outcome": action.outcome,
                "reason": action.reason,
                "weights": action.weights,
                "regions": list(action.regions),
            }
        )
        for listener in self.action_listeners:
            listener(action)

    async def _reconcile_loop(self, reconciler: Reconciler) -> None:
        every = self.config.controller.route53.reconcile_every
        while True:
            self._wake.clear()  # a verdict changing during the tick wakes the next one at once
            await reconciler.tick(self.judge.verdicts, self.clock())
            self._export(reconciler)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._wake.wait()

    def _export(self, reconciler: Reconciler) -> None:
        for rs in self.config.record_sets:
            view = reconciler.views[rs.key]
            for member in rs.members:
                if member.set_identifier in view.observed:
                    self.metrics.route53_weight.labels(rs.key, member.set_identifier, member.region).set(
                        view.observed[member.set_identifier]
                    )
            self.metrics.route53_drift.labels(rs.key).set(1 if view.drift else 0)
        for name, state in reconciler.ramps.items():
            self.metrics.set_ramp(name, state.step, state.status, RAMP_STATUSES)

    async def _judge_loop(self) -> None:
        interval = self.config.controller.tick
        while True:
            self.tick()
            await asyncio.sleep(interval)

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
                )
                lease = store.lease(str(this_process()), r53.lease_ttl)
                self.reconciler = Reconciler(
                    self.config, actuator, store, lease, on_action=self._on_action, clock=self.clock
                )
                await self.reconciler.load()
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
            async with asyncio.TaskGroup() as group:
                self._tasks = [
                    group.create_task(self.scheduler.run(), name="scheduler"),
                    group.create_task(self._judge_loop(), name="judge"),
                ]
                if self.reconciler is not None:
                    lease_ttl = self.config.controller.route53.lease_ttl
                    self._tasks += [
                        group.create_task(self.reconciler.keep_lease(lease_ttl / 3, self.clock), name="lease"),
                        group.create_task(self._reconcile_loop(self.reconciler), name="reconciler"),
                    ]
                self.started.set()
                await stop.wait()
                log.info("stopping")
                for task in self._tasks:
                    task.cancel()
        log.info("stopped", probe_runs=self.scheduler.stats.runs)

    # --- what the API shows ---------------------------------------------------------------------

    def _record_state(self, rs: RecordSet) -> dict[str, Any]:
        view = self.reconciler.views.get(rs.key) if self.reconciler is not None else None
        observed = dict(view.observed) if view is not None else {}
        desired = dict(view.desired) if view is not None and view.desired is not None else None
        achieved = shares(observed) if observed and any(observed.values()) else {}
        wanted = shares(desired) if desired else {}
        return {
            "key": rs.key,
            "name": rs.name,
            "type": rs.type,
            "zone_id": rs.zone_id,
            "ttl": rs.ttl,
            "residency": rs.residency,
            "takes_writes": rs.takes_writes,
            "members": [
                {
                    **m.model_dump(),
                    "observed_weight": observed.get(m.set_identifier),
                    "observed_share": round(achieved[m.set_identifier], 3) if m.set_identifier in achieved else None,
                    "desired_weight": desired.get(m.set_identifier) if desired else None,
                    "desired_share": round(wanted[m.set_identifier], 3) if m.set_identifier in wanted else None,
                }
                for m in rs.members
            ],
            "owner": view.owner if view is not None else None,
            "reason": view.reason if view is not None else None,
            "drift": view.drift if view is not None else None,
            "error": view.error if view is not None else None,
        }

    def _ramp_states(self) -> list[dict[str, Any]]:
        if self.reconciler is None:
            return []
        out = []
        for name, state in self.reconciler.ramps.items():
            policy = self.config.policy.ramps[name]
            out.append(
                {
                    "name": name,
                    "record_set": policy.record_key,
                    "status": state.status,
                    "wave": state.wave + 1,
                    "waves": len(policy.waves),
                    "targets": policy.waves[state.wave],
                    "step": state.step + 1,
                    "steps": len(policy.steps),
                    "share": policy.steps[state.step] if state.step >= 0 else 0.0,
                    "bake_until": state.bake_until,
                    "reason": state.reason,
                    "pending": state.pending is not None,
                }
            )
        return out

    def api_token(self) -> str | None:
        return os.environ.get(self.config.controller.api_token_env) or None

    def problems(self) -> list[str]:
        return (
            [f"task {t.get_name()} ended" for t in self._tasks if t.done()] if self.started.is_set() else ["starting"]
        )

    def state(self) -> dict[str, Any]:
        verdicts = self.judge.verdicts
        return {
            "generated_at": self.clock(),
            "vantage": self.vantage,
            "regions": [
                {
                    "name": r.name,
                    "type": r.type,
                    "residency": r.residency,
                    "max_share": r.max_share,
                    "probes": [
                        {"name": p.name, "kind": p.kind, "target": p.target, "interval": p.interval} for p in r.probes
                    ],
                    "verdict": verdicts[r.name].to_json() if r.name in verdicts else None,
                }
                for r in self.config.regions
            ],
            "record_sets": [self._record_state(rs) for rs in self.config.record_sets],
            "ramps": self._ramp_states(),
            "frozen": self.reconciler.frozen if self.reconciler is not None else None,
            "events": list(self.events)[-100:],
            "probe_runs": self.scheduler.stats.runs,
            "missed_ticks": self.scheduler.stats.missed_ticks,
        }
