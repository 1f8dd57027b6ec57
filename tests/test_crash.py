"""SIGKILL during a ramp, again and again over all five steps, many of them between an intent and
its result, in a world shaped like production scaled down: a record TTL, changes that stay PENDING
for a while, the default 30 s writer lease. The daemon runs as a subprocess against moto's Route 53
behind the fault proxy; the pacing is checked from the audit log and from what reached Route 53."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import aiohttp
import pytest

from controller.demo.world import free_port, ramp_config
from controller.state.store import Store
from tests import pacing
from tests.conftest import REGIONSHIFT
from tests.faults import FaultProxy
from tests.test_shifting import PLANNED, TOKEN, TTL, make_zone, read_weights, watch_weights

BAKE = 1.0
INSYNC_TIMEOUT = 3.0  # the allowance for a change whose answer a kill lost (Route 53's: 300 s)
PENDING_FOR = 0.5  # each change is PENDING this long: a kill can land in the INSYNC wait


async def api_state(http: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with http.get(f"{url}/api/v1/state") as response:
            return await response.json()
    except aiohttp.ClientConnectionError:
        return None


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_sigkills_over_a_whole_ramp_keep_its_pace_and_leave_only_planned_recorded_weights(
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
    async with FaultProxy(route53.url, pending_for=PENDING_FOR) as proxy, aiohttp.ClientSession() as http:
        proxy.slow("ChangeResourceRecordSets", 0.4, times=1000)  # a wide window between intent and result
        path = ramp_config(
            tmp_path,
            two_regions,
            proxy.url,
            zone_id,
            name,
            port=port,
            ttl=TTL,
            bake=BAKE,
            insync_timeout=INSYNC_TIMEOUT,
        )
        async with watch_weights(route53, zone_id, name) as held:
            runs, in_flight_kills, done = await kill_until_done(http, url, path, env, proxy, rng, tmp_path, name)
        await asyncio.sleep(0.5)  # a request the proxy was still holding lands now, or never
        seen = list(proxy.seen)
        sent = pacing.weights_sent(seen)
    final = read_weights(route53, zone_id, name)
    if final not in held:
        held.append(final)

    assert done, f"the ramp did not finish in {len(runs)} runs; Route 53 held {held}"
    assert all(w in PLANNED for w in held), f"unplanned weights: {[w for w in held if w not in PLANNED]}"
    assert final == PLANNED[-1]
    async with Store(tmp_path / "state.sqlite") as store:
        events = await store.audit.events(limit=1000)
        assert all([await store.audit.open_intent(f"{name}/A") is None])
    applied = [e["to_weights"] for e in events if e["phase"] == "result" and e["outcome"] == "applied"]
    assert len(applied) == len({tuple(sorted(w.items())) for w in applied}) == 5, f"a step applied twice: {applied}"
    assert all(w in applied for w in held if w != PLANNED[0]), "every change Route 53 held is in the audit log"
    settled = [e for e in events if e["phase"] == "result" and (e["error"] or "").startswith("result recorded later")]
    assert in_flight_kills >= 3, f"only {in_flight_kills} kills landed between intent and result"
    assert settled, "no intent was left open by a kill: the test did not reach the case it is for"

    # Pacing, from the audit log: every step no sooner than the previous one's INSYNC + TTL + bake.
    audited = pacing.from_audit(tmp_path / "state.sqlite", f"{name}/A", TTL, lambda _: BAKE, INSYNC_TIMEOUT)
    assert [s.early for s in audited] == [0.0] * 5, pacing.report(audited)
    # And from Route 53's side: no step reached it sooner than the previous one's arrival + TTL + bake.
    received = pacing.from_route53(sent, PLANNED[0], TTL, BAKE)
    assert [s.early for s in received] == [0.0] * 5, pacing.report(received)
    assert all(s.moved <= 25.0 + 1e-9 for s in audited)

    # Restart to first write: from a process's start to the intent of a step that was already
    # due when it started (the runs that stayed down until the next step was due).
    resumed = [
        step.sent_at - started
        for started, stopped in runs
        for step in audited
        if started <= step.sent_at < stopped and step.due is not None and step.due <= started
    ]
    print(f"\n{len(runs)} runs, {in_flight_kills} kills during a change request, {len(settled)} intents settled later")
    print("pacing from the audit log:\n" + pacing.report(audited))
    print("restart to first write (a step due at start): " + ", ".join(f"{r:.2f}s" for r in resumed))
    reads = [
        min((s.at for s in seen if s.operation == "ListResourceRecordSets" and started <= s.at < stopped), default=None)
        for started, stopped in runs
    ]
    lags = [r - started for r, (started, _) in zip(reads, runs, strict=True) if r is not None]
    print("restart to first Route 53 read (lease held, reconciling): " + ", ".join(f"{r:.2f}s" for r in lags))


async def kill_until_done(http, url, path, env, proxy, rng, logs, name) -> tuple[list[tuple[float, float]], int, bool]:
    """Start the daemon, let it work a little, SIGKILL it; again, until the ramp is done. Kills
    take turns: while a change request is in flight; at a random moment; and, after a start held
    back until the next step is due, right after that step is sent. Returns each run's (start,
    kill) times, the kills that landed while a change request was in flight, and whether the ramp
    finished."""
    runs: list[tuple[float, float]] = []
    in_flight_kills = 0
    done = False
    deadline = time.monotonic() + 180
    while not done and time.monotonic() < deadline:
        mode = len(runs) % 3
        if mode == 2:  # stay down until the next step is due: the restart must send it at once
            _, due = pacing.audit_walk(logs / "state.sqlite", f"{name}/A", TTL, lambda _: BAKE, INSYNC_TIMEOUT)
            if due is not None and due > time.time():
                await asyncio.sleep(due - time.time() + 0.2)
        started = time.time()
        with (logs / f"run-{len(runs)}.log").open("wb") as log:  # kept for a failure's post-mortem
            proc = await asyncio.create_subprocess_exec(
                REGIONSHIFT, "run", "-c", path, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log
            )
        while (state := await api_state(http, url)) is None:
            if proc.returncode is not None:
                pytest.fail(f"the daemon exited with {proc.returncode}: {(logs / f'run-{len(runs)}.log').read_text()}")
            await asyncio.sleep(0.05)
        ramp = state["ramps"][0]
        if ramp["status"] == "pending":
            async with http.post(f"{url}/api/v1/ramps/launch/start", headers={"Authorization": f"Bearer {TOKEN}"}):
                pass
        if ramp["status"] == "done":
            done = True
        elif mode in (0, 2):  # kill while a change request is in flight, once one is sent
            count = proxy.arrived["ChangeResourceRecordSets"]
            wait_until = time.monotonic() + TTL + BAKE + INSYNC_TIMEOUT + 5
            while proxy.arrived["ChangeResourceRecordSets"] == count and time.monotonic() < wait_until:
                await asyncio.sleep(0.01)
            if proxy.arrived["ChangeResourceRecordSets"] > count:  # held 0.4 s, then PENDING 0.5 s
                in_flight_kills += 1
                await asyncio.sleep(rng.uniform(0.0, 0.8))
        else:
            await asyncio.sleep(rng.uniform(0.05, 3.0))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        runs.append((started, time.time()))
    return runs, in_flight_kills, done
