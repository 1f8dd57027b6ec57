"""HTTP probe throughput: regionshift's prober beside Prometheus blackbox_exporter, same run.

Run:  make bench            (installs prometheus-blackbox-exporter if missing)
 or:  .venv/bin/python bench/probe_throughput.py [--seconds 10] [--concurrency 64] [--rounds 2]

Both probers run HTTP probes, a fresh connection each, against one local target (a minimal
HTTP server in its own process) at the same concurrency:
- blackbox_exporter is driven through its /probe endpoint by a client in this process; only the
  exporter's own CPU time (from /proc) is counted.
- regionshift runs in a worker process of its own: 64 loops calling the same `HttpProber` the
  daemon uses and recording each result the way the daemon does (window + metrics); only that
  process's CPU time is counted.
The figure that matters is probes per CPU-second of the prober, printed with the ratio between
the two: absolute rates on a shared machine vary from run to run, the ratio much less.
Rounds alternate the two probers so that a noisy minute hurts both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client import CollectorRegistry

from controller.judging.windows import WindowStore
from controller.sinks.prometheus import Metrics
from probes.kinds.http import HttpProber
from probes.scheduler import run_guarded
from probes.spec import HttpProbe

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
BLACKBOX = shutil.which("prometheus-blackbox-exporter") or "/usr/bin/prometheus-blackbox-exporter"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the target ------------------------------------------------------------------------------


def serve_target(port: int) -> None:
    """A minimal HTTP/1.1 server: answers 200 'ok' once the request head is in, then closes."""

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                self.transport.write(RESPONSE)  # type: ignore[attr-defined]
                self.transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    asyncio.run(main())


# --- regionshift worker ------------------------------------------------------------------------


def regionshift_worker(target: str, seconds: float, concurrency: int) -> None:
    prober = HttpProber(HttpProbe(name="bench", target=target, interval=10, timeout=5), "local", "controller")
    windows, metrics = WindowStore(60), Metrics(CollectorRegistry())

    async def main() -> dict[str, float]:
        counts = {"ok": 0, "failed": 0}
        measuring = False
        deadline = time.perf_counter() + 1.0 + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                result = await run_guarded(prober)
                windows.add(result)
                metrics.observe(result)
                if measuring:
                    counts["ok" if result.ok else "failed"] += 1

        tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
        await asyncio.sleep(1.0)  # warm-up
        measuring = True
        cpu0, wall0 = _own_cpu(), time.perf_counter()
        await asyncio.gather(*tasks)
        cpu, wall = _own_cpu() - cpu0, time.perf_counter() - wall0
        return {
            **counts,
            "cpu": cpu,
            "wall": wall,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    print(json.dumps(asyncio.run(main())))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_regionshift(target: str, seconds: float, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", target, "--seconds", str(seconds), "--concurrency", str(concurrency)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- blackbox_exporter -------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive_blackbox(pid: int, port: int, target: str, seconds: float, concurrency: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/probe"
    params = {"target": target, "module": "http_2xx"}
    counts = {"ok": 0, "failed": 0}
    measuring = False
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        deadline = time.perf_counter() + 1.0 + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                async with http.get(url, params=params) as response:
                    body = await response.text()
                if measuring:
                    counts["ok" if "\nprobe_success 1" in body else "failed"] += 1

        tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
        await asyncio.sleep(1.0)
        measuring = True
        cpu0, wall0 = _proc_cpu(pid), time.perf_counter()
        await asyncio.gather(*tasks)
        cpu, wall = _proc_cpu(pid) - cpu0, time.perf_counter() - wall0
    return {**counts, "cpu": cpu, "wall": wall, "rss_mib": _proc_rss_mib(pid)}


def blackbox_version() -> str:
    proc = subprocess.run([BLACKBOX, "--version"], capture_output=True, text=True, check=False)
    text = (proc.stdout + proc.stderr).split()
    return text[2] if len(text) > 2 else "?"


def run_blackbox(target: str, seconds: float, concurrency: int, workdir: Path) -> dict[str, float]:
    config = workdir / "blackbox.yml"
    config.write_text(
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        [BLACKBOX, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        return asyncio.run(drive_blackbox(proc.pid, port, target, seconds, concurrency))
    finally:
        proc.terminate()
        proc.wait(10)


# --- the run -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def _row(name: str, m: dict[str, float]) -> str:
    n = m["ok"] + m["failed"]
    return (
        f"{name:<28} {int(n):>8} {n / m['wall']:>9.0f} {m['cpu']:>7.2f} {n / m['cpu']:>12.0f} "
        f"{m['cpu'] / m['wall']:>6.2f} {int(m['failed']):>7} {m['rss_mib']:>8.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per prober per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--serve-target", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_target:
        serve_target(args.serve_target)
        return 0
    if args.worker:
        regionshift_worker(args.worker, args.seconds, args.concurrency)
        return 0
    if not Path(BLACKBOX).exists():
        print("prometheus-blackbox-exporter is not installed: run `make bench` (it installs it)", file=sys.stderr)
        return 2

    with local_target() as target, tempfile.TemporaryDirectory() as tmp:
        totals = compare(
            args.rounds,
            {
                f"blackbox_exporter {blackbox_version()}": lambda: run_blackbox(
                    target, args.seconds, args.concurrency, Path(tmp)
                ),
                "regionshift": lambda: run_regionshift(target, args.seconds, args.concurrency),
            },
        )
    print(
        f"HTTP probes, fresh connection each, concurrency {args.concurrency}, "
        f"{args.rounds} x {args.seconds:g}s per prober, {os.cpu_count()} CPUs"
    )
    bb_name = next(iter(totals))
    ratio = print_table(totals)
    print(f"regionshift / {bb_name}: {ratio:.2f}x probes per CPU-second (target: at least 2x)")
    return 0


@contextlib.contextmanager
def local_target() -> Iterator[str]:
    """The target server in a process of its own; yields its URL."""
    port = _free_port()
    target_proc = subprocess.Popen([sys.executable, __file__, "--serve-target", str(port)])
    try:
        _wait_for_port(port)
        yield f"http://127.0.0.1:{port}/"
    finally:
        target_proc.terminate()
        target_proc.wait(10)


def compare(rounds: int, measures: dict[str, Callable[[], dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each prober measured once a round, alternating; their totals (RSS: the highest)."""
    totals: dict[str, dict[str, float]] = {}
    for round_number in range(1, rounds + 1):
        for name, measure in measures.items():
            m = measure()
            print(f"round {round_number}: {_row(name, m)}", file=sys.stderr)
            total = totals.setdefault(name, {"ok": 0, "failed": 0, "cpu": 0, "wall": 0, "rss_mib": 0})
            for key in ("ok", "failed", "cpu", "wall"):
                total[key] += m[key]
            total["rss_mib"] = max(total["rss_mib"], m["rss_mib"])
    return totals


def print_table(totals: dict[str, dict[str, float]]) -> float:
    """The totals as a table; returns the second prober's probes per CPU-second over the first's
    (rows after the second are only shown)."""
    columns = ("probes", "probes/s", "cpu-s", "probes/cpu-s", "cores", "failed", "rss MiB")
    widths = (8, 9, 7, 12, 6, 7, 8)
    print(f"{'prober':<28} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for name, m in totals.items():
        print(_row(name, m))
    (_, first), (_, second), *_ = totals.items()
    return ((second["ok"] + second["failed"]) / second["cpu"]) / ((first["ok"] + first["failed"]) / first["cpu"])


if __name__ == "__main__":
    sys.exit(main())
