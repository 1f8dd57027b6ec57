"""End to end, the daemon as a subprocess against moto's Route 53 behind the fault proxy, one
vantage, three simulated regions, a 3 s record TTL: an evacuation and its restore keep their pace
in Route 53's own history, and a fault every region shares moves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml

from controller.daemon import STOP_WAITS_FOR_ROUTE53
from controller.demo.world import free_port, seed_weighted_group
from tests import pacing
from tests.conftest import REGIONSHIFT
from tests.faults import FaultProxy
from tests.test_shifting import TOKEN, TTL, direct_client, read_weights, watch_weights

POLICIES = Path(__file__).resolve().parent.parent / "policies"
STEP_BAKE = 1.0
SIDS = {"us-east-1": "use1", "eu-west-1": "euw1", "ap-southeast-2": "apse2"}
HOME = {"use1": 100, "euw1": 100, "apse2": 100}


def make_zone(route53) -> tuple[str, str]:
    client = direct_client(route53.url)
    zone = client.create_hosted_zone(Name=f"z{uuid.uuid4().hex[:8]}.example.com", CallerReference=uuid.uuid4().hex)
    zone_id = zone["HostedZone"]["Id"].split("/")[-1]
    name = "api." + zone["HostedZone"]["Name"].rstrip(".")
    members = [(SIDS[r], HOME[SIDS[r]], f"192.0.2.{i + 1}") for i, r in enumerate(SIDS)]
    seed_weighted_group(client, zone_id, name, members, ttl=TTL)
    return zone_id, name


def write_config(tmp_path: Path, world, endpoint: str, zone_id: str, name: str, port: int) -> Path:
    """The shipped verdict and guardrail policies, with their spans scaled down like the TTL and
    the probe interval (100 ms here, 10 s by default), and latency findings only at tenfold
    (loopback answers in a millisecond; a busy machine is not a slow region)."""
    verdicts = yaml.safe_load((POLICIES / "verdicts.yaml").read_text())["verdicts"]
    verdicts.update(window="5s", stale_after="1s", recover_after="2s")
    verdicts["slowdown"]["min_effect"] = 9
    guardrails = yaml.safe_load((POLICIES / "guardrails.yaml").read_text())
    guardrails["evacuation"].update(restore_after="3s", step_bake=f"{STEP_BAKE}s", confirm_after="1s")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"verdicts": verdicts, **guardrails}))
    probes = [
        {"kind": "http", "name": n, "target": f"{r.url}{p}", "interval": "100ms", "timeout": "100ms"}
        for r in world.values()
        for n, p in (("healthz", "/healthz"), ("orders", "/api/orders"))
    ]
    config = {
        "controller": {
            "listen": f"127.0.0.1:{port}",
            "tick": "100ms",
            "state_path": "state.sqlite",
            "route53": {
                "endpoint_url": endpoint,
                "reconcile_every": "100ms",
                "poll_interval": "50ms",
                "max_requests_per_second": 400,  # 4 a second on the world's time (100 times as fast)
            },
        },
        "policies": ["policy.yaml"],
        "regions": [
            {"name": n, "probes": [p for p in probes if p["target"].startswith(r.url)]} for n, r in world.items()
        ],
        "record_sets": [
            {
                "zone_id": zone_id,
                "name": name,
                "ttl": TTL,
                "members": [
                    {"set_identifier": SIDS[n], "region": n, "value": f"192.0.2.{i + 1}"} for i, n in enumerate(SIDS)
                ],
            }
        ],
    }
    path = tmp_path / "regionshift.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def daemon(path: Path, url: str):
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "REGIONSHIFT_API_TOKEN": TOKEN,
    }
    env.pop("PYTHONPATH", None)
    log = path.with_name("daemon.log")
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            REGIONSHIFT, "run", "-c", str(path), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=out
        )
    try:
        async with aiohttp.ClientSession(url) as http:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get("/healthz") as response:
                        if response.status == 200:
                            break
                if proc.returncode is not None or time.monotonic() > deadline:
                    pytest.fail(f"the daemon did not come up: {log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)
            yield http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            # A stop waits for a Route 53 request still in flight: a clean-clone run's daemon
            # stopped 25 s after the signal, as designed, and failed a 10 s bound here.
            await asyncio.wait_for(proc.wait(), STOP_WAITS_FOR_ROUTE53 + 5)


@contextlib.asynccontextmanager
async def running(world, route53, tmp_path: Path):
    """A fresh zone at home weights behind the fault proxy, the daemon watching the world, every
    region healthy: (proxy, the weights Route 53 held, the API, zone id, record name)."""
    zone_id, name = make_zone(route53)
    port = free_port()
    async with FaultProxy(route53.url) as proxy:
        path = write_config(tmp_path, world, proxy.url, zone_id, name, port)
        async with watch_weights(route53, zone_id, name) as held, daemon(path, f"http://127.0.0.1:{port}") as http:
            # A region has no verdict until its first judgement: wait for every one to be healthy.
            healthy = lambda s: all(r["verdict"] and r["verdict"]["status"] == "healthy" for r in s["regions"])  # noqa: E731
            await until(http, healthy, 30, "health")
            yield proxy, held, http, zone_id, name


async def state(http: aiohttp.ClientSession) -> dict:
    async with http.get("/api/v1/state") as response:
        return await response.json()


async def until(http: aiohttp.ClientSession, predicate, within: float, what: str) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        current = await state(http)
        if predicate(current):
            return current
        await asyncio.sleep(0.1)
    pytest.fail(f"{what} not reached in {within}s; record set: {current['record_sets'][0]}")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_an_evacuation_and_its_restore_keep_their_pace_in_route53s_own_history(world, route53, tmp_path):
    async with running(world, route53, tmp_path) as (proxy, held, http, zone_id, name):
        await world["eu-west-1"].refuse()  # down: every probe refused
        await until(http, lambda s: _share(s, "euw1") == 0.0, 30, "eu-west-1 evacuated")
        await world["eu-west-1"].accept()
        await until(http, lambda s: s["record_sets"][0]["reason"] == "at home weights", 40, "restored")
    changes = pacing.weights_sent(proxy.seen)
    received = pacing.from_route53(changes, HOME, TTL, STEP_BAKE)
    audited = pacing.from_audit(tmp_path / "state.sqlite", f"{name}/A", TTL, lambda _: STEP_BAKE, 300.0)
    print("\nRoute 53's history:\n" + pacing.report(received) + "\naudit log:\n" + pacing.report(audited))
    # 33% off eu-west-1 in two steps (25%, then the rest), and back the same way.
    assert [round(s.moved, 1) for s in received] == [25.0, 8.3, 25.0, 8.3]
    assert [s.early for s in received] == [0.0] * 4, pacing.report(received)
    assert [s.action for s in audited] == ["evacuation", "evacuation", "restore", "restore"]
    assert [s.early for s in audited] == [0.0] * 4, pacing.report(audited)
    assert held[0] == HOME
    assert read_weights(route53, zone_id, name) == HOME


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_every_region_failing_together_moves_nothing_and_says_why(world, route53, tmp_path):
    async with running(world, route53, tmp_path) as (proxy, held, http, _, _):
        for region in world.values():
            region.set(error_ratio=0.5)  # half of every region's API requests fail
        reasons: set[str] = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            current = await state(http)
            reasons.update(r for region in current["regions"] for r in region["verdict"]["reasons"])
            await asyncio.sleep(0.2)
        troubles = {r["name"]: r["verdict"]["troubles"] for r in current["regions"]}
    requests = proxy.count("ChangeResourceRecordSets")
    assert held == [HOME], f"Route 53 moved: {held}"
    assert requests == 0
    assert any("a shared cause" in r for r in reasons), sorted(reasons)
    assert troubles == {key: ["orders"] for key in world}


def _share(current: dict, sid: str) -> float | None:
    member = next(m for m in current["record_sets"][0]["members"] if m["set_identifier"] == sid)
    return member["observed_share"]
