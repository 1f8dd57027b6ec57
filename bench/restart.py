"""Restart to actuation: how long a daemon killed with SIGKILL takes, once restarted on the same
host, to send the ramp step that was already due, beside the floor no restart can beat: starting
the same interpreter and importing the daemon's code, measured in the same run.

Run:  make bench            (or: .venv/bin/python bench/restart.py [--restarts 4])

A local world: moto's Route 53 server, two simulated regions probed every 100 ms, a five-step
ramp with a 3 s TTL and a 1 s bake, the default 30 s writer lease. After each step the daemon is
killed; it is started again only once the next step is due (from the audit log: INSYNC + TTL +
bake), so every restart has a write to make at once. Measured: process start to the writer lease
held (from its log), and to the step's intent in the audit log. Without the same-host takeover
the lease alone would cost its 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import aiohttp

from controller.acting.route53 import make_client
from controller.demo.world import LocalRoute53, SimulatedRegion, free_port, ramp_config, seed_weighted_group

TTL, BAKE = 3, 1.0
REGIONSHIFT = str(Path(sys.executable).with_name("regionshift"))
TOKEN = "bench-token"  # noqa: S105 - a local daemon's operator token


def forward_steps(state: Path) -> list[tuple[float, float]]:
    """(intent time, INSYNC time) of every applied forward step, oldest first."""
    with sqlite3.connect(state) as db:
        return db.execute(
            "SELECT i.at, r.insync_at FROM audit i JOIN audit r ON r.intent_id = i.id AND r.phase = 'result'"
            " WHERE i.phase = 'intent' AND i.action = 'forward' AND r.outcome = 'applied' ORDER BY i.id"
        ).fetchall()


async def until(predicate, within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("bench/restart.py: the ramp did not move in time; see the daemon log in the temp folder")
        await asyncio.sleep(0.02)


async def measure(restarts: int) -> tuple[list[float], list[float]]:
    route53 = LocalRoute53()
    route53.start()
    to_lease: list[float] = []
    to_write: list[float] = []
    try:
        client = make_client(route53.url, aws_access_key_id="bench", aws_secret_access_key="bench")  # noqa: S106 - moto
        zone = client.create_hosted_zone(Name="bench.internal", CallerReference=uuid.uuid4().hex)
        zone_id = zone["HostedZone"]["Id"].split("/")[-1]
        name = "api.bench.internal"
        seed_weighted_group(client, zone_id, name, [("use1", 1, "192.0.2.10"), ("euw1", 0, "192.0.2.20")], ttl=TTL)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
        env["REGIONSHIFT_API_TOKEN"] = TOKEN
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            async with SimulatedRegion("us-east-1", seed=1) as a, SimulatedRegion("eu-west-1", seed=2) as b:
                regions = {"us-east-1": a, "eu-west-1": b}
                path = ramp_config(root, regions, route53.url, zone_id, name, port=free_port(), ttl=TTL, bake=BAKE)
                state = root / "state.sqlite"
                for run in range(restarts + 1):
                    steps = forward_steps(state) if state.exists() else []
                    if steps:  # stay down until the next step is due: the restart has a write to make
                        due = steps[-1][1] + TTL + BAKE
                        await asyncio.sleep(max(0.0, due - time.time()) + 0.2)
                    log = root / f"run-{run}.log"
                    started = time.time()
                    with log.open("wb") as out:
                        proc = await asyncio.create_subprocess_exec(
                            REGIONSHIFT, "run", "-c", str(path), env=env, stdout=out, stderr=out
                        )
                    if run == 0:
                        await start_ramp(path)
                    done = len(steps)
                    await until(lambda: state.exists() and len(forward_steps(state)) > done, 60)  # noqa: B023
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    if run > 0:
                        to_write.append(forward_steps(state)[-1][0] - started)
                        to_lease.append(lease_at(log) - started)
    finally:
        route53.stop()
    return to_lease, to_write


async def start_ramp(config: Path) -> None:
    port = re.search(r"listen: 127\.0\.0\.1:(\d+)", await asyncio.to_thread(config.read_text))
    if port is None:
        raise SystemExit(f"bench/restart.py: no listen address in {config}")
    url = f"http://127.0.0.1:{port.group(1)}/api/v1/ramps/launch/start"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("bench/restart.py: the daemon's API never answered")


def lease_at(log: Path) -> float:
    for line in log.read_text().splitlines():
        if "writer lease acquired" in line:
            return datetime.fromisoformat(line.split()[0]).timestamp()
    raise SystemExit(f"bench/restart.py: no lease in {log}")


async def import_floor(times: int) -> list[float]:
    """Start the interpreter and import what the daemon imports: no restart can be faster."""
    out = []
    for _ in range(times):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import controller.cli, controller.daemon")
        await proc.wait()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=4, help="SIGKILLs and restarts (at most 4: five steps)")
    args = parser.parse_args()
    to_lease, to_write = asyncio.run(measure(min(4, max(1, args.restarts))))
    floor = asyncio.run(import_floor(len(to_write)))

    def row(what: str, values: list[float]) -> str:
        return f"{what:44s} median {statistics.median(values):5.2f}s  max {max(values):5.2f}s  (n={len(values)})"

    print("restart after SIGKILL, a step due at the restart (3 s TTL, 1 s bake, 30 s lease, same host)")
    print(row("anchor: interpreter start + imports", floor))
    print(row("process start -> writer lease held", to_lease))
    print(row("process start -> the due step's intent", to_write))
    print(
        f"{'the daemon beyond its imports (median)':44s} {statistics.median(to_write) - statistics.median(floor):+.2f}s"
    )


if __name__ == "__main__":
    main()
