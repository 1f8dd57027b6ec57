"""The daemon: probes every region on schedule, judges each one, and serves what it sees.

Every long-lived part runs under one `asyncio.TaskGroup` inside the API server's context, so a
crash in any part stops the whole daemon loudly and a stop request (SIGTERM, SIGINT) shuts it
down in order: probes stop, the last verdicts stay readable until the server closes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from controller.api import ApiServer, make_app
from controller.metrics import Metrics
from controller.verdicts import Judge, ThresholdDetector
from controller.windows import WindowStore
from probes.scheduler import Scheduler, make_prober

if TYPE_CHECKING:
    from collections.abc import Callable

    from controller.config import Config
    from controller.verdicts import Transition
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
        self.windows = WindowStore(config.policy.verdicts.window)
        self.judge = Judge(
            [ThresholdDetector(config.policy.verdicts)],
            {r.name: tuple(p.name for p in r.probes) for r in config.regions},
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

    # --- the flow: results -> windows -> verdicts ------------------------------------------

    def record(self, result: Result) -> None:
        """Sink for every probe result, from the scheduler or (later) from agents."""
        self.windows.add(result)
        self.metrics.observe(result)
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
        return transitions

    async def _judge_loop(self) -> None:
        interval = self.config.controller.tick
        while True:
            self.tick()
            await asyncio.sleep(interval)

    # --- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; raise `ListenError` when the API cannot bind."""
        host, port = self.config.controller.host_port
        async with ApiServer(make_app(self), host, port) as server:
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
                self.started.set()
                await stop.wait()
                log.info("stopping")
                for task in self._tasks:
                    task.cancel()
        log.info("stopped", probe_runs=self.scheduler.stats.runs)

    # --- what the API shows ---------------------------------------------------------------------

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
            "record_sets": [
                {
                    "name": rs.name,
                    "type": rs.type,
                    "zone_id": rs.zone_id,
                    "ttl": rs.ttl,
                    "residency": rs.residency,
                    "takes_writes": rs.takes_writes,
                    "members": [m.model_dump() for m in rs.members],
                }
                for rs in self.config.record_sets
            ],
            "ramps": [],
            "events": list(self.events)[-100:],
            "probe_runs": self.scheduler.stats.runs,
            "missed_ticks": self.scheduler.stats.missed_ticks,
        }
