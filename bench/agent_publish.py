"""An agent far from its broker: how many results a second it gets acknowledged.

Run:  .venv/bin/python bench/agent_publish.py [--results 400] [--rtt 0.1] [--rounds 2]

A real mosquitto on a loopback port (password file, ACL, as deployed) behind a delayed link
(`tests/links.py`: every chunk held half of `--rtt` each way, so the broker answers as one that
far away would). A real `Agent` is handed `--results` results at once (what piles up while a
suspect is probed 20 times a second, or after a broker restart) and publishes them, QoS 1, as it
does in production; timed from the first hand-over until the broker has acknowledged the last.

- anchor: the same agent with one result in flight at a time (`inflight` 1: how agents published
  before), which can do no better than one result per round trip;
- regionshift: the shipped window (`probes.agent.INFLIGHT` results awaiting acknowledgement).

Printed: results acknowledged per second for each, and the ratio (the window's gain). Rounds
alternate the two so that a noisy minute hurts both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.demo.broker import CONTROLLER_USER, Broker
from probes.agent import INFLIGHT, Agent, AgentSettings
from probes.results import Result
from probes.spec import Secret
from tests.links import DelayedLink

VANTAGE = "agent-a"
PASSWORDS = {CONTROLLER_USER: "controller-pw", VANTAGE: "a-pw"}


async def acknowledged_per_second(broker: Broker, rtt: float, results: int, inflight: int) -> float:
    async with DelayedLink(broker.port, delay=rtt / 2) as link:
        agent = Agent(
            AgentSettings(
                vantage=VANTAGE,
                host="127.0.0.1",
                port=link.port,
                username=VANTAGE,
                password=Secret(env="BENCH_AGENT_PASSWORD"),
                inflight=inflight,
            )
        )
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        while agent.stats.connects == 0:  # noqa: ASYNC110 - the agent has no hook for a bench to wait on
            await asyncio.sleep(0.01)
        await asyncio.sleep(rtt * 3)  # connected: the presence and subscriptions are through
        started = time.perf_counter()
        now = time.time()
        for i in range(results):
            agent.record(Result("eu-west-1", "orders", VANTAGE, now + i / 1000, ok=True, latency=0.05))
        while agent.stats.published < results:  # noqa: ASYNC110 - polled, as above (5 ms: well under the figure)
            await asyncio.sleep(0.005)
        took = time.perf_counter() - started
        stop.set()
        await running
    return results / took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=400)
    parser.add_argument("--rtt", type=float, default=0.1, help="round trip to the broker, seconds (default 0.1)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.results < 1 or args.rtt <= 0 or args.rounds < 1:
        parser.error("--results and --rounds at least 1, --rtt above 0")
    os.environ["BENCH_AGENT_PASSWORD"] = PASSWORDS[VANTAGE]
    one, window = [], []
    with Broker(dict(PASSWORDS)) as broker:
        for _ in range(args.rounds):
            one.append(asyncio.run(acknowledged_per_second(broker, args.rtt, max(10, args.results // 10), 1)))
            window.append(asyncio.run(acknowledged_per_second(broker, args.rtt, args.results, INFLIGHT)))
    anchor, ours = statistics.median(one), statistics.median(window)
    print(f"agent publishing to a broker {args.rtt * 1000:.0f} ms away (round trip), QoS 1, {args.results} results")
    print(f"  anchor, one in flight:       {anchor:8.1f} results/s  (1 / round trip = {1 / args.rtt:.1f})")
    print(f"  regionshift, {INFLIGHT} in flight:   {ours:8.1f} results/s  ({ours / anchor:.1f}x the anchor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
