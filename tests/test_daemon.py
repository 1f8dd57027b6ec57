"""The daemon against simulated regions: probes, verdicts, metrics, state API, orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import signal
import socket
import subprocess
import time

import aiohttp
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from controller import logs
from controller.daemon import Daemon
from controller.demo.world import free_port
from controller.judging.verdicts import Verdict
from controller.settings.policy import Policy
from controller.settings.schema import Config, ControllerSettings, Member, RecordSet, Region, Route53Settings
from controller.state.database import StateError
from controller.state.store import Store
from probes.results import Result
from probes.spec import HttpProbe
from tests.conftest import REGIONSHIFT, SHIPPED_VERDICTS
from tests.policies import FAST


def world_config(world, policy=FAST, interval=0.1) -> Config:
    def probes(r):
        return [
            HttpProbe(name="healthz", target=r.url + "/healthz", interval=interval, timeout=interval),
            HttpProbe(name="orders", target=r.url + "/api/orders", interval=interval, timeout=interval),
        ]

    return Config(
        controller=ControllerSettings(listen="127.0.0.1:0", tick=0.1),
        regions=[Region(name=name, probes=probes(r)) for name, r in world.items()],
        policy=Policy(verdicts=policy),
    )


class Running:
    def __init__(self, daemon: Daemon, stop_within: float = 5.0) -> None:
        self.daemon = daemon
        self.stop = asyncio.Event()
        self.stop_within = stop_within
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self.daemon.run(self.stop), name="daemon under test")
        await asyncio.wait_for(self.daemon.started.wait(), 5)
        self.http = aiohttp.ClientSession(self.daemon.url)
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        self.stop.set()
        await asyncio.wait_for(self.task, self.stop_within)

    async def status_becomes(self, region: str, status: str, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            verdict = self.daemon.judge.verdicts.get(region)
            if verdict is not None and verdict.status == status:
                return
            await asyncio.sleep(0.05)
        verdict = self.daemon.judge.verdicts.get(region)
        pytest.fail(f"{region} did not become {status} within {within}s; it is {verdict}")


async def test_daemon_judges_each_region_and_flags_a_partial_failure_by_path(world):
    daemon = Daemon(world_config(world))
    async with Running(daemon) as running:
        for name in world:
            await running.status_becomes(name, "healthy")
        world["eu-west-1"].set(error_ratio=0.4)  # /api/ fails 40%, /healthz stays 200
        await running.status_becomes("eu-west-1", "degraded")
        reasons = daemon.judge.verdicts["eu-west-1"].reasons
        assert any(r.startswith("orders: ") and "status x" in r for r in reasons), reasons
        assert not any(r.startswith("healthz") for r in reasons)
        assert daemon.judge.verdicts["us-east-1"].status == "healthy"

        await world["ap-southeast-2"].refuse()
        await running.status_becomes("ap-southeast-2", "unhealthy", within=3)
        await world["ap-southeast-2"].accept()
        world["eu-west-1"].heal()
        await running.status_becomes("eu-west-1", "healthy", within=8)
        await running.status_becomes("ap-southeast-2", "healthy", within=8)


async def test_metrics_carry_the_fixed_names_with_region_labels(world):
    daemon = Daemon(world_config(world))
    async with Running(daemon) as running:
        await running.status_becomes("us-east-1", "healthy")
        response = await running.http.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}

    results = families["regionshift_probe_results"].samples
    ok = [s for s in results if s.name == "regionshift_probe_results_total" and s.labels["outcome"] == "success"]
    assert {(s.labels["region"], s.labels["probe"], s.labels["vantage"]) for s in ok} == {
        (r, p, "controller") for r in world for p in ("healthz", "orders")
    }
    assert all(s.value > 0 for s in ok)
    # Outcome series exist before the first failure, for rate() in alerts and dashboards.
    assert {s.labels["outcome"] for s in results if s.name.endswith("_total")} == {"success", "failure", "timeout"}

    duration = families["regionshift_probe_duration_seconds"].samples
    counts = [s for s in duration if s.name == "regionshift_probe_duration_seconds_count"]
    assert {s.labels["region"] for s in counts} == set(world)
    # Buckets fine enough to tell a 52 ms region from a 92 ms one (0.05, 0.1 did not).
    bounds = sorted({float(s.labels["le"]) for s in duration if s.name.endswith("_bucket")} - {math.inf})
    assert any(0.052 <= b < 0.092 for b in bounds), bounds
    assert all(b / a <= 1.5 + 1e-9 for a, b in itertools.pairwise(bounds) if 0.02 <= a < 1.0), bounds
    # No `_created` series (a quarter of the exposition, which Prometheus does not ingest).
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]

    status = {(s.labels["region"], s.labels["status"]): s.value for s in families["regionshift_region_status"].samples}
    assert status[("us-east-1", "healthy")] == 1
    assert status[("us-east-1", "unknown")] == 0
    assert sum(v for (region, _), v in status.items() if region == "us-east-1") == 1


async def test_metric_values_match_the_probes_that_ran(world):
    daemon = Daemon(world_config(world))
    async with Running(daemon) as running:
        await running.status_becomes("us-east-1", "healthy")
    value = daemon.registry.get_sample_value(
        "regionshift_probe_results_total",
        {"region": "us-east-1", "probe": "healthz", "vantage": "controller", "outcome": "success"},
    )
    served = world["us-east-1"].served["/healthz"]
    # Every probe the region answered was counted once; at most one was cut off by the stop
    # after the region answered and before its result was recorded.
    assert value is not None
    assert served - value in (0, 1)


async def test_state_api_shows_regions_verdicts_record_sets_and_events(world):
    daemon = Daemon(world_config(world))
    async with Running(daemon) as running:
        await running.status_becomes("eu-west-1", "healthy")
        world["eu-west-1"].set(error_ratio=1.0)
        await running.status_becomes("eu-west-1", "degraded")
        response = await running.http.get("/api/v1/state")
        assert response.status == 200
        state = await response.json()
        health = await running.http.get("/healthz")
        assert (health.status, await health.json()) == (200, {"status": "ok"})

    regions = {r["name"]: r for r in state["regions"]}
    assert set(regions) == set(world)
    eu = regions["eu-west-1"]
    assert eu["verdict"]["status"] == "degraded"
    assert eu["verdict"]["evidence"]["threshold"]["orders"]["errors"]["status"] > 0
    assert [p["name"] for p in eu["probes"]] == ["healthz", "orders"]
    kinds = [(e["region"], e["from"], e["to"]) for e in state["events"] if e["region"] == "eu-west-1"]
    assert kinds[:2] == [("eu-west-1", None, "unknown"), ("eu-west-1", "unknown", "healthy")]
    # Then degraded: at once, or through unknown while the peers' results are too few to tell the
    # failing region apart (never healthy again in between).
    assert [to for _, _, to in kinds[2:]] in (["degraded"], ["unknown", "degraded"]), kinds
    assert state["record_sets"] == []
    assert state["ramps"] == []


async def test_stopping_ends_every_task_in_order(world):
    daemon = Daemon(world_config(world))
    async with Running(daemon) as running:
        await running.status_becomes("us-east-1", "healthy")
    assert all(t.done() for t in daemon._tasks)
    assert daemon.scheduler.stats.in_flight == 0
    # The autouse fixture fails this test if any task is left running.


def start_daemon(write, world_urls: dict[str, str], port: int, env):
    probe = "{{kind: http, name: healthz, target: '{url}/healthz', interval: 200ms, timeout: 200ms}}"
    probes = "".join(
        f"  - name: {name}\n    probes:\n      - {probe.format(url=url)}\n" for name, url in world_urls.items()
    )
    path = write("regionshift.yaml", f"controller: {{listen: '127.0.0.1:{port}', tick: 100ms}}\nregions:\n{probes}")
    return subprocess.Popen(
        [REGIONSHIFT, "--log-format", "json", "run", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


async def wait_for_json(url: str, within: float = 10.0) -> dict:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as response:
                    return await response.json()
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_command_serves_and_shuts_down_cleanly_on_signal(world, write, cli_env, sig):
    port = free_port()
    proc = start_daemon(write, {n: r.url for n, r in world.items()}, port, cli_env)
    try:
        deadline = time.monotonic() + 10
        while True:
            state = await wait_for_json(f"http://127.0.0.1:{port}/api/v1/state")
            if all(r["verdict"] and r["verdict"]["status"] == "healthy" for r in state["regions"]):
                break
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.2)
        proc.send_signal(sig)
        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    events = [json.loads(line)["event"] for line in err.splitlines()]
    assert events[0] == "started"
    assert events[-2:] == ["stopping", "stopped"]
    assert "verdict changed" in events


async def test_run_command_reports_a_port_in_use_and_exits_1(world, write, cli_env):
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        proc = start_daemon(write, {"eu-west-1": world["eu-west-1"].url}, port, cli_env)
        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert proc.returncode == 1
    assert f"regionshift: cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_a_flapping_probe_logs_failing_once_and_recovered_after_consecutive_passes(world, capsys):
    logs.configure("info", "json")
    daemon = Daemon(world_config(world))

    def outcome(ok: bool, at: float) -> Result:
        return Result("eu-west-1", "orders", "controller", at, ok, 0.01, error_class=None if ok else "status")

    for i, ok in enumerate([False, True, False, True, True, False, True, True, True, True]):
        daemon.record(outcome(ok, 1000.0 + i))
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["event"], e.get("error_class")) for e in lines] == [
        ("probe failing", "status"),
        ("probe recovered", None),
    ]


async def test_daemon_turns_a_region_failing_forty_percent_of_api_calls_degraded_by_the_sequential_test(world):
    # The shipped detection policy, on a shorter window, with the fixed ratio limits off so the
    # verdict can only come from the sequential test. /healthz stays 200 throughout.
    policy = SHIPPED_VERDICTS.model_copy(
        update={
            "window": 5.0,
            "stale_after": 1.0,
            "recover_after": 1.0,
            "degraded_below": 0.0,
            "unhealthy_below": 0.0,
        }
    )
    daemon = Daemon(world_config(world, policy))
    async with Running(daemon) as running:
        for name in world:
            await running.status_becomes(name, "healthy")
        world["eu-west-1"].set(error_ratio=0.4)
        await running.status_becomes("eu-west-1", "degraded", within=3)
        verdict = daemon.judge.verdicts["eu-west-1"]
        errors = verdict.evidence["errors"]["orders"]
        assert errors["llr"] >= errors["threshold"]
        assert [r for r in verdict.reasons if "probes failed in the last" in r and r.startswith("orders: ")], (
            verdict.reasons
        )
        assert not any(r.startswith("healthz") for r in verdict.reasons)
        assert daemon.judge.verdicts["us-east-1"].status == "healthy"


async def test_a_daemon_without_an_api_token_says_at_start_that_operator_actions_are_refused(
    world, capsys, monkeypatch
):
    monkeypatch.delenv("REGIONSHIFT_API_TOKEN", raising=False)
    logs.configure("info", "json")
    async with Running(Daemon(world_config(world))):
        pass
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    warned = [e for e in lines if e["event"].startswith("no API token")]
    assert len(warned) == 1
    assert warned[0]["set"] == "REGIONSHIFT_API_TOKEN"
    assert warned[0]["level"] == "warning"


def test_whitespace_around_the_api_token_is_not_part_of_it(world, monkeypatch):
    monkeypatch.setenv("REGIONSHIFT_API_TOKEN", "  s3cret\n")
    assert Daemon(world_config(world)).api_token() == "s3cret"
    monkeypatch.setenv("REGIONSHIFT_API_TOKEN", " \n")
    assert Daemon(world_config(world)).api_token() is None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cut_off_config(world, tmp_path, endpoint: str) -> Config:
    config = world_config(world)
    rs = RecordSet(
        zone_id="Z1ABC",
        name="api.example.com",
        members=[Member(set_identifier=r[:4], region=r, value=f"192.0.2.{i + 1}") for i, r in enumerate(world)],
    )
    settings = config.controller.model_copy(
        update={
            "state_path": str(tmp_path / "state.sqlite"),
            "route53": Route53Settings(
                endpoint_url=endpoint, reconcile_every=0.1, max_attempts=1, max_requests_per_second=400
            ),
        }
    )
    return config.model_copy(update={"record_sets": [rs], "controller": settings})


async def until(predicate, within: float = 10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    pytest.fail("condition not reached")


@pytest.mark.parametrize(
    ("credentials", "kind", "says"),
    [(True, "retryable", "Route 53: network: "), (False, "no_credentials", "Route 53: no AWS credentials")],
    ids=["route53 unreachable", "no credentials"],
)
async def test_a_daemon_cut_off_from_route53_stays_healthy_and_says_so_in_healthz_and_metrics(
    world, tmp_path, monkeypatch, credentials, kind, says
):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role lookup: loopback only
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    daemon = Daemon(cut_off_config(world, tmp_path, f"http://127.0.0.1:{closed_port()}"))
    async with Running(daemon) as running:
        errors = {"record": "api.example.com/A", "kind": kind}

        async def counted() -> bool:
            return (daemon.registry.get_sample_value("regionshift_route53_errors_total", errors) or 0) >= 2

        await until(counted)
        async with running.http.get("/healthz") as response:
            health = (response.status, await response.json())
        age = daemon.registry.get_sample_value(
            "regionshift_route53_last_read_age_seconds", {"record": "api.example.com/A"}
        )
        other = "terminal" if kind != "terminal" else "retryable"
        precreated = daemon.registry.get_sample_value(
            "regionshift_route53_errors_total", {"record": "api.example.com/A", "kind": other}
        )
        await running.status_becomes("us-east-1", "healthy")  # probing and judging go on
    assert health[0] == 200
    assert health[1]["status"] == "degraded"
    assert health[1]["actuation"]["api.example.com/A"].startswith(says)
    assert age is not None
    assert age > 0
    assert precreated == 0.0


async def test_a_region_failing_now_and_then_is_probed_harder_with_its_peers_on_that_probe_only(world, capsys):
    world["eu-west-1"].set(error_ratio=0.15)  # /api/ fails 15%, /healthz stays 200
    logs.configure("info", "json")
    daemon = Daemon(world_config(world, interval=0.5))
    async with Running(daemon):
        await asyncio.sleep(4)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    hastened = {(e["region"], e["probe"]) for e in events if e["event"] == "probing a suspect harder"}
    # The suspect, and the same probe in its peers (compared over the same seconds); nothing else.
    # (How many extra runs follow is chance at 15%: until the evidence clears or a verdict holds.)
    assert hastened == {(region, "orders") for region in world}
    why = next(e["why"] for e in events if e.get("region") == "eu-west-1" and e["event"] == "probing a suspect harder")
    assert why.startswith("failed ")

    def runs(region: str, probe: str, reason: str) -> float:
        labels = {"region": region, "probe": probe, "vantage": "controller", "reason": reason}
        return daemon.registry.get_sample_value("regionshift_probe_runs_total", labels) or 0.0

    assert all(runs(region, "healthz", "suspicion") == 0 for region in world)
    assert daemon.scheduler.stats.extra_runs == sum(runs(region, "orders", "suspicion") for region in world)
    assert daemon.scheduler.stats.runs == sum(
        runs(region, probe, reason)
        for region in world
        for probe in ("healthz", "orders")
        for reason in ("scheduled", "suspicion")
    )


async def test_latency_baselines_are_saved_at_a_stop_and_a_restart_starts_from_them(world, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = cut_off_config(world, tmp_path, f"http://127.0.0.1:{closed_port()}")
    daemon = Daemon(config)
    keys = {(region, probe, "controller") for region in world for probe in ("healthz", "orders")}

    async def every_key_has_one() -> bool:
        return set(daemon.baselines.current()) == keys

    # A stop waits for a Route 53 call in flight (to a closed port here): on a loaded machine that
    # can take longer than the 5 s other tests allow, and how long is not what this test checks.
    async with Running(daemon, stop_within=30):
        await until(every_key_has_one, within=30)  # 40 results a key: the older half makes the first one
    saved = daemon.baselines.current()
    async with Store(tmp_path / "state.sqlite") as store:
        stored = await store.baselines.load()
    assert stored == saved  # as at the stop
    restarted = Daemon(config)
    async with Running(restarted, stop_within=30):
        assert set(restarted.baselines.stored) == keys
        assert all(restarted.baselines.stored[k] == stored[k] for k in keys)

        async def tried_route53() -> bool:  # stopped once its first Route 53 call is over, not during it
            errors = {"record": "api.example.com/A", "kind": "retryable"}
            return (restarted.registry.get_sample_value("regionshift_route53_errors_total", errors) or 0) >= 1

        await until(tried_route53)


async def test_a_state_file_that_cannot_take_the_baselines_at_a_stop_still_sees_the_lease_released(
    world, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = cut_off_config(world, tmp_path, f"http://127.0.0.1:{closed_port()}")
    daemon = Daemon(config)
    tried: list[int] = []

    async def full_disk(self, baselines) -> None:
        tried.append(len(baselines))
        raise StateError(f"state file {tmp_path / 'state.sqlite'}: the disk is full")

    monkeypatch.setattr("controller.state.baselines.StoredBaselines.save", full_disk)

    async def has_a_baseline_and_the_lease() -> bool:
        reconciler = daemon.reconciler
        return bool(daemon.baselines.current()) and reconciler is not None and reconciler.lease_token is not None

    async with Running(daemon, stop_within=30):
        await until(has_a_baseline_and_the_lease, within=30)
    assert tried, "the stop tried to save the baselines"
    async with Store(tmp_path / "state.sqlite") as store:
        assert await store.lease("standby", 10).acquire(time.time()) is not None  # released, not left to expire


def test_a_failure_wakes_the_judge_only_when_it_can_change_a_verdict(world):
    daemon = Daemon(world_config(world))
    region = next(iter(world))

    def wakes(probe: str, vantage: str = "controller") -> bool:
        daemon._judge_wake.clear()
        daemon.record(Result(region, probe, vantage, time.time(), ok=False, latency=0.0, error_class="timeout"))
        return daemon._judge_wake.is_set()

    assert wakes("orders")  # nothing judged yet
    held = Verdict(region, "degraded", ("orders: failing",), {}, 0.0, 0.0, frozenset({"orders"}))
    daemon.judge.verdicts[region] = held
    assert not wakes("orders")  # already held against the region
    assert wakes("healthz")  # another probe: news
    daemon.judge.set_aside = {"controller": "sees every region failing"}
    assert not wakes("healthz")  # from a vantage set aside


async def test_a_judge_pass_longer_than_the_tick_is_followed_by_as_long_a_wait(world, monkeypatch):
    """A pass that holds the loop (judging at a scale the tick cannot carry) is followed by a wait
    at least as long: probes keep half the loop. Said once when it starts and once when passes
    keep pace again; every pass is in the judge duration histogram."""
    daemon = Daemon(world_config(world))  # a 0.1 s tick
    starts: list[float] = []

    async def pass_taking(seconds: list[float]) -> list:
        starts.append(time.monotonic())
        time.sleep(seconds.pop(0) if seconds else 0.0)  # noqa: ASYNC251 - holding the loop is the point
        return []

    took = [0.25, 0.25, 0.25]
    monkeypatch.setattr(daemon, "tick_async", lambda: pass_taking(took))
    with structlog.testing.capture_logs() as logs:
        judging = asyncio.create_task(daemon._judge_loop())
        while len(starts) < 6:
            await asyncio.sleep(0.02)
        judging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await judging
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.5 - 0.01 for gap in gaps[:3]), gaps  # 0.25 s judging, then 0.25 s for the rest
    assert all(gap < 0.5 for gap in gaps[3:]), gaps  # quick passes again: the tick's pace
    events = [e["event"] for e in logs if e["event"].startswith("judge")]
    assert events == ["judge behind its tick", "judge keeps pace again"], events
    assert daemon.metrics.registry.get_sample_value("regionshift_judge_duration_seconds_count") >= 6


async def test_a_daemon_whose_reads_alone_need_more_than_the_request_rate_says_so_at_start(world, tmp_path):
    config = cut_off_config(world, tmp_path, f"http://127.0.0.1:{closed_port()}")
    r53 = config.controller.route53.model_copy(update={"max_requests_per_second": 4.0})  # reads: 10 a second
    config = config.model_copy(update={"controller": config.controller.model_copy(update={"route53": r53})})
    with structlog.testing.capture_logs() as logs:
        async with Running(Daemon(config)):
            pass
    told = [e for e in logs if e["event"].startswith("Route 53 reads alone need more")]
    assert [(e["log_level"], e["reads_per_second"], e["max_requests_per_second"]) for e in told] == [
        ("warning", 10.0, 4.0)
    ]
