"""Judge cost at scale: what one judge tick costs as the series grow, beside the floor of only
keeping their results, and what judging does to a real probe's measured latency.

Run:  .venv/bin/python bench/judge_scale.py [--sizes 18,150,1000,10000] [--ticks 30] [--warmup 1920]
                                            [--stall-ticks 60] [--probe-sizes 1000,10000] [--probes 200]
                                            [--day 150]

Each size is a world of regions x probes x vantages (18 = 3 x 2 x 3, 150 = 5 x 6 x 5, 1,000 =
20 x 10 x 5, 10,000 = 40 x 50 x 5), one result a second per series from the generated streams of
`controller/demo/streams.py` (healthy noise), judged by the daemon's judge with the shipped policy
(`policies/verdicts.yaml`). First `--warmup` simulated seconds of results fill the windows (judged
every 10th second, so baselines and caches are as in a running daemon: by default the latency
baselines' span and two verdict windows, 32 minutes, the least after which a daemon holds all it
will ever hold per series); then `--ticks` ticks, each adding one second of results and judging
once. Printed per size:

- tick p50 / p99: one judge tick (trim, every region, then the suspects: what the daemon's judge
  loop does each pass), in ms, and the share of a core that is at one tick a second;
- floor p50: adding that second of results to the windows alone (what any judge pays), in ms, and
  the tick / floor ratio (the figure that does not depend on this machine's speed that day);
- stall: the longest time the event loop went without running, while the daemon's chunked pass
  (trim, judge and suspects as generators: they yield between probes, regions and batches of
  windows, and `finish_async` lets the loop run once `STEP_BUDGET` of them ran) judges on it, in ms,
  over `--stall-ticks` passes (60 by default: at 10,000 series a full collection comes every 30 to
  60 s, and the 6 passes measured until stop 27 missed them, showing 4 ms where they took 34);
- gc max, gc/tick: over the same passes, the longest garbage collection and the collections' time
  per tick (the judge holds automatic collections while it runs: what it defers is paid after,
  and shows here and in the stall, not in the tick);
- RSS after the warm-up and at the end (MB): flat means the windows' trimming holds.

With `--day SIZE`, that many series are then fed and judged (every 10th second) for 24 simulated
hours, and RSS printed every 4 hours: flat over a day, not only over the ticks above.

Then, for `--probe-sizes`, a real HTTP probe (the daemon's `HttpProber`) against a loopback target
(a process of its own, as a real target is) that answers after a fixed 50 ms, `--probes` times
one after another while the judge loop runs on the same event loop at one tick a second: the
probe's p50 / p99 beside the same probe with no judging, so the difference is what judging adds
to every probe's latency. Measured twice per size: on the table's world after its warm-up (the
daemon's steady state), and on a world 120 s old, whose latency baselines are still young and
refreshed every 15 s (a daemon's first minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import resource
import statistics
import sys
import time
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.demo.streams import Stream
from controller.judging.detectors import detectors_for
from controller.judging.suspicion import suspect_steps, suspects
from controller.judging.verdicts import Judge, finish_async
from controller.judging.windows import WindowStore
from controller.settings.loading import load_policy
from probes.kinds.http import HttpProber
from probes.spec import HttpProbe

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

POLICY_FILE = Path(__file__).resolve().parent.parent / "policies" / "verdicts.yaml"
SHAPES = {18: (3, 2, 3), 150: (5, 6, 5), 1000: (20, 10, 5), 10000: (40, 50, 5)}
TARGET_LATENCY = 0.05
YOUNG = 120  # s: a world this young still refreshes most latency baselines every 15 s
FEED_CHUNK = 20  # results made and added between two looks at the loop (about 0.3 ms)
DAY = 24 * 3600


def rss_mb() -> float:
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


class HealthyStream(Stream):
    """The generated streams' noise, with the three-region world's latencies (20 to 140 ms, API
    calls 1.5 times that) at any number of regions: far regions do not break the objective."""

    def base_latency(self, region: str, probe: str, vantage: str) -> float:
        distance = (self.regions.index(region) + self.vantages.index(vantage)) % 3
        return (0.02 + 0.06 * distance) * (1.5 if self.probes.index(probe) % 2 else 1.0)


class World:
    """Windows and a judge for `size` series, fed one simulated second at a time."""

    def __init__(self, size: int) -> None:
        regions, probes, vantages = SHAPES[size]
        self.stream = HealthyStream(
            seed=size,
            regions=tuple(f"region-{i:02d}" for i in range(regions)),
            probes=tuple(f"probe-{i:02d}" for i in range(probes)),
            vantages=tuple(f"vantage-{i}" for i in range(vantages)),
        )
        policy = self.policy = load_policy([POLICY_FILE])[0].verdicts
        self.windows = WindowStore(policy.history)
        self.judge = Judge(detectors_for(policy), dict.fromkeys(self.stream.regions, self.stream.probes), policy)
        self.keys = [(r, p, v) for r in self.stream.regions for p in self.stream.probes for v in self.stream.vantages]
        self.second = 0

    def results(self) -> list:
        return list(chain.from_iterable(self.results_in_chunks(len(self.keys))))

    def results_in_chunks(self, size: int) -> Iterator[list]:
        """The next second's results, `size` at a time (made lazily: making them is the world's
        work, not the daemon's)."""
        t = self.second
        self.second += 1
        for start in range(0, len(self.keys), size):
            keys = self.keys[start : start + size]
            yield [self.stream.answer(*key, t + ((start + i) % 997) / 997) for i, key in enumerate(keys)]

    async def feed(self) -> None:
        """The next second's results, as the daemon takes them: one at a time as probes finish,
        over the second. Made and added here in chunks of `FEED_CHUNK` with the event loop running
        between them: making a result is the bench's work, not the daemon's, and making and adding
        100 at once (1.5 ms) held a probe's turn on the loop three times as long as a judge step."""
        for chunk in self.results_in_chunks(FEED_CHUNK):
            self.add(chunk)
            await asyncio.sleep(0)

    def add(self, results: list) -> float:
        started = time.perf_counter()
        for result in results:
            self.windows.add(result)
        return time.perf_counter() - started

    @property
    def now(self) -> float:
        return self.stream.start + self.second

    def tick(self) -> float:
        started = time.perf_counter()
        self.windows.trim(self.now)
        self.judge.judge(self.windows, self.now)
        suspects(self.windows, self.judge.probes, self.judge.verdicts, self.now, self.policy, self.judge.set_aside)
        return time.perf_counter() - started

    async def tick_async(self) -> None:
        """What the daemon's judge loop does in one pass (`Daemon.tick_async`, then its suspects),
        letting the event loop run between steps."""
        await finish_async(self.windows.trim_steps(self.now))
        await finish_async(self.judge.steps(self.windows, self.now))
        j = self.judge
        await finish_async(suspect_steps(self.windows, j.probes, j.verdicts, self.now, self.policy, j.set_aside))


