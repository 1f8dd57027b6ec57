"""SIGKILL during a ramp, again and again, including between an intent and its result."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import aiohttp
import pytest

from controller.store import Store
from controller.world import free_port
from tests.conftest import REGIONSHIFT
from tests.faults import FaultProxy
from tests.test_shifting import PLANNED, TOKEN, make_zone, read_weights, watch_weights


def write_config(tmp_path, regions, endpoint, zone_id, name, port) -> str:
    (tmp_path / "policy.yaml").write_text(
        "verdicts: {window: 3s, stale_after: 1s, min_samples: 3, degraded_below: 0.9}\n"
        f"ramps:\n  launch:\n    record_set: {name}\n    waves: [[eu-west-1]]\n    steps: [1, 5, 10, 25, 50]\n"
        "    bake: 300ms\n    start_gate: 300ms\n"
    )
    probe = "{{kind: http, name: orders, target: '{url}/api/orders', interval: 100ms, timeout: 100ms}}"
    probes = "".join(f"  - name: {n}\n    probes:\n      - {probe.format(url=r.url)}\n" for n, r in regions.items())
    path = tmp_path / "regionshift.yaml"
    path.write_text(
        f"controller:\n  listen: 127.0.0.1:{port}\n  tick: 100ms\n  state_path: state.sqlite\n"
        f"  route53: {{endpoint_url: '{endpoint}', reconcile_every: 50ms, poll_interval: 20ms, lease_ttl: 1s}}\n"
        f"policies: [policy.yaml]\nregions:\n{probes}"
        f"record_sets:\n  - zone_id: {zone_id}\n    name: {name}\n    ttl: 0\n    members:\n"
        "      - {set_identifier: use1, region: us-east-1, value: 192.0.2.10}\n"
        "      - {set_identifier: euw1, region: eu-west-1, value: 192.0.2.20}\n"
    )
    return str(path)


async def api_state(http: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with http.get(f"{url}/api/v1/state") as response:
            return await response.json()
    except aiohttp.ClientConnectionError:
        return None


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigkill_anywhere_in_a_ramp_never_leaves_unplanned_weights_or_unrecorded_changes(
    two_regions, route53, tmp_path
):
    zone_id, name = make_zone(route53)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "REGIONSHIFT_API_TOKEN": TOKEN,
    }
    env.pop("PYTHONPATH", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(7)
    async with FaultProxy(route53.url) as proxy, aiohttp.ClientSession() as http:
        proxy.slow("ChangeResourceRecordSets", 0.4, times=1000)  # a wide window between intent and result
        path = write_config(tmp_path, two_regions, proxy.url, zone_id, name, port)
        async with watch_weights(route53, zone_id, name) as held:
            kills, in_flight_kills, done = await kill_until_done(http, url, path, env, proxy, rng)
        await asyncio.sleep(0.5)  # a request the proxy was still holding lands now, or never
    final = read_weights(route53, zone_id, name)
    if final not in held:
        held.append(final)

    assert done, f"the ramp did not finish in {kills} restarts; Route 53 held {held}"
    assert all(w in PLANNED for w in held), f"unplanned weights: {[w for w in held if w not in PLANNED]}"
    assert final == PLANNED[-1]
    async with Store(tmp_path / "state.sqlite") as store:
        events = await store.events(limit=1000)
        assert all([await store.open_intent(f"{name}/A") is None])
    applied = [e["to_weights"] for e in events if e["phase"] == "result" and e["outcome"] == "applied"]
    assert all(w in applied for w in held if w != PLANNED[0]), "every change Route 53 held is in the audit log"
    settled = [e for e in events if e["phase"] == "result" and (e["error"] or "").startswith("result recorded later")]
    assert in_flight_kills >= 3, f"only {in_flight_kills} kills landed between intent and result"
    assert settled, "no intent was left open by a kill: the test did not reach the case it is for"
    print(f"{kills} kills, {in_flight_kills} during a change request, {len(settled)} intents settled after restart")


async def kill_until_done(http, url, path, env, proxy, rng) -> tuple[int, int, bool]:
    """Start the daemon, let it work a little, SIGKILL it; again, until the ramp is done."""
    kills = in_flight_kills = 0
    done = False
    deadline = time.monotonic() + 150
    while not done and time.monotonic() < deadline:
        proc = await asyncio.create_subprocess_exec(
            REGIONSHIFT,
            "run",
            "-c",
            path,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        while (state := await api_state(http, url)) is None:
            await asyncio.sleep(0.05)
        ramp = state["ramps"][0]
        if ramp["status"] == "pending":
            async with http.post(f"{url}/api/v1/ramps/launch/start", headers={"Authorization": f"Bearer {TOKEN}"}):
                pass
        if ramp["status"] == "done":
            done = True
        elif kills % 2 == 0:  # kill while a change request is in flight
            sent = proxy.arrived["ChangeResourceRecordSets"]
            wait_until = time.monotonic() + 5
            while proxy.arrived["ChangeResourceRecordSets"] == sent and time.monotonic() < wait_until:
                await asyncio.sleep(0.01)
            if proxy.arrived["ChangeResourceRecordSets"] > sent:  # held 0.4s by the proxy: kill inside that
                in_flight_kills += 1
                await asyncio.sleep(rng.uniform(0.0, 0.3))
        else:
            await asyncio.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
    return kills, in_flight_kills, done
