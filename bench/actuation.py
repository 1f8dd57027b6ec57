"""Actuation latency: from a verdict turning bad to the rollback (or evacuation) batch being sent.

Run:  make bench            (or: .venv/bin/python bench/actuation.py [--decisions 200])

Each decision is one reconciler tick against moto's Route 53 server on loopback, through the
same code the daemon runs (reconciler, ramp or evacuation planner, guardrails, SQLite audit log,
actuator): the target region's verdict has just turned `degraded`, and the clock runs until
botocore is about to send the ChangeResourceRecordSets request. Beside it, measured in the same
run through botocore's own event hooks, the latency of each Route 53 call: the anchor that says
how much of a decision is Route 53 and how much is regionshift. (In the daemon a verdict change
wakes the reconciler at once, so no tick interval is added.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from controller import logs
from controller.acting.reconciler import Reconciler
from controller.acting.route53 import Actuator, make_client
from controller.demo.world import LocalRoute53, seed_weighted_group
from controller.judging.verdicts import Verdict
from controller.planning.ramps import RampState
from controller.settings.policy import Policy, RampPolicy
from controller.settings.schema import Config, Member, RecordSet, Region
from controller.state.store import Store

KEY = "bench"
REGIONS = [Region(name="us-east-1"), Region(name="eu-west-1")]


class Timings:
    """Route 53 call latencies and the moment each change request leaves, from botocore's events."""

    def __init__(self, client: Any) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.change_sent_at: float | None = None
        self._started: dict[str, float] = {}
        client.meta.events.register("before-send.route53", self._before)
        client.meta.events.register("after-call.route53", self._after)

    def _before(self, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]  # before-send.route53.ChangeResourceRecordSets
        now = time.perf_counter()
        self._started[operation] = now
        if operation == "ChangeResourceRecordSets" and self.change_sent_at is None:
            self.change_sent_at = now

    def _after(self, model: Any, **_: Any) -> None:
        started = self._started.pop(model.name, None)
        if started is not None:
            self.calls[model.name].append(time.perf_counter() - started)


def verdicts(now: float, target: str) -> dict[str, Verdict]:
    return {
        "us-east-1": Verdict("us-east-1", "healthy", (), {}, now - 3600, now),
        target: Verdict(target, "degraded", ("orders: 60% of 20 probes succeeded",), {}, now, now),
    }


async def decide(kind: str, i: int, client: Any, setup: Any, zone_id: str, store: Store, timings: Timings) -> float:
    name = f"{kind}{i}.bench.example.com"
    rollback = kind == "rollback"
    start = {"use1": 9, "euw1": 1} if rollback else {"use1": 1, "euw1": 1}
    await asyncio.to_thread(seed_weighted_group, setup, zone_id, name, [(k, w, "192.0.2.1") for k, w in start.items()])
    members = [
        Member(set_identifier=s, region=r, value="192.0.2.1", weight=None if rollback else 1)
        for s, r in (("use1", "us-east-1"), ("euw1", "eu-west-1"))
    ]
    rs = RecordSet(zone_id=zone_id, name=name, members=members)
    ramps = {f"r{i}": RampPolicy(record_set=name, waves=[["eu-west-1"]])} if rollback else {}
    config = Config(regions=REGIONS, record_sets=[rs], policy=Policy(ramps=ramps))
    lease = store.lease("bench", 3600)
    reconciler = Reconciler(config, Actuator(client), store, lease)
    await reconciler.load()
    now = time.time()
    reconciler.lease_token = await lease.acquire(now)
    if rollback:  # baking the 10% step of a ramp, as last written
        intent = await store.audit.intent(
            rs.key, f"ramp:r{i}", "forward", "step 3", {"use1": 19, "euw1": 1}, start, now
        )
        await store.audit.result(intent, "applied", now, change_id="bench", insync_at=now)
        reconciler.ramps[f"r{i}"] = RampState(
            f"r{i}",
            status="baking",
            step=2,
            baseline={"use1": 1, "euw1": 0},
            bake_until=now + 3600,
            healthy_others=("us-east-1",),
        )
    timings.change_sent_at = None
    t0 = time.perf_counter()
    await reconciler.tick(verdicts(now, "eu-west-1"), now)
    if timings.change_sent_at is None:
        raise RuntimeError(f"{kind} {i}: no batch was sent; reason: {reconciler.views[rs.key].reason}")
    return timings.change_sent_at - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    p50, p99, mean = pct(ms, 0.5), pct(ms, 0.99), statistics.mean(ms)
    return f"{label:<44} {len(ms):>5} {p50:>9.2f} {p99:>9.2f} {max(ms):>9.2f} {mean:>9.2f}"


async def main(decisions: int) -> int:
    logs.configure("warning")  # one log line per decision would measure the terminal
    with tempfile.TemporaryDirectory() as tmp:
        async with LocalRoute53() as route53, Store(Path(tmp) / "state.sqlite") as store:
            client = make_client(route53.url, aws_access_key_id=KEY, aws_secret_access_key=KEY)
            setup = make_client(route53.url, aws_access_key_id=KEY, aws_secret_access_key=KEY)  # not timed
            zone = await asyncio.to_thread(
                setup.create_hosted_zone, Name="bench.example.com", CallerReference=uuid.uuid4().hex
            )
            zone_id = zone["HostedZone"]["Id"].split("/")[-1]
            timings = Timings(client)
            results: dict[str, list[float]] = {}
            for kind in ("rollback", "evacuation"):
                for i in range(5):  # warm-up: imports, connections, SQLite pages
                    await decide(kind, -1 - i, client, setup, zone_id, store, timings)
                timings.calls.clear()
                results[kind] = [
                    await decide(kind, i, client, setup, zone_id, store, timings) for i in range(decisions)
                ]
                results[f"{kind} calls"] = {k: list(v) for k, v in timings.calls.items()}  # type: ignore[assignment]
    print(f"actuation: {decisions} decisions each, against moto_server on loopback, one reconciler tick per decision")
    print(f"{'':<44} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'mean ms':>9}")
    for kind in ("rollback", "evacuation"):
        print(row(f"{kind}: verdict bad -> batch sent", results[kind]))
        calls: dict[str, list[float]] = results[f"{kind} calls"]  # type: ignore[assignment]
        for operation in ("ListResourceRecordSets", "ChangeResourceRecordSets", "GetChange"):
            if calls.get(operation):
                print(row(f"  route53 {operation} (same run)", calls[operation]))
        share = pct(calls["ListResourceRecordSets"], 0.5) / pct(results[kind], 0.5)
        print(
            "  a decision makes one Route 53 read (observe, and compare before write) before its batch: "
            f"that read is {share:.0%} of the median decision"
        )
    worst = max(pct(results[k], 0.99) for k in ("rollback", "evacuation"))
    print(f"p99 decision latency {worst * 1000:.1f} ms (target: under 1000 ms)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=200)
    sys.exit(asyncio.run(main(parser.parse_args().decisions)))
