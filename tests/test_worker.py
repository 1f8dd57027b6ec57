"""The controller's probes in a process of their own: results reach the daemon's sink, suspects are
probed harder there, the worker stops with its parent (however the parent goes) and is started
again when it exits on its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from controller.demo.world import free_port
from probes.spec import HttpProbe, TcpProbe
from probes.worker import ProbeWorker

if TYPE_CHECKING:
    from probes.results import Result


async def until(condition, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(worker: ProbeWorker):
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _stat(pid: str | int) -> tuple[str, int] | None:
    """A process's state letter and parent pid (from /proc), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def running_process(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has stopped


def children(of: int | None = None) -> set[int]:
    """Pids of the running (not zombie) children of `of` (this process)."""
    of = os.getpid() if of is None else of
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry.name)) is not None and stat[1] == of and stat[0] != "Z":
            found.add(int(entry.name))
    return found


async def test_results_cross_to_the_sink_with_their_vantage_and_a_suspect_is_probed_harder(region):
    region.set(error_ratio=1.0, error_paths=["/api/orders"])
    results: list[Result] = []
    planned = [
        ("eu-west-1", HttpProbe(name="orders", target=f"{region.url}/api/orders", interval=0.5, timeout=0.5)),
        ("eu-west-1", HttpProbe(name="healthz", target=f"{region.url}/healthz", interval=0.5, timeout=0.5)),
    ]
    worker = ProbeWorker(planned, "controller", results.append, jitter=0.0)
    before = children()
    async with running(worker):
        await until(lambda: {r.probe for r in results} == {"orders", "healthz"})
        assert len(children() - before) == 1  # one worker process
        worker.hasten("eu-west-1", "orders", every=0.02, hold=5.0, budget=100, runs=5)
        await until(lambda: worker.stats.extra_runs >= 5)
    extra = [r for r in results if r.reason == "suspicion"]
    assert len(extra) == worker.stats.extra_runs == 5  # its count, no more
    assert {r.probe for r in extra} == {"orders"}
    assert all(r.vantage == "controller" and r.region == "eu-west-1" for r in results)
    assert {r.ok for r in results if r.probe == "orders"} == {False}  # the region's failures, as made
    assert {r.error_class for r in results if r.probe == "orders"} == {"status"}
    assert all(r.ok for r in results if r.probe == "healthz")
    assert worker.stats.runs == len(results)
    assert worker.stats.in_flight == 0
    await until(lambda: children() <= before, within=3)  # stopped with its parent's task


async def test_a_worker_that_exits_is_started_again_and_says_why(silent_port):
    results: list[Result] = []
    probe = TcpProbe(name="db", target=f"127.0.0.1:{silent_port}", interval=0.2, timeout=0.2)
    worker = ProbeWorker([("eu-west-1", probe)], "controller", results.append, jitter=0.0)
    before = children()
    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            await until(lambda: len(results) >= 2)
            (pid,) = children() - before
            os.kill(pid, signal.SIGKILL)
            await until(lambda: worker.restarts == 1)
            seen = len(results)
            await until(lambda: len(results) >= seen + 2)  # probing again, from a new process
            (again,) = children() - before
            assert again != pid
    exited = [e for e in logs if e["event"].startswith("probe worker exited")]
    assert len(exited) == 1
    assert exited[0]["log_level"] == "error"
    assert exited[0]["why"] == f"pid {pid} exited with code {-signal.SIGKILL}"
    assert exited[0]["restart_in"] == 1.0


def test_the_worker_stops_when_its_parent_is_killed(tmp_path):
    """A daemon killed outright (SIGKILL, the OOM killer) leaves no probes running behind it."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, os
            from probes.spec import TcpProbe
            from probes.worker import ProbeWorker

            async def main():
                probe = TcpProbe(name="db", target="127.0.0.1:{free_port()}", interval=0.2, timeout=0.2)
                seen = asyncio.Event()
                worker = ProbeWorker([("eu-west-1", probe)], "controller", lambda r: seen.set(), jitter=0.0)
                task = asyncio.create_task(worker.run())
                await seen.wait()
                print("probing", flush=True)
                await asyncio.sleep(60)

            asyncio.run(main())
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "probing"
        (worker_pid,) = children(parent.pid)
        parent.kill()
        parent.wait(timeout=5)
        deadline = time.monotonic() + 5
        while running_process(worker_pid):
            if time.monotonic() > deadline:
                os.kill(worker_pid, signal.SIGKILL)
                raise AssertionError("the probe worker outlived its parent by 5 s")
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait(timeout=5)
        if parent.stdout is not None:
            parent.stdout.close()
