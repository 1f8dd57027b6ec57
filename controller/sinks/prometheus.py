"""Region-tagged Prometheus metrics: the fixed names of DESIGN.md that exist so far.

Instrumentation only: the registry is passed in (tests read values back from it), exposition
is the HTTP API's job. Series that alerts and dashboards read are pre-created at zero, so a
rate() over them works before the first failure ever happens.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from controller.acting.errors import ERROR_KINDS, OPERATIONS, RETRY_CAUSES
from controller.events.kinds import ActionTaken
from controller.judging.verdicts import STATUSES
from controller.planning.ramps import RAMP_STATUSES
from probes.results import OUTCOMES, RUN_REASONS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from prometheus_client.metrics import Counter as CounterChild
    from prometheus_client.metrics import Histogram as HistogramChild

    from controller.acting.reconciler import Reconciler
    from controller.events.bus import Subscription
    from controller.judging.verdicts import Status
    from controller.settings.policy import Policy
    from controller.settings.schema import RecordSet
    from probes.results import Result

# No `_created` series beside every counter and histogram (a quarter of the exposition's lines,
# which Prometheus does not ingest by default): the process's start time is in
# `process_start_time_seconds`.
disable_created_metrics()  # type: ignore[no-untyped-call]

STREAM_DROP_REASONS = ("behind", "stalled")  # why an event stream client was disconnected
# Probe latency buckets: loopback answers in about a millisecond, a cross-ocean TLS request in
# a few hundred, and timeouts sit at seconds. Between 20 ms and a second (where regions are) no
# bucket is more than 1.5 times the one below: with 50, 100, 250 a region answering in 52 ms
# and one in 92 ms showed the same p50, and a doubling went unseen on the dashboard.
PROBE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip

# A judge pass: under a millisecond for a few regions, a second at 10,000 series.
JUDGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


_Children = tuple["dict[str, CounterChild]", "HistogramChild", "dict[str, CounterChild]"]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.probe_results = Counter(
            "regionshift_probe_results",
            "Probe runs by region, probe, vantage and outcome (success, failure, timeout).",
            ["region", "probe", "vantage", "outcome"],
            registry=registry,
        )
        self.probe_runs = Counter(
            "regionshift_probe_runs",
            "Probe runs by region, probe, vantage and why they ran: scheduled (on the interval) or "
            "suspicion (an extra run on a target whose evidence leans toward a finding).",
            ["region", "probe", "vantage", "reason"],
            registry=registry,
        )
        self.probe_duration = Histogram(
            "regionshift_probe_duration_seconds",
            "Probe run duration, start to end or to the failure.",
            ["region", "probe", "vantage"],
            buckets=PROBE_BUCKETS,
            registry=registry,
        )
        self.judge_duration = Histogram(
            "regionshift_judge_duration_seconds",
            "One judge pass (every region, every detector, then the suspects), start to end with the event "
            "loop running between its steps. Past the tick, the next pass waits as long: verdicts come later.",
            buckets=JUDGE_BUCKETS,
            registry=registry,
        )
        self.region_troubles = Gauge(
            "regionshift_region_troubles",
            "How many of the region's probes show trouble, held against it or not: a finding, a cause its "
            "peers share, or evidence leaning bad. A trouble every region shows blames none of them (their "
            "verdicts stay healthy or unknown), and shows here.",
            ["region"],
            registry=registry,
        )
        self.region_status = Gauge(
            "regionshift_region_status",
            "1 for the region's current verdict status, 0 for the others.",
            ["region", "status"],
            registry=registry,
        )
        self.replication_lag = Gauge(
            "regionshift_replication_lag_seconds",
            "Replication lag by region and source: measured, or its lower bound while the heartbeat "
            "is not on the replica yet (growing when stalled); NaN when it could not be measured.",
            ["region", "source"],
            registry=registry,
        )
        self.replication_lag_limit = Gauge(
            "regionshift_replication_lag_limit_seconds",
            "The lag policy's limit for each region and source (lag.sources, lag.regions, else "
            "lag.threshold): what RegionshiftReplicationLagHigh compares the lag with.",
            ["region", "source"],
            registry=registry,
        )
        self.route53_weight = Gauge(
            "regionshift_route53_weight",
            "Weight Route 53 holds for each member of a weighted record set (as last read).",
            ["record", "set_identifier", "region"],
            registry=registry,
        )
        self.route53_drift = Gauge(
            "regionshift_route53_drift",
            "1 while a record set holds weights other than the ones regionshift last wrote.",
            ["record"],
            registry=registry,
        )
        self.ramp_step = Gauge(
            "regionshift_ramp_step",
            "Current step of each ramp, 1-based; 0 before its first step.",
            ["ramp"],
            registry=registry,
        )
        self.ramp_status = Gauge(
            "regionshift_ramp_status",
            "1 for the ramp's current status, 0 for the others; regions: those it moves traffic to, "
            "comma-separated (what its alerts are tagged with).",
            ["ramp", "regions", "status"],
            registry=registry,
        )
        self.actions = Counter(
            "regionshift_actions",
            "Weight changes sent, by action (forward, rollback, evacuation, restore), region and reason.",
            ["action", "region", "reason"],
            registry=registry,
        )
        self.route53_errors = Counter(
            "regionshift_route53_errors",
            "Route 53 requests that failed after their retries, by record set and kind "
            "(retryable: throttling, 5xx, network; terminal: denied, invalid; no_credentials).",
            ["record", "kind"],
            registry=registry,
        )
        self.route53_retries = Counter(
            "regionshift_route53_retries",
            "Route 53 requests tried again, by operation and cause (throttling, prior_request, server, "
            "network, timeout): a throttling storm shows here long before any request fails for good.",
            ["operation", "cause"],
            registry=registry,
        )
        for operation in OPERATIONS:
            for cause in RETRY_CAUSES:
                self.route53_retries.labels(operation, cause)
        self._retries_counted: dict[tuple[str, str], int] = {}
        self.route53_read_age = Gauge(
            "regionshift_route53_last_read_age_seconds",
            "Seconds since Route 53 last answered for the record set: its last read, or any answer while "
            "its last attempt did not fail (since the daemon started, before the first).",
            ["record"],
            registry=registry,
        )
        self.agent_dropped = Counter(
            "regionshift_agent_messages_dropped",
            "Messages from agents dropped, never trusted, by vantage (from the topic; 'other' when it names "
            "no configured agent) and reason (invalid, duplicate, clock_skew, unknown_target, ...).",
            ["vantage", "reason"],
            registry=registry,
        )
        self.agent_up = Gauge(
            "regionshift_agent_up",
            "1 while the agent's presence says online and the controller is connected to the broker, else 0.",
            ["vantage"],
            registry=registry,
        )
        self.agent_lag = Gauge(
            "regionshift_agent_lag_seconds",
            "Seconds from the end of the agent's newest live result to its receipt by the controller.",
            ["vantage"],
            registry=registry,
        )
        self.agent_skew = Gauge(
            "regionshift_agent_clock_skew_seconds",
            "The agent's newest live result's end minus its receipt: beyond the lag, how far ahead its clock runs.",
            ["vantage"],
            registry=registry,
        )
        self.stream_clients_now = Gauge(
            "regionshift_event_stream_clients",
            "Clients connected to the live event stream (GET /api/v1/events).",
            registry=registry,
        )
        self.stream_dropped_total = Counter(
            "regionshift_event_stream_dropped_clients",
            "Event stream clients disconnected by reason: behind (fell a queue of events behind) or "
            "stalled (left one write unread too long). They reconnect and catch up.",
            ["reason"],
            registry=registry,
        )
        for reason in STREAM_DROP_REASONS:
            self.stream_dropped_total.labels(reason)
        self.stream_events_total = Counter(
            "regionshift_event_stream_events_sent",
            "Events written to event stream clients, one per client (snapshots and heartbeats not counted).",
            registry=registry,
        )
        self._route53_counted: dict[tuple[str, str], int] = {}
        self._ramp_regions: dict[str, str] = {}  # ramp -> the regions it moves traffic to, comma-separated
        # Label lookups cost more than the increment: keep each subject's children at hand.
        self._children: dict[tuple[str, str, str], _Children] = {}

    # The live event stream's (controller.web.stream.StreamMetrics).
    def stream_clients(self, count: int) -> None:
        self.stream_clients_now.set(count)

    def stream_dropped(self, reason: str) -> None:
        self.stream_dropped_total.labels(reason).inc()

    def stream_sent(self, events: int) -> None:
        self.stream_events_total.inc(events)

    def precreate(self, subjects: Iterable[tuple[str, str, str]], regions: Iterable[str]) -> None:
        for subject in subjects:
            self._subject(*subject)
        for region in regions:
            self.set_status(region, "unknown")
            self.region_troubles.labels(region).set(0)

    def _subject(self, region: str, probe: str, vantage: str) -> _Children:
        key = (region, probe, vantage)
        children = self._children.get(key)
        if children is None:
            counters: dict[str, CounterChild] = {
                o: self.probe_results.labels(region, probe, vantage, o) for o in OUTCOMES
            }
            reasons: dict[str, CounterChild] = {
                r: self.probe_runs.labels(region, probe, vantage, r) for r in RUN_REASONS
            }
            children = (counters, self.probe_duration.labels(region, probe, vantage), reasons)
            self._children[key] = children
        return children

    def observe(self, result: Result) -> None:
        counters, duration, reasons = self._subject(result.region, result.probe, result.vantage)
        counters[result.outcome].inc()
        reasons[result.reason].inc()
        if math.isfinite(result.latency):  # a lag probe's unknown lag is infinite: not a duration
            duration.observe(result.latency)

    def watch_agents(
        self,
        vantages: Iterable[str],
        reasons: Iterable[str],
        looks: Callable[[str], tuple[bool, float | None, float | None]],
    ) -> None:
        """Pre-create the drop counters, and read each agent's (up, lag, skew) at every scrape."""
        reasons = tuple(reasons)
        for vantage in (*vantages, "other"):
            for reason in reasons:
                self.agent_dropped.labels(vantage, reason)
            if vantage == "other":
                continue

            for i, gauge in enumerate((self.agent_up, self.agent_lag, self.agent_skew)):
                gauge.labels(vantage).set_function(partial(_look, looks, vantage, i))

    def drop(self, vantage: str, reason: str) -> None:
        self.agent_dropped.labels(vantage, reason).inc()

    def set_lag_limit(self, region: str, source: str, limit: float) -> None:
        self.replication_lag_limit.labels(region, source).set(limit)

    def set_lag(self, region: str, source: str, result: Result) -> None:
        measured = result.error_class in (None, "lagging", "stalled") and math.isfinite(result.latency)
        self.replication_lag.labels(region, source).set(result.latency if measured else math.nan)

    def set_troubles(self, region: str, probes: int) -> None:
        self.region_troubles.labels(region).set(probes)

    def set_status(self, region: str, status: Status) -> None:
        for s in STATUSES:
            self.region_status.labels(region, s).set(1 if s == status else 0)

    def set_ramp(self, ramp: str, step: int, status: str) -> None:
        self.ramp_step.labels(ramp).set(step + 1)
        regions = self._ramp_regions.get(ramp, "")
        for s in RAMP_STATUSES:
            self.ramp_status.labels(ramp, regions, s).set(1 if s == status else 0)

    def precreate_shifting(self, policy: Policy, record_sets: Iterable[RecordSet]) -> None:
        """The series the shifting alerts and panels read, before the first action."""
        for name, ramp in policy.ramps.items():
            self._ramp_regions[name] = ",".join(r for wave in ramp.waves for r in wave)
            for region in (r for wave in ramp.waves for r in wave):
                for action in ("forward", "rollback"):
                    self.actions.labels(action, region, f"ramp:{name}")
            self.set_ramp(name, -1, "pending")
        for rs in record_sets:
            self.route53_drift.labels(rs.key).set(0)
            for kind in ERROR_KINDS:
                self.route53_errors.labels(rs.key, kind)
            for member in rs.members:
                for action in ("evacuation", "restore"):
                    self.actions.labels(action, member.region, "evacuation")

    def watch_route53(self, reconciler: Reconciler) -> None:
        """Each record set's read age, computed when scraped: it grows while the reconciler is
        stuck in retries too, not only once they fail."""
        for key in reconciler.views:

            def age(key: str = key) -> float:
                return max(0.0, reconciler.clock() - reconciler.last_contact(key))

            self.route53_read_age.labels(key).set_function(age)

    def export(self, record_sets: Iterable[RecordSet], reconciler: Reconciler) -> None:
        """What the reconciler saw this tick: weights, drift, ramp steps, Route 53 errors."""
        for rs in record_sets:
            view = reconciler.views[rs.key]
            for kind, count in view.errors.items():
                _count_up(self.route53_errors, (rs.key, kind), count, self._route53_counted)
            for member in rs.members:
                if member.set_identifier in view.observed:
                    self.route53_weight.labels(rs.key, member.set_identifier, member.region).set(
                        view.observed[member.set_identifier]
                    )
            self.route53_drift.labels(rs.key).set(1 if view.drift else 0)
        for labels, count in list(reconciler.actuator.retries.items()):
            _count_up(self.route53_retries, labels, count, self._retries_counted)
        for name, state in reconciler.ramps.items():
            self.set_ramp(name, state.step, state.status)

    async def follow(self, events: Subscription) -> None:
        """Count every weight change sent (applied or dry run), from the event bus."""
        async for event in events:
            if isinstance(event, ActionTaken) and event.outcome in ("applied", "dry_run"):
                for region in event.regions:
                    self.actions.labels(event.action, region, event.actor).inc()


def _count_up(counter: Counter, labels: tuple[str, str], count: int, counted: dict[tuple[str, str], int]) -> None:
    """Bring `counter`'s series for `labels` up to `count`, a running total kept elsewhere;
    `counted` remembers what was added so far."""
    if count > counted.get(labels, 0):
        counter.labels(*labels).inc(count - counted.get(labels, 0))
        counted[labels] = count


def _look(looks: Callable[[str], tuple[bool, float | None, float | None]], vantage: str, i: int) -> float:
    value = looks(vantage)[i]
    return math.nan if value is None else float(value)