async def longest_stall(world: World, ticks: int) -> tuple[float, float, float]:
    """The longest gap between two runs of a 1 ms ticker while the world is judged (chunked), the
    longest garbage collection meanwhile and the collections' time per tick (the judge holds
    collections while it runs, `collections_held`: what it defers is paid here)."""
    worst = 0.0
    done = False
    collections: list[float] = []
    started = [0.0]

    def timed(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.append(time.perf_counter() - started[0])

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    task = asyncio.create_task(ticker())
    gc.callbacks.append(timed)
    for _ in range(ticks):
        await world.feed()
        await world.tick_async()
    gc.callbacks.remove(timed)
    done = True
    await task
    return worst, max(collections, default=0.0), sum(collections) / ticks


# Warm-up seconds at the end judged every second, as the daemon judges: a judge that last looked
# 10 s ago rebuilds what it follows between passes (each probe's latency test, 2,000 of them at
# 10,000 series), and the first measured pass paid it, with a 28 ms collection after it.
SETTLE = 5


def warmed(size: int, warmup: int) -> World:
    """A world of `size` series after `warmup` simulated seconds, judged every 10th (every one
    of the last `SETTLE`)."""
    world = World(size)
    for second in range(warmup):
        world.add(world.results())
        if second % 10 == 0 or second >= warmup - SETTLE:
            world.tick()
    return world


def measure(size: int, warmup: int, ticks: int, probes: int, stall_ticks: int = 60) -> dict[str, float]:
    """The table's figures for one size; with `probes`, the probe's p50 / p99 while that same
    world is judged (measured last: it adds results, as the daemon's probes would)."""
    world = warmed(size, warmup)
    rss_warm = rss_mb()
    tick_times, floors = [], []
    for _ in range(ticks):
        floors.append(world.add(world.results()))
        tick_times.append(world.tick())
    stall, longest_gc, gc_per_tick = asyncio.run(longest_stall(world, stall_ticks))
    q = statistics.quantiles(tick_times, n=100, method="inclusive")
    rss_end = rss_mb()
    probed = asyncio.run(probe_latency(world, probes)) if probes else (math.nan, math.nan)
    return {
        "probe_p50": probed[0],
        "probe_p99": probed[1],
        "p50": statistics.median(tick_times) * 1000,
        "p99": q[98] * 1000,
        "floor": statistics.median(floors) * 1000,
        "stall": stall * 1000,
        "gc": longest_gc * 1000,
        "gc_tick": gc_per_tick * 1000,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
    }


def day(size: int, warmup: int) -> list[tuple[int, float]]:
    """RSS (MB) every 4 simulated hours while `size` series are fed and judged (every 10th
    second, as the warm-up) for 24 hours after `warmup` seconds."""
    world = World(size)
    shown = []
    for second in range(warmup + DAY):
        world.add(world.results())
        if second % 10 == 0:
            world.tick()
        if second >= warmup and (second - warmup) % (4 * 3600) == 0:
            shown.append(((second - warmup) // 3600, rss_mb()))
    shown.append((DAY // 3600, rss_mb()))
    return shown


# The loopback target: a process of its own, as a real target is, so what the judge does to this
# process's loop delays only the probe's side (a target on the judge's loop answered late, and
# that was counted as well).
SLOW_TARGET = f"""
import asyncio, contextlib, sys

async def answer(reader, writer):
    with contextlib.suppress(ConnectionError):
        await reader.readuntil(b"\\r\\n\\r\\n")
        await asyncio.sleep({TARGET_LATENCY})
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def slow_target() -> AsyncIterator[str]:
    """The URL of a loopback target that answers after `TARGET_LATENCY`, for as long as the block."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLOW_TARGET, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None  # noqa: S101 - piped
    assert proc.stdout is not None  # noqa: S101
    try:
        yield f"http://127.0.0.1:{int(await proc.stdout.readline())}/"
    finally:
        proc.stdin.close()
        await proc.wait()


async def probe_latency(world: World | None, probes: int) -> tuple[float, float]:
    """p50 and p99 (ms) of `probes` real probes in a row, with the world judged once a second
    on the same event loop."""
    async with slow_target() as target:
        return await _probe_latency(world, probes, target)


async def _probe_latency(world: World | None, probes: int, target: str) -> tuple[float, float]:
    prober = HttpProber(HttpProbe(name="slow", target=target, timeout=2.0), "r", "controller")
    stop = asyncio.Event()

    async def judge_loop() -> None:
        while not stop.is_set() and world is not None:
            await world.feed()
            await world.tick_async()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()

    judging = asyncio.create_task(judge_loop())
    latencies = []
    for _ in range(probes):
        result = await prober()
        latencies.append(result.latency)
    stop.set()
    await judging
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return statistics.median(latencies) * 1000, q[98] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="18,150,1000,10000")
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="simulated seconds of history first (default: the baselines' span + 2 windows)",
    )
    parser.add_argument("--stall-ticks", type=int, default=60, help="passes over which the stall is measured")
    parser.add_argument("--probe-sizes", default="1000,10000")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--day", type=int, default=None, help="series fed for 24 simulated hours after (RSS every 4 h)")
    args = parser.parse_args(argv)
    if args.warmup is None:
        policy = load_policy([POLICY_FILE])[0].verdicts
        args.warmup = round(policy.slowdown.baseline + 2 * policy.window)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        probe_sizes = [int(s) for s in args.probe_sizes.split(",") if s]
    except ValueError:
        parser.error("--sizes and --probe-sizes are comma-separated numbers")
    unknown = sorted(set(chain(sizes, probe_sizes, [args.day] if args.day else [])) - SHAPES.keys())
    if unknown or args.ticks < 3 or args.stall_ticks < 1 or args.warmup < 0 or args.probes < 10:
        parser.error(
            f"sizes from {sorted(SHAPES)}; --ticks at least 3, --stall-ticks at least 1, --probes at least 10,"
            " --warmup not negative"
        )
    print(f"judge scale: shipped policy, 1 result/s per series, {args.warmup} s warm-up, {args.ticks} ticks")
    head = (
        f"{'series':>7} {'tick p50':>9} {'p99':>8} {'core':>6} {'floor':>7} {'ratio':>6} {'stall':>8}"
        f" {'gc max':>8} {'gc/tick':>8} {'RSS':>14}"
    )
    print(head)
    alone = asyncio.run(probe_latency(None, args.probes)) if probe_sizes else None
    probed = {}
    for size in sizes:
        m = measure(size, args.warmup, args.ticks, args.probes if size in probe_sizes else 0, args.stall_ticks)
        if size in probe_sizes:
            probed[size] = (m["probe_p50"], m["probe_p99"])
        print(
            f"{size:>7} {m['p50']:>7.1f}ms {m['p99']:>6.1f}ms {m['p50'] / 10:>5.1f}% {m['floor']:>5.1f}ms "
            f"{m['p50'] / m['floor']:>5.1f}x {m['stall']:>6.1f}ms {m['gc']:>6.1f}ms {m['gc_tick']:>6.1f}ms"
            f" {m['rss_warm']:>5.0f}->{m['rss_end']:>4.0f} MB"
        )
    if args.day:
        shown = ", ".join(f"{hours} h {rss:.0f}" for hours, rss in day(args.day, args.warmup))
        print(f"RSS over 24 simulated hours at {args.day} series (MB): {shown}")
    if alone is not None:
        target = f"{TARGET_LATENCY * 1000:.0f} ms"
        print(f"probe to a {target} loopback target, no judging: p50 {alone[0]:.1f} ms, p99 {alone[1]:.1f} ms")
        for size in probe_sizes:
            rows = [
                (
                    f"after {args.warmup} s",
                    probed.get(size) or asyncio.run(probe_latency(warmed(size, args.warmup), args.probes)),
                )
            ]
            rows.append(
                (f"after {YOUNG} s (young baselines)", asyncio.run(probe_latency(warmed(size, YOUNG), args.probes)))
            )
            for when, (p50, p99) in rows:
                print(
                    f"  judging {size:>6} series meanwhile, {when}: p50 {p50:.1f} ms, p99 {p99:.1f} ms"
                    f" ({p99 - alone[1]:+.1f} ms at p99)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
