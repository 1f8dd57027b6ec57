"""The `regionshift` command: run, validate, probe, demo.

Exit codes: 0 success, 1 failure at run time, 2 invalid usage or invalid configuration (with a
message naming the file, the field and the fix, never a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import structlog

from controller import logs
from controller.planning.operator import ACTIONS
from controller.settings.loading import ConfigError, load_config
from controller.settings.policy import record_key
from controller.settings.schema import split_listen
from controller.state.database import StateError
from controller.web.api import ListenError
from controller.web.views import line, table, text
from probes.connection import tls_trouble
from probes.spec import redact

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from controller.settings.schema import Config
    from probes.results import Result

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# Faults of the environment at run time, each with a message naming what and where.
FAULTS = (ListenError, StateError)
log = structlog.get_logger("regionshift.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regionshift",
        description="Cross-region probes, region verdicts and step-by-step Route 53 traffic shifting.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, *, required: bool = True) -> None:
        p.add_argument("-c", "--config", required=required, metavar="FILE", help="configuration file (YAML)")

    run = commands.add_parser("run", help="run the daemon: probe, judge, serve the API")
    with_config(run)
    run.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="override controller.listen")
    run.add_argument(
        "--read-only-dashboard",
        action="store_true",
        help="serve the API and the live page without operator actions (sets controller.read_only)",
    )

    validate = commands.add_parser("validate", help="check a configuration and its policy files")
    with_config(validate)

    probe = commands.add_parser("probe", help="run the configured probes and print what they see")
    with_config(probe)
    probe.add_argument("--once", action="store_true", help="run every probe once, print a table, exit")
    probe.add_argument("--region", action="append", metavar="NAME", help="only this region (repeatable)")

    plan = commands.add_parser("plan", help="print every step of a ramp: weights, shares, timing; touches nothing")
    with_config(plan)
    plan.add_argument("--ramp", required=True, metavar="NAME", help="a ramp defined in the policy files")

    ramp = commands.add_parser("ramp", help="start, pause, resume or abort a ramp on the running daemon")
    ramp.add_argument("action", choices=ACTIONS)
    ramp.add_argument("name", metavar="NAME")
    with_config(ramp)
    ramp.add_argument("--url", help="the daemon's API (default: from controller.listen)")
    ramp.add_argument("--operator", help="your name, for the audit log (default: $USER)")

    status = commands.add_parser("status", help="the running daemon's regions, record sets, ramps and agents")
    with_config(status, required=False)
    status.add_argument("--url", help="the daemon's API (default: from the configuration's controller.listen)")
    status.add_argument("--watch", action="store_true", help="redraw every 2 s until Ctrl-C")

    adopt = commands.add_parser(
        "adopt", help="accept a hand edit in Route 53 as the new baseline of a record set (ends its drift)"
    )
    adopt.add_argument("record", metavar="RECORD", help="the record set's key, NAME/TYPE (as /api/v1/state shows it)")
    with_config(adopt)
    adopt.add_argument("--reason", default="hand edit adopted", help="why, for the audit log")
    adopt.add_argument("--url", help="the daemon's API (default: from controller.listen)")
    adopt.add_argument("--operator", help="your name, for the audit log (default: $USER)")

    commands.add_parser(
        "agent",
        help="probe every region from here and publish the results over MQTT (regionshift agent --help)",
        add_help=False,
    )
    demo = commands.add_parser("demo", help="start a local world of three regions and the controller")
    demo.add_argument("--duration", type=_positive_seconds, metavar="SECONDS", help="stop by itself after this")
    demo.add_argument(
        "--scenario",
        choices=["launch", "verdicts"],
        default="launch",
        help="launch: a ramp with a failure mid-ramp, rollback and resume (default); verdicts: faults and verdicts",
    )
    demo.add_argument(
        "--listen", type=_listen, default="127.0.0.1:0", metavar="HOST:PORT", help="API address (default: a free port)"
    )
    return parser


def _version() -> str:
    try:
        return version("regionshift")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _listen(text: str) -> str:
    try:
        split_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds above zero")
    return value


LOG_OPTIONS = ("--log-level", "--log-format")


def _agent_command(argv: list[str]) -> int | None:
    """Where `agent` is in `argv` when it is the command: first, or after global log options
    only (`regionshift --log-format json agent ...` was "unrecognized arguments")."""
    i = 0
    while i < len(argv) and argv[i] != "agent":
        if argv[i] in LOG_OPTIONS:
            i += 2
        elif argv[i].split("=", 1)[0] in LOG_OPTIONS:
            i += 1
        else:
            return None
    return i if i < len(argv) else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    at = _agent_command(argv)
    if at is not None:  # called as the controller's CLI: the agent is still its own program
        from probes.agent import main as agent  # noqa: PLC0415

        return agent(argv[at + 1 :] + argv[:at])  # the global log options, as the agent's own
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        if args.command == "demo":
            return _demo(args.scenario, args.duration, args.listen)
        if args.command == "status" and args.config is None:  # the address alone is enough
            return asyncio.run(_status(_daemon_url(None, args.url), watch=args.watch))
        config = load_config(args.config)
        if args.command in ("validate", "run"):
            from controller.planning.preview import check_ramps  # noqa: PLC0415

            check_ramps(config)
        if args.command == "validate":
            return _validate(args.config, config)
        if args.command == "probe":
            _files_ready(config, args.config)
            return asyncio.run(_probe(config, args.once, args.region))
        if args.command == "plan":
            from controller.planning.preview import check_ramps, format_plan  # noqa: PLC0415

            _known_ramp(config, args.ramp)
            print(format_plan(config, args.ramp))
            check_ramps(config)  # after the plan: the steps that move too much are in it to see
            return EXIT_OK
        if args.command == "status":
            return asyncio.run(_status(_daemon_url(config, args.url), watch=args.watch))
        if args.command in ("ramp", "adopt"):
            what, path, body = _operation(config, args)
            return asyncio.run(_operate(config, what, path, body, args.url, args.operator))
        overrides: dict[str, object] = {}
        if args.listen:
            overrides["listen"] = args.listen
        if args.read_only_dashboard:
            overrides["read_only"] = True
        if overrides:
            config = config.model_copy(update={"controller": config.controller.model_copy(update=overrides)})
        _files_ready(config, args.config)
        return asyncio.run(_until_signal(lambda stop: _run(config, stop)))
    except ConfigError as exc:
        print(f"regionshift: invalid configuration\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"regionshift: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (`status | head`): nothing more to say to it
        # Python's advice: point stdout at devnull, or the flush at exit raises again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        # A command that only prints is done; the daemon (its log's reader gone) did stop early.
        return EXIT_OK if args.command in ("status", "plan", "validate") else EXIT_FAILURE
    except FAULTS as exc:  # the environment, at run time: one sentence naming what and where
        print(f"regionshift: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:  # a bug: say so in one sentence; the traceback is in the debug log
        log.debug("unexpected error", exc_info=exc)
        print(
            f"regionshift: unexpected {type(exc).__name__}: {exc} "
            "(a bug; run with --log-level debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


class UsageError(Exception):
    """A command asked for something the configuration does not have (a ramp, a record set, a
    region), or without what it needs (the API token, the daemon's address): exit 2, said in
    one sentence, not as an invalid configuration."""


def _unreachable(url: str, exc: BaseException) -> int:
    print(
        redact(
            f"regionshift: cannot reach the daemon at {url}: {exc} "
            "(is `regionshift run` running? If it listens elsewhere, give its address with --url)"
        ),
        file=sys.stderr,
    )
    return EXIT_FAILURE


def _demo(scenario: str, duration: float | None, listen: str) -> int:
    # Only the demo needs the local world.
    from controller.demo import launch, verdicts  # noqa: PLC0415
    from controller.demo.broker import BrokerError, mosquitto_missing  # noqa: PLC0415
    from controller.demo.world import MOTO_MISSING, WorldError, moto_server  # noqa: PLC0415

    needs = launch.STORY_SECONDS if scenario == "launch" else verdicts.SCRIPT_LENGTH
    if duration is not None and duration < needs:
        print(
            f"regionshift demo: --duration {duration:g}: the {scenario} story needs {needs:g}s to play out; "
            f"give {needs:g} or more (the demo ends as soon as the story has)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if scenario == "launch" and moto_server() is None:
        print(f"regionshift: {MOTO_MISSING}", file=sys.stderr)
        return EXIT_FAILURE
    if scenario == "launch" and (missing := mosquitto_missing()):
        print(f"regionshift: {missing}", file=sys.stderr)
        return EXIT_FAILURE
    run = launch.run_launch if scenario == "launch" else verdicts.run_demo
    try:
        return asyncio.run(_until_signal(lambda stop: run(stop, duration, listen)))
    except (WorldError, BrokerError) as exc:
        print(f"regionshift: {exc}", file=sys.stderr)
        return EXIT_FAILURE


async def _until_signal(body: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run `body(stop)` with SIGTERM and SIGINT setting `stop`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await body(stop)
    except BaseExceptionGroup as group:  # a part that failed inside a TaskGroup: the first cause
        raise _first_leaf(group) from None
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _daemon_url(config: Config | None, url: str | None) -> str:
    if url is not None:
        return url.rstrip("/")
    if config is None:
        raise UsageError("status needs the daemon's address: give --url URL, or -c FILE to read it from")
    host, port = config.controller.host_port
    if port == 0:
        raise UsageError(
            "controller.listen has port 0 (the daemon picks a free one when it starts): give its address "
            "with --url (the daemon's log names it: 'started api=http://...')"
        )
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"  # noqa: S104 - mapping, not binding


async def _status(url: str, *, watch: bool) -> int:
    """Print the daemon's state as text; with `watch`, redraw every 2 s until interrupted."""
    import aiohttp  # noqa: PLC0415 - only the commands that talk to a daemon are HTTP clients

    # Home and clear before each redraw on a terminal; into a file or a pipe, one page after another.
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            try:
                async with http.get(f"{url}/api/v1/state") as response:
                    state = await response.json()
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not watch:
                    return _unreachable(url, exc)
                # A watch outlives a daemon's restart: it says so and tries again (it ended at
                # the first failed fetch). Ctrl-C ends it.
                said = redact(f"{time.strftime('%H:%M:%S')} no answer from {url} ({exc or type(exc).__name__})")
                print(f"{clear}{said}; trying again every 2s", flush=True)
                await asyncio.sleep(2.0)
                continue
            page = text(state, url, time.time())
            if not watch:
                print(page)
                return EXIT_OK
            print(clear + page, flush=True)
            await asyncio.sleep(2.0)


def _operation(config: Config, args: argparse.Namespace) -> tuple[str, str, dict[str, str] | None]:
    """What an operator command does (in words), its API path and body, checked against the
    configuration first."""
    if args.command == "ramp":
        if args.name not in config.policy.ramps:
            known = ", ".join(config.policy.ramps) or "none"
            raise UsageError(f"no ramp named {args.name!r} in the policy files; known: {known}")
        return f"{args.action} {args.name}", f"/api/v1/ramps/{args.name}/{args.action}", None
    keys = [rs.key for rs in config.record_sets]
    key = record_key(args.record)  # a bare name is an A record's, as in a ramp's `record_set`
    if key not in keys:
        raise UsageError(f"no record set {args.record!r} in the configuration; known: {', '.join(keys) or 'none'}")
    return f"adopt {key}", f"/api/v1/records/{key}/adopt", {"reason": args.reason}


async def _operate(
    config: Config, what: str, path: str, body: dict[str, str] | None, url: str | None, operator: str | None
) -> int:
    """POST an operator's action to the running daemon, with its token and the operator's name."""
    import aiohttp  # noqa: PLC0415 - only the operator commands are HTTP clients

    token_env = config.controller.api_token_env
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise UsageError(f"set {token_env} to the daemon's API token (controller.api_token_env)")
    url = _daemon_url(config, url)
    headers = {"Authorization": f"Bearer {token}", "X-Regionshift-Operator": operator or os.environ.get("USER", "cli")}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.post(f"{url}{path}", headers=headers, json=body) as response,
        ):
            answer = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _unreachable(url, exc)
    if response.status == 200:  # noqa: PLR2004 - HTTP OK
        if "ramp" in answer and str(answer["reason"]).startswith("abort requested"):
            # Taken at the daemon's next reconcile: "paused (abort requested ...)" read as if the
            # abort had left it paused, while the log said aborted.
            was = answer["status"]
            print(f"ramp {answer['ramp']}: abort requested (it was {was}); the daemon aborts it at its next reconcile")
        elif "ramp" in answer:
            print(f"ramp {answer['ramp']}: {answer['status']} ({answer['reason']})")
        else:
            weights = ", ".join(f"{sid}={weight}" for sid, weight in answer["adopted"].items())
            print(f"{answer['record']}: adopted {weights} as the new baseline; ramps it paused stay paused")
        return EXIT_OK
    error = answer.get("error", response.status) if isinstance(answer, dict) else response.status
    print(f"regionshift: {what}: {error}", file=sys.stderr)
    return EXIT_FAILURE


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first fault in a group (a faulty part stops the others, whose cancellations follow),
    else its first exception."""
    chosen: BaseException = group.subgroup(FAULTS) or group
    while isinstance(chosen, BaseExceptionGroup):
        chosen = chosen.exceptions[0]
    return chosen


def _known_ramp(config: Config, name: str) -> None:
    """`plan --ramp NAME` of a ramp no policy file has: a usage error (the files are fine)."""
    if name not in config.policy.ramps:
        known = ", ".join(config.policy.ramps) or "none"
        raise UsageError(f"--ramp {name!r}: no such ramp in the policy files; known: {known}")


def _files_ready(config: Config, path: str) -> None:
    """`_files_needed`, its error naming the configuration file (`path`) first, as every
    configuration error does."""
    try:
        _files_needed(config)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _files_needed(config: Config) -> None:
    """The probes' CA files and the agents' broker password and TLS files, read before anything
    starts (`run`, `probe`; not `validate`, which may run where they are not): without them the
    daemon came up, then stopped with "unexpected LookupError (a bug)" (the password) or retried
    for ever as "broker unreachable" (a missing CA file). A UsageError naming the field."""
    for i, region in enumerate(config.regions):  # the probes' CA files too: each run failed "config" else
        for j, spec in enumerate(region.probes):
            checked = getattr(spec, "tls", None)
            files = tls_trouble(("ca_file", checked.ca_file)) if checked is not None else None
            if files is not None:
                raise UsageError(f"regions[{i}].probes[{j}].tls.{files} (probe {region.name}/{spec.name})")
    agents = config.agents
    if agents is None:
        return
    if agents.password is not None:
        try:
            agents.password.read()
        except LookupError as exc:
            raise UsageError(f"agents.password: {exc}") from exc
    if agents.tls is not None:
        tls = agents.tls
        files = tls_trouble(("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file))
        if files is not None:
            raise UsageError(f"agents.tls.{files}")


async def _run(config: Config, stop: asyncio.Event) -> int:
    from controller.acting.errors import Route53Error  # noqa: PLC0415 - keep `validate` light
    from controller.daemon import Daemon  # noqa: PLC0415

    try:
        await Daemon(config).run(stop)
    except Route53Error as exc:  # a client that cannot even be made (an AWS profile that is not there)
        print(f"regionshift: Route 53: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _validate(path: str, config: Config) -> int:
    probes = sum(len(r.probes) for r in config.regions)
    print(
        f"{path}: ok: {len(config.regions)} regions, {probes} probes, "
        f"{len(config.record_sets)} record sets, {len(config.policies)} policy files"
    )
    return EXIT_OK


async def _probe(config: Config, once: bool, regions: list[str] | None) -> int:  # noqa: FBT001
    from probes.scheduler import Scheduler, make_prober, run_once  # noqa: PLC0415

    known = [r.name for r in config.regions]
    for name in regions or []:
        if name not in known:
            raise UsageError(f"--region {name!r}: not in the configuration; known: {', '.join(known)}")
    vantage = config.controller.vantage
    probers = [
        make_prober(spec, r.name, vantage)
        for r in config.regions
        if not regions or r.name in regions
        for spec in r.probes
    ]
    if not probers:
        print("no probes configured", file=sys.stderr)
        return EXIT_FAILURE
    if once:
        results = await run_once(probers, config.controller.max_concurrency)
        print(format_table(results))
        return EXIT_OK if all(r.ok for r in results) else EXIT_FAILURE
    print(_HEADER)
    await Scheduler(
        probers, lambda r: print(_row(r), flush=True), max_concurrency=config.controller.max_concurrency
    ).run()
    return EXIT_OK  # pragma: no cover - runs until interrupted


_COLUMNS = ("REGION", "PROBE", "OK", "STATUS", "TOTAL", "DNS", "CONNECT", "TLS", "FIRST BYTE", "DETAIL")
# Widths for streamed rows, which cannot be sized from the content ahead of time.
_STREAM_WIDTHS = (16, 14, 4, 6, 9, 8, 9, 8, 10, 0)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}ms"


def _cells(r: Result) -> tuple[str, ...]:
    detail = r.error or ""
    expires = r.extra.get("cert_expires_in_seconds")
    if expires is not None and r.error_class != "cert_expiry":  # that error says it already
        detail = (detail + "; " if detail else "") + f"cert expires in {expires / 86400:.0f}d"
    return (
        r.region,
        r.probe,
        "yes" if r.ok else "NO",
        str(r.status or "-"),
        _ms(r.latency),
        _ms(r.phases.get("dns")),
        _ms(r.phases.get("connect")),
        _ms(r.phases.get("tls")),
        _ms(r.phases.get("first_byte")),
        detail,
    )


_HEADER = line(_COLUMNS, _STREAM_WIDTHS)


def _row(r: Result) -> str:
    return line(_cells(r), _STREAM_WIDTHS)


def format_table(results: Sequence[Result]) -> str:
    failed = sum(not r.ok for r in results)
    rows = table([_COLUMNS, *(_cells(r) for r in results)])
    return "\n".join([*rows, f"{len(results) - failed} probes passed, {failed} failed"])
