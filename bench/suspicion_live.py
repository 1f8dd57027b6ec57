"""Suspicion-driven probing, live: how soon a real daemon calls a partial failure, with and without
probing suspects harder, at one vantage, as a deployment runs today.

Run:  .venv/bin/python bench/suspicion_live.py [--trials 3] [--ratio 0.15] [--interval 1]

Three simulated regions on loopback, each probed on `/healthz` and `/api/orders` every
`--interval` seconds from the controller (one vantage), judged with the shipped
`policies/verdicts.yaml`. After a warm-up, one region starts failing `--ratio` of its API
requests (`/healthz` stays 200). Each trial measures, on the wall clock: onset -> the first failing
result, onset -> the region's verdict `degraded` for the failing probe (a "slower than usual" finding does not
count), and the extra probes run meanwhile. Trials
alternate between suspicion on and off (the anchor: the same daemon, the same world, in the same
run). A trial that has not decided within `--within` seconds counts as missed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from controller import logs
from controller.daemon import Daemon
from controller.demo.world import SimulatedRegion
from controller.settings.loading import load_policy
from controller.settings.schema import Config, ControllerSettings, Region
from probes.spec import HttpProbe

REPO = Path(__file__).resolve().parent.parent
NAMES = ("us-east-1", "eu-west-1", "ap-southeast-2")
FAULTY = "eu-west-1"


def config(world: dict[str, SimulatedRegion], args: argparse.Namespace, *, suspicion: bool) -> Config:
    policy, _ = load_policy([REPO / "policies" / "verdicts.yaml"])
    shipped = policy.verdicts.suspicion
    tuned = {"enabled": suspicion, "every": args.every or shipped.every, "budget": args.budget or shipped.budget}
    verdicts = policy.verdicts.model_copy(update={"suspicion": shipped.model_copy(update=tuned)})
    interval = args.interval
    probes = [("healthz", "/healthz"), ("orders", "/api/orders")]
    regions = [
        Region(
            name=n,
            probes=[
                HttpProbe(name=p, target=r.url + path, interval=interval, timeout=min(interval, 2.0))
                for p, path in probes
            ],
        )
        for n, r in world.items()
    ]
    return Config(
        controller=ControllerSettings(listen="127.0.0.1:0", tick=0.25),
        regions=regions,
        policy=policy.model_copy(update={"verdicts": verdicts}),
    )


async def trial(world: dict[str, SimulatedRegion], args: argparse.Namespace, *, suspicion: bool) -> dict[str, float]:
    for region in world.values():
        region.heal()
    daemon = Daemon(config(world, args, suspicion=suspicion))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.started.wait(), 10)
        warm = time.monotonic() + args.warmup
        while time.monotonic() < warm or any(
            (v := daemon.judge.verdicts.get(n)) is None or v.status != "healthy" for n in NAMES
        ):
            await asyncio.sleep(0.05)
            if time.monotonic() > warm + 120:
                raise RuntimeError("the world did not turn healthy within two minutes of warm-up")
        extra_before = daemon.scheduler.stats.extra_runs
        onset_wall = time.time()
        onset = time.monotonic()
        world[FAULTY].set(error_ratio=args.ratio, error_paths=("/api/",))
        first = decided = None
        while time.monotonic() - onset < args.within:
            window = daemon.windows.region(FAULTY).get(("orders", "controller"))
            failed = window.last_failure() if window is not None else None
            if first is None and failed is not None and failed >= onset_wall:
                first = time.monotonic() - onset
            verdict = daemon.judge.verdicts.get(FAULTY)
            failing = verdict is not None and any(
                r.startswith("orders: ") and "slower" not in r for r in verdict.reasons
            )
            if verdict is not None and verdict.status in ("degraded", "unhealthy") and failing:
                decided = time.monotonic() - onset
                break
            await asyncio.sleep(0.02)
        return {
            "first": first if first is not None else float("nan"),
            "decided": decided if decided is not None else float("inf"),
            "extra": daemon.scheduler.stats.extra_runs - extra_before,
        }
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def summary(rows: list[dict[str, float]]) -> str:
    decided = sorted(r["decided"] for r in rows)
    after_first = sorted(r["decided"] - r["first"] for r in rows if r["first"] == r["first"])
    missed = sum(d == float("inf") for d in decided)
    return (
        f"onset->decided median {statistics.median(decided):6.1f}s worst {decided[-1]:6.1f}s | "
        f"first failure->decided median {statistics.median(after_first):5.1f}s worst {after_first[-1]:5.1f}s | "
        f"missed {missed}/{len(rows)} | extra probes/trial {statistics.mean(r['extra'] for r in rows):5.1f}"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per mode (on, off)")
    parser.add_argument("--ratio", type=float, default=0.15, help="share of API requests that fail")
    parser.add_argument("--interval", type=float, default=1.0, help="probe interval, seconds")
    parser.add_argument("--within", type=float, default=120.0, help="a trial undecided after this is missed")
    parser.add_argument("--warmup", type=float, default=20.0, help="healthy seconds before the fault")
    parser.add_argument("--every", type=float, help="suspicion.every to try (default: the shipped policy's)")
    parser.add_argument("--budget", type=int, help="suspicion.budget to try (default: the shipped policy's)")
    args = parser.parse_args()
    logs.configure("warning", "console")
    rows: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    async with (
        SimulatedRegion(NAMES[0], seed=1) as a,
        SimulatedRegion(NAMES[1], seed=2) as b,
        SimulatedRegion(NAMES[2], seed=3) as c,
    ):
        world = dict(zip(NAMES, (a, b, c), strict=True))
        for i in range(args.trials):
            for suspicion in (True, False):
                row = await trial(world, args, suspicion=suspicion)
                rows[suspicion].append(row)
                print(f"trial {i + 1} suspicion {'on ' if suspicion else 'off'}: {row}", file=sys.stderr, flush=True)
    print(f"{args.ratio:.0%} of /api/orders failing in {FAULTY}, one vantage, probes every {args.interval:g}s,")
    shipped, _ = load_policy([REPO / "policies" / "verdicts.yaml"])
    every = args.every or shipped.verdicts.suspicion.every
    budget = args.budget or shipped.verdicts.suspicion.budget
    print(f"shipped policies/verdicts.yaml, suspicion every {every:g}s, budget {budget}/min; from the fault's onset:")
    print(f"  suspicion on : {summary(rows[True])}")
    print(f"  suspicion off: {summary(rows[False])}  (anchor: same daemon, same world, same run)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
