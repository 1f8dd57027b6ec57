"""The controller's own probes, run in a process of their own.

A probe's latency is measured on the event loop that runs it: while that loop is busy (judging
thousands of series, a garbage collection after a judge pass), a response that has arrived waits,
and the wait is measured as the target's. At 10,000 series one judge pass added 42 ms to the p99
of a 50 ms probe run beside it. So the controller probes as an agent does, in a process whose loop
does nothing else, and only its results cross to the daemon.

`ProbeWorker` is what the daemon holds (the same face as a `Scheduler`: `run`, `hasten`, `stats`,
`sink`); `python -m probes.worker` is the process it starts. They speak over the child's stdin and
stdout in frames (a 4-byte length, then a pickle: both ends are this same code, started by the
daemon itself, nothing else can write to them):

- to the worker: the plan first (vantage, (region, spec) pairs, the scheduler's bounds), then
  `("hasten", region, probe, options)` for each suspect, as `Scheduler.hasten` takes them;
- from the worker: `("results", [Result, ...], missed_ticks, in_flight)`, the results one turn of
  its loop made, and `("log", level, event, fields)` for each line it logs (the daemon writes it
  in its own format, marked with the worker's pid).

The worker stops when its stdin closes: when the daemon stops, and when the daemon dies however it
dies (no orphan probes on). It ignores the terminal's Ctrl-C (in a session of its own): the daemon
decides when it stops. If it exits on its own, the daemon logs why and starts it again after a
capped backoff; meanwhile the controller's vantage is silent, which the verdicts treat as silence,
never as health.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import signal
import struct
import sys
from typing import TYPE_CHECKING, Any

import structlog

from probes.scheduler import ProbeStats, Scheduler, make_prober

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from probes.results import Result
    from probes.spec import ProbeSpec

log = structlog.get_logger("regionshift.probes")

_LENGTH = struct.Struct("!I")
RESTART_FIRST = 1.0  # seconds before the first restart of a worker that exited
RESTART_CAP = 30.0  # and at most this long between two
STOP_WAIT = 5.0  # seconds a stopping worker has to finish its runs in flight before it is killed


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at the end of the stream."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        return pickle.loads(await reader.readexactly(length))  # noqa: S301 - our own child, our own pipe
    except asyncio.IncompleteReadError:
        return None


class ProbeWorker:
    """Probes `planned` from `vantage` in a child process; hands each result to `sink` here."""

    def __init__(
        self,
        planned: Sequence[tuple[str, ProbeSpec]],
        vantage: str,
        sink: Callable[[Result], None],
        *,
        max_concurrency: int = 64,
        jitter: float = 0.1,
    ) -> None:
        self.planned = list(planned)
        self.vantage = vantage
        self.sink = sink
        self.stats = ProbeStats()
        self.restarts = 0  # workers started again after one exited on its own
        self._plan = {
            "vantage": vantage,
            "probes": self.planned,
            "max_concurrency": max_concurrency,
            "jitter": jitter,
        }
        self._stdin: asyncio.StreamWriter | None = None
        self._missed_before = 0  # missed ticks of the workers before this one

    def hasten(self, region: str, probe: str, **options: Any) -> None:
        """`Scheduler.hasten`, in the worker (dropped while no worker runs: a suspicion is renewed
        on every judge pass)."""
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(frame(("hasten", region, probe, options)))

    async def run(self) -> None:
        """Probe until cancelled, starting the worker again whenever it exits on its own."""
        wait = RESTART_FIRST
        while True:
            started = asyncio.get_running_loop().time()
            why = await self._one_worker()
            self.restarts += 1
            if asyncio.get_running_loop().time() - started > RESTART_CAP:
                wait = RESTART_FIRST  # it ran a good while: a new fault, not the same one again
            log.error(
                "probe worker exited: the controller's vantage is silent until it is back",
                vantage=self.vantage,
                why=why,
                restart_in=wait,
            )
            await asyncio.sleep(wait)
            wait = min(RESTART_CAP, wait * 2)

    async def _one_worker(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "probes.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # the terminal's Ctrl-C is the daemon's to act on
        )
        assert proc.stdin is not None  # noqa: S101 - piped above
        assert proc.stdout is not None  # noqa: S101
        try:
            proc.stdin.write(frame(self._plan))
            self._stdin = proc.stdin
            while (message := await read_frame(proc.stdout)) is not None:
                self._take(message, proc.pid)
            code = await proc.wait()
            return f"pid {proc.pid} exited with code {code}"
        finally:
            self._stdin = None
            self._missed_before = self.stats.missed_ticks
            self.stats.in_flight = 0
            await _stop(proc)

    def _take(self, message: tuple[Any, ...], pid: int) -> None:
        if message[0] == "results":
            _, results, missed, in_flight = message
            self.stats.missed_ticks = self._missed_before + missed
            self.stats.in_flight = in_flight
            for result in results:
                self.stats.runs += 1
                if result.reason != "scheduled":
                    self.stats.extra_runs += 1
                try:
                    self.sink(result)
                except Exception:
                    log.exception("result sink raised", region=result.region, probe=result.probe)
        elif message[0] == "log":
            _, level, event, fields = message
            getattr(log, level, log.info)(event, worker=pid, **fields)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Close the worker's stdin (it stops), give it `STOP_WAIT` seconds, then kill it."""
    if proc.returncode is not None:
        return
    assert proc.stdin is not None  # noqa: S101 - piped
    proc.stdin.close()
    waiting = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait({waiting}, timeout=STOP_WAIT)
    if not done:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await waiting


# --- the worker process -----------------------------------------------------------------------


class _Forward:
    """The worker's logger: every line goes to the daemon, which writes it."""

    def __init__(self, send: Callable[[object], None]) -> None:
        self.send = send

    def __call__(self, _: object, level: str, event: structlog.typing.EventDict) -> str:
        message = event.pop("event", "")
        self.send(("log", level, str(message), {k: _plain(v) for k, v in event.items()}))
        raise structlog.DropEvent


def _plain(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    out = asyncio.StreamWriter(transport, protocol, None, loop)

    def send(message: object) -> None:
        if not out.is_closing():
            out.write(frame(message))

    structlog.configure(
        processors=[structlog.processors.format_exc_info, _Forward(send)],
        wrapper_class=structlog.make_filtering_bound_logger(0),
    )
    plan = await read_frame(reader)
    if plan is None:
        return  # the daemon went before it sent the plan
    made: list[Result] = []

    def flush() -> None:
        send(("results", made.copy(), scheduler.stats.missed_ticks, scheduler.stats.in_flight))
        made.clear()

    def sink(result: Result) -> None:
        if not made:
            loop.call_soon(flush)  # the results of one turn of the loop go in one frame
        made.append(result)

    scheduler = Scheduler(
        [make_prober(spec, region, plan["vantage"]) for region, spec in plan["probes"]],
        sink,
        max_concurrency=plan["max_concurrency"],
        jitter=plan["jitter"],
    )
    probing = asyncio.create_task(scheduler.run())
    while (message := await read_frame(reader)) is not None:
        _, region, probe, options = message
        scheduler.hasten(region, probe, **options)
    probing.cancel()  # stdin closed: the daemon is stopping, or gone
    with contextlib.suppress(asyncio.CancelledError):
        await probing
    with contextlib.suppress(ConnectionError):
        await out.drain()
    out.close()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_serve())
    except Exception as exc:  # noqa: BLE001 - one sentence to the daemon's stderr, never a traceback
        print(f"regionshift probe worker: stopped by an unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # `python -m probes.worker`: started by the daemon, never by hand
    sys.exit(main())
