"""Traffic shifting end to end: the daemon probes simulated regions and moves weights in moto's
Route 53 through ramps, rollbacks, drift, freezes and operator actions over the API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import subprocess
import time
import uuid

import aiohttp
import pytest
import structlog

from controller.acting.route53 import make_client
from controller.daemon import STOP_WAITS_FOR_ROUTE53, Daemon
from controller.demo.world import seed_weighted_group
from controller.planning.weights import shares
from controller.settings.policy import GuardrailPolicy, Policy, RampPolicy
from controller.settings.schema import Config, ControllerSettings, Member, RecordSet, Region, Route53Settings
from controller.state.store import Store
from controller.web.views import text
from probes.spec import HttpProbe
from tests import policies
from tests.conftest import REGIONSHIFT
from tests.faults import FaultProxy

TOKEN = "test-token-0123456789"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
# The shared fast policy, judging on 3 results (a 10-probe-per-second world fills a window fast).
FAST = policies.FAST.model_copy(update={"min_samples": 3})
STEPS = [1.0, 5.0, 10.0, 25.0, 50.0]
# The test world's record TTL and the INSYNC wait, scaled down from Route 53's (60 s, 300 s) so
# tests stay short, never zero: a TTL of 0 once hid an evacuation that never waited between steps.
TTL = 3
INSYNC_TIMEOUT = 5.0
# The weights a 1/5/10/25/50% ramp of euw1 from use1=1, euw1=0 goes through: Route 53 holds nothing else.
PLANNED = [
    {"use1": 1, "euw1": 0},
    {"use1": 99, "euw1": 1},
    {"use1": 19, "euw1": 1},
    {"use1": 9, "euw1": 1},
    {"use1": 3, "euw1": 1},
    {"use1": 1, "euw1": 1},
]


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("REGIONSHIFT_API_TOKEN", TOKEN)


def make_zone(route53) -> tuple[str, str]:
    client = direct_client(route53.url)
    zone = client.create_hosted_zone(Name=f"z{uuid.uuid4().hex[:8]}.example.com", CallerReference=uuid.uuid4().hex)
    zone_id = zone["HostedZone"]["Id"].split("/")[-1]
    name = "api." + zone["HostedZone"]["Name"].rstrip(".")
    seed_weighted_group(client, zone_id, name, [("use1", 1, "192.0.2.10"), ("euw1", 0, "192.0.2.20")], ttl=TTL)
    return zone_id, name


@functools.cache
def direct_client(url: str):
    """One client per server, kept: a client per call would leave its sockets to the collector."""
    return make_client(url, **CREDENTIALS)


@contextlib.asynccontextmanager
async def watch_weights(route53, zone_id: str, name: str):
    """Every distinct set of weights Route 53 holds while the block runs, in order."""
    seen: list[dict[str, int]] = []

    async def watch():
        while True:
            weights = await asyncio.to_thread(read_weights, route53, zone_id, name)
            if not seen or seen[-1] != weights:
                seen.append(weights)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def set_weight(route53, zone_id: str, name: str, sid: str, weight: int, value: str, ttl: int = TTL) -> None:
    """Change one member's weight directly in Route 53, as a person with the console would."""
    direct_client(route53.url).change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={
            "Changes": [
                {
                    "Action": "UPSERT",
                    "ResourceRecordSet": {
                        "Name": name,
                        "Type": "A",
                        "SetIdentifier": sid,
                        "Weight": weight,
                        "TTL": ttl,
                        "ResourceRecords": [{"Value": value}],
                    },
                }
            ]
        },
    )


def read_weights(route53, zone_id: str, name: str) -> dict[str, int]:
    client = direct_client(route53.url)
    records = client.list_resource_record_sets(HostedZoneId=zone_id, StartRecordName=name, StartRecordType="A")
    return {
        r["SetIdentifier"]: r["Weight"]
        for r in records["ResourceRecordSets"]
        if r["Name"].rstrip(".") == name and "Weight" in r
    }


def config(
    world, route53, zone_id, name, tmp_path, *, regions=("us-east-1", "eu-west-1"), read_only=False, **ramp
) -> Config:
    def probes(r):
        return [
            HttpProbe(name=n, target=r.url + p, interval=0.1, timeout=0.1)
            for n, p in (("healthz", "/healthz"), ("orders", "/api/orders"))
        ]

    probed = [Region(name=n, probes=probes(world[n])) for n in regions]
    rs = RecordSet(
        zone_id=zone_id,
        name=name,
        ttl=TTL,
        members=[
            Member(set_identifier="use1", region="us-east-1", value="192.0.2.10"),
            Member(set_identifier="euw1", region="eu-west-1", value="192.0.2.20"),
        ],
    )
    ramp_policy = RampPolicy(
        record_set=name,
        waves=[["eu-west-1"]],
        steps=STEPS,
        **{"bake": 0.6, "start_gate": 0.5, "wave_bake": 0.5, **ramp},
    )
    return Config(
        controller=ControllerSettings(
            listen="127.0.0.1:0",
            tick=0.1,
            read_only=read_only,
            state_path=str(tmp_path / "state.sqlite"),
            route53=Route53Settings(
                endpoint_url=route53.url,
                reconcile_every=0.1,
                poll_interval=0.05,
                insync_timeout=INSYNC_TIMEOUT,
                max_requests_per_second=400,  # 4 a second, on the world's time (reconciles 100 times as often)
            ),
        ),
        regions=probed,
        record_sets=[rs],
        policy=Policy(verdicts=FAST, guardrails=GuardrailPolicy(max_step=25), ramps={"launch": ramp_policy}),
    )


class Running:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.stop = asyncio.Event()

    async def __aenter__(self):
        self.task = asyncio.create_task(self.daemon.run(self.stop), name="daemon under test")
        await asyncio.wait_for(self.daemon.started.wait(), 10)
        self.http = aiohttp.ClientSession(self.daemon.url)
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        self.stop.set()
        # A stop waits for a Route 53 request still in flight (then it leaves the lease to
        # expire): on a loaded machine moto can take that long, and a 10 s bound here once
        # failed a test whose daemon was doing just what it should.
        await asyncio.wait_for(self.task, STOP_WAITS_FOR_ROUTE53 + 5)

    async def post(self, path: str, token: str | None = TOKEN, **body):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.post(path, headers=headers, json=body or None) as response:
            return response.status, await response.json()

    async def until(self, predicate, within: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if predicate():
                return
            await asyncio.sleep(0.05)
        ramp = self.daemon.reconciler.ramps.get("launch") if self.daemon.reconciler else None
        pytest.fail(f"{what} not reached in {within}s; ramp: {ramp}")

    def ramp(self):
        return self.daemon.reconciler.ramps["launch"]

    async def state(self) -> dict:
        async with self.http.get("/api/v1/state") as response:
            return await response.json()


async def test_a_ramp_started_over_the_api_steps_to_its_target_and_records_every_change(two_regions, route53, tmp_path):
    zone_id, name = make_zone(route53)
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path))
    async with Running(daemon) as running, watch_weights(route53, zone_id, name) as seen:
        assert await running.post("/api/v1/ramps/launch/start") == (
            200,
            {"ramp": "launch", "status": "running", "reason": "started by an operator (api:127.0.0.1)"},
        )
        await running.until(lambda: running.ramp().status == "done", within=30, what="done")
        await asyncio.sleep(0.1)  # the watcher's last read
        state = await (await running.http.get("/api/v1/state")).json()
        value = daemon.registry.get_sample_value("regionshift_ramp_step", {"ramp": "launch"})
        done = daemon.registry.get_sample_value(  # the ramp alerts' region tag
            "regionshift_ramp_status", {"ramp": "launch", "regions": "eu-west-1", "status": "done"}
        )
        forward = daemon.registry.get_sample_value(
            "regionshift_actions_total", {"action": "forward", "region": "eu-west-1", "reason": "ramp:launch"}
        )
    final = read_weights(route53, zone_id, name)
    assert final == {"use1": 1, "euw1": 1}  # 50%
    assert all(w in PLANNED for w in seen), seen  # Route 53 only ever held planned weights
    assert (value, forward, done) == (5.0, 5.0, 1.0)
    record = state["record_sets"][0]
    assert [(m["set_identifier"], m["observed_weight"], m["observed_share"]) for m in record["members"]] == [
        ("use1", 1, 50.0),
        ("euw1", 1, 50.0),
    ]
    assert state["ramps"][0]["status"] == "done"
    async with Store(tmp_path / "state.sqlite") as store:
        events = await store.audit.events()
    results = [(e["reason"], e["outcome"], e["to_weights"]) for e in events if e["phase"] == "result"]
    assert results == [
        (f"step {i + 1} of 5: eu-west-1 to {s:g}%", "applied", w)
        for i, (s, w) in enumerate(zip(STEPS, PLANNED[1:], strict=True))
    ]
    assert all(e["change_id"] for e in events if e["phase"] == "result")


async def test_a_degraded_target_rolls_the_ramp_back_to_the_weights_before_it(two_regions, route53, tmp_path):
    zone_id, name = make_zone(route53)
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path, bake=5.0))
    async with Running(daemon) as running:
        await running.post("/api/v1/ramps/launch/start")
        await running.until(lambda: running.ramp().status == "baking" and running.ramp().step == 1, what="step 2")
        two_regions["eu-west-1"].set(error_ratio=0.5)  # /api/ half failing, /healthz fine
        await running.until(lambda: running.ramp().status == "rolled_back", what="rollback")

        def rollbacks_counted() -> float:
            labels = {"action": "rollback", "region": "eu-west-1", "reason": "ramp:launch"}
            return daemon.registry.get_sample_value("regionshift_actions_total", labels) or 0.0

        # The counter follows the event bus: it may count the rollback a moment after the status
        # changed (CI read it in between). Wait for it, then make sure nothing more came.
        await running.until(lambda: rollbacks_counted() >= 1, what="the rollback counted")
        await asyncio.sleep(0.5)
        rollback = rollbacks_counted()
    assert read_weights(route53, zone_id, name) == {"use1": 1, "euw1": 0}
    assert running.ramp().reason.startswith("rollback: eu-west-1 is degraded: orders:")
    assert rollback == 1.0


async def test_a_hand_edit_pauses_the_ramp_and_is_never_overwritten(two_regions, route53, tmp_path):
    zone_id, name = make_zone(route53)
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path, bake=3.0))
    async with Running(daemon) as running:
        await running.post("/api/v1/ramps/launch/start")
        await running.until(lambda: running.ramp().status == "baking", what="first step")
        set_weight(route53, zone_id, name, "euw1", 7, "192.0.2.20")
        await running.until(lambda: running.ramp().status == "paused", what="pause on drift")
        await asyncio.sleep(1.0)
        drift = daemon.registry.get_sample_value("regionshift_route53_drift", {"record": f"{name}/A"})
        state = await (await running.http.get("/api/v1/state")).json()
    assert read_weights(route53, zone_id, name) == {"use1": 99, "euw1": 7}  # untouched
    assert running.ramp().reason.startswith(f"paused: drift: {name}/A: Route 53 holds weights other than")
    assert drift == 1.0
    assert "euw1: wrote 1, found 7" in state["record_sets"][0]["drift"]


async def test_an_operator_adopts_a_hand_edit_as_the_new_baseline(two_regions, route53, tmp_path):
    zone_id, name = make_zone(route53)
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path, bake=3.0))
    record = f"{name}/A"
    async with Running(daemon) as running:
        assert (await running.post(f"/api/v1/records/{record}/adopt"))[0] == 409  # no hand edit yet
        await running.post("/api/v1/ramps/launch/start")
        await running.until(lambda: running.ramp().status == "baking", what="first step")
        set_weight(route53, zone_id, name, "euw1", 7, "192.0.2.20")
        await running.until(lambda: running.ramp().status == "paused", what="pause on drift")
        assert (await running.post(f"/api/v1/records/{record}/adopt", token=None))[0] == 401
        assert (await running.post("/api/v1/records/nope.example.com./A/adopt"))[0] == 404
        status, body = await running.post(f"/api/v1/records/{record}/adopt", reason="drill: keep 7")
        assert (status, body) == (200, {"record": record, "adopted": {"use1": 99, "euw1": 7}})
        await running.until(lambda: daemon.reconciler.views[record].drift is None, what="drift over")
        await asyncio.sleep(0.5)  # ticks go by: nothing is written back
        drift = daemon.registry.get_sample_value("regionshift_route53_drift", {"record": record})
        events = (await (await running.http.get("/api/v1/state")).json())["events"]
        audit = (await (await running.http.get(f"/api/v1/audit?record={record}&limit=1")).json())["changes"]
    assert read_weights(route53, zone_id, name) == {"use1": 99, "euw1": 7}  # adopted, not overwritten
    assert drift == 0.0
    assert running.ramp().status == "paused"  # the operator resumes it when ready
    assert [(e["who"], e["target"]) for e in events if e["kind"] == "operator" and e["action"] == "adopt"] == [
        ("api:127.0.0.1", record)
    ]
    assert [(c["action"], c["reason"], c["from"], c["to"], c["outcome"]) for c in audit] == [
        ("adopt", "drill: keep 7", {"use1": 99, "euw1": 1}, {"use1": 99, "euw1": 7}, "applied")
    ]


async def test_a_hand_edit_before_the_first_write_is_drift_and_an_adopted_one_is_never_restored_away(
    two_regions, route53, tmp_path
):
    # A new user's daemon, nothing written yet, no ramp: a console edit was not seen as drift
    # (there was nothing "last written" to compare with) and the next restore overwrote it; and
    # an adopted edit was undone by the next restore, which still aimed at the old home weights.
    zone_id, name = make_zone(route53)  # use1=1, euw1=0 when the daemon first sees it
    base = config(two_regions, route53, zone_id, name, tmp_path)
    evacuation = base.policy.evacuation.model_copy(update={"restore_after": 0.5, "confirm_after": 0.5})
    daemon = Daemon(
        base.model_copy(update={"policy": base.policy.model_copy(update={"ramps": {}, "evacuation": evacuation})})
    )
    record = f"{name}/A"
    async with Running(daemon) as running, watch_weights(route53, zone_id, name) as seen:
        view = daemon.reconciler.views[record]
        await running.until(lambda: view.observed == {"use1": 1, "euw1": 0}, what="first sight")
        await running.until(
            lambda: all(getattr(daemon.judge.verdicts.get(r), "status", "") == "healthy" for r in two_regions),
            what="every region healthy",
        )
        set_weight(route53, zone_id, name, "use1", 7, "192.0.2.10")
        set_weight(route53, zone_id, name, "euw1", 3, "192.0.2.20")
        await running.until(lambda: view.drift is not None, what="drift")
        await asyncio.sleep(1.5)  # three times restore_after, every region healthy: nothing is written
        drift = view.drift
        drift_metric = daemon.registry.get_sample_value("regionshift_route53_drift", {"record": record})
        status, body = await running.post(f"/api/v1/records/{record}/adopt", reason="keep 70/30")
        assert (status, body) == (200, {"record": record, "adopted": {"use1": 7, "euw1": 3}})
        await running.until(lambda: view.drift is None, what="drift over")
        await asyncio.sleep(1.5)  # the same again after the adopt: the adopted weights are home
        audit = (await (await running.http.get(f"/api/v1/audit?record={record}")).json())["changes"]
    assert "use1: saw 1, found 7" in drift
    assert "first seen (none written yet)" in drift
    assert drift_metric == 1.0
    assert seen[-1] == {"use1": 7, "euw1": 3}  # never written back
    assert {"use1": 1, "euw1": 0} not in seen[seen.index({"use1": 7, "euw1": 3}) :]
    assert [(c["action"], c["from"], c["to"]) for c in audit] == [
        ("adopt", {"use1": 1, "euw1": 0}, {"use1": 7, "euw1": 3})
    ]


async def test_operators_need_the_bearer_token_and_a_freeze_stops_every_write(
    two_regions, route53, tmp_path, monkeypatch
):
    zone_id, name = make_zone(route53)
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path))
    async with Running(daemon) as running:
        assert (await running.post("/api/v1/ramps/launch/start", token=None))[0] == 401
        assert (await running.post("/api/v1/ramps/launch/start", token="wrong"))[0] == 401
        assert await running.post("/api/v1/ramps/nope/start") == (404, {"error": "no ramp named 'nope'; known: launch"})
        assert (await running.post("/api/v1/ramps/launch/explode"))[0] == 404
        assert await running.post("/api/v1/ramps/launch/resume") == (
            409,
            {"error": "cannot resume a ramp that is pending"},
        )
        status, body = await running.post("/api/v1/freeze", frozen=True, reason="incident 42")
        assert (status, body["frozen"]["reason"]) == (200, "incident 42")
        await running.post("/api/v1/ramps/launch/start")
        await asyncio.sleep(2.0)
        assert read_weights(route53, zone_id, name) == {"use1": 1, "euw1": 0}  # nothing moved while frozen
        assert "frozen by api:127.0.0.1: incident 42" in daemon.reconciler.views[f"{name}/A"].reason
        await running.post("/api/v1/freeze", frozen=False)
        await running.until(lambda: read_weights(route53, zone_id, name) != {"use1": 1, "euw1": 0}, what="first step")
        monkeypatch.delenv("REGIONSHIFT_API_TOKEN")
        assert (await running.post("/api/v1/ramps/launch/pause"))[0] == 403


def write_files(tmp_path, zone_id, name, weights="") -> str:
    (tmp_path / "ramp.yaml").write_text(
        f"ramps:\n  launch:\n    record_set: {name}\n    waves: [[eu-west-1]]\n    steps: [1, 5, 10, 25, 50]\n"
        "    bake: 1s\n    start_gate: 1s\n"
    )
    path = tmp_path / "regionshift.yaml"
    path.write_text(
        "policies: [ramp.yaml]\nregions:\n  - name: us-east-1\n  - name: eu-west-1\n"
        f"record_sets:\n  - zone_id: {zone_id}\n    name: {name}\n    members:\n"
        f"      - {{set_identifier: use1, region: us-east-1, value: 192.0.2.10{weights and ', weight: 3'}}}\n"
        f"      - {{set_identifier: euw1, region: eu-west-1, value: 192.0.2.20{weights and ', weight: 0'}}}\n"
    )
    return str(path)


async def run_cli(*args, env=None):
    proc = await asyncio.create_subprocess_exec(
        REGIONSHIFT, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_the_ramp_command_acts_on_the_running_daemon(two_regions, route53, tmp_path):
    zone_id, name = make_zone(route53)
    path = write_files(tmp_path, zone_id, name)
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path))
    async with Running(daemon) as running:
        refused = f"regionshift: adopt {name}/A: {name}/A has no hand edit to adopt: "
        for named in (f"{name}/A", name):  # a bare name is an A record's, as in a ramp's record_set
            code, _, err = await run_cli("adopt", named, "-c", path, "--url", daemon.url)
            assert (code, err.strip()) == (1, refused + "Route 53 holds the weights regionshift first saw")
        code, out, err = await run_cli(
            "ramp", "start", "launch", "-c", path, "--url", daemon.url, "--operator", "alice"
        )
        assert (code, out) == (0, "ramp launch: running (started by an operator (alice))\n"), err
        code, _, err = await run_cli("ramp", "start", "launch", "-c", path, "--url", daemon.url)
        assert code == 1
        assert "regionshift: start launch: cannot start a ramp that is " in err  # running or already baking
        await running.until(lambda: running.ramp().status == "done", what="done")
        code, out, err = await run_cli("status", "-c", path, "--url", daemon.url)
        # The address alone is enough: an on-call laptop has the URL, not the daemon's configuration.
        bare = await run_cli("status", "--url", daemon.url)
    assert code == 0, err
    lines = out.splitlines()
    assert bare[0] == 0, bare[2]
    assert [line.split()[:3] for line in bare[1].splitlines()[2:5]] == [line.split()[:3] for line in lines[2:5]]
    assert lines[0].startswith(f"regionshift at {daemon.url} · ")
    assert lines[2].split() == ["REGION", "VERDICT", "FOR", "VANTAGES", "REASON"]
    assert {line.split()[0]: line.split()[1:3] for line in lines[3:5]} == {
        "us-east-1": ["✓", "healthy"],
        "eu-west-1": ["✓", "healthy"],
    }
    assert all("controller ✓" in line for line in lines[3:5])  # each region as seen from the vantage
    assert f"RECORD SET {name}/A  owner: nobody (at home weights)" in out, (
        out
    )  # the ramp is done, nothing else moves it
    assert any(line.split()[:2] == ["euw1", "eu-west-1"] and "(50%)" in line for line in lines)
    assert any(line.split()[:4] == ["launch", "done", "1/1", "5/5"] for line in lines)
    code, _, err = await run_cli("status", "-c", path, "--url", "http://127.0.0.1:9")
    assert code == 1
    assert "cannot reach the daemon at http://127.0.0.1:9" in err
    code, _, err = await run_cli("status")
    assert (code, err) == (
        2,
        "regionshift: status needs the daemon's address: give --url URL, or -c FILE to read it from\n",
    )


async def test_ramp_abort_says_it_is_requested_not_that_the_ramp_is_paused(two_regions, route53, tmp_path):
    # It printed "ramp launch: paused (abort requested by an operator)" while the log said aborted.
    zone_id, name = make_zone(route53)
    path = write_files(tmp_path, zone_id, name)
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path, bake=30.0))
    async with Running(daemon) as running:
        await running.post("/api/v1/ramps/launch/start")
        await running.until(lambda: running.ramp().status == "baking", what="the first step baking")
        code, out, err = await run_cli("ramp", "abort", "launch", "-c", path, "--url", daemon.url)
        assert (code, out) == (
            0,
            "ramp launch: abort requested (it was baking); the daemon aborts it at its next reconcile\n",
        ), err
        await running.until(lambda: running.ramp().status == "aborted", what="aborted")


async def test_status_watch_outlives_a_daemon_that_is_away_and_writes_no_screen_codes_into_a_pipe(route53, tmp_path):
    # It ended at the first failed fetch (a daemon's restart ended the watch), and cleared the
    # screen with escape codes in a file it was redirected to.
    zone_id, name = make_zone(route53)
    path = write_files(tmp_path, zone_id, name)
    proc = await asyncio.create_subprocess_exec(
        REGIONSHIFT, "status", "-c", path, "--url", "http://127.0.0.1:9", "--watch",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            lines = [await proc.stdout.readline() for _ in range(2)]  # two tries, 2 s apart
    finally:
        proc.terminate()
        await proc.wait()
    assert all(b"no answer from http://127.0.0.1:9" in line for line in lines), lines
    assert all(line.endswith(b"; trying again every 2s\n") for line in lines), lines
    assert not [line for line in lines if b"\x1b" in line]


def test_status_into_a_pipe_its_reader_closes_ends_quietly(tmp_path):
    # `status | head -1` ended "unexpected BrokenPipeError ... (a bug ...)", exit 1 (trial G).
    err = tmp_path / "err"
    shell = f"{REGIONSHIFT} status --url http://127.0.0.1:9 --watch 2>{err} | head -1; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30, check=True)  # noqa: S607
    first, code = done.stdout.splitlines()
    assert "no answer from http://127.0.0.1:9" in first
    assert (code, err.read_text()) == ("0", "")


async def test_the_ramp_command_explains_what_is_missing(route53, tmp_path, monkeypatch):
    zone_id, name = make_zone(route53)
    path = write_files(tmp_path, zone_id, name)
    # Usage errors, each one line (not "invalid configuration": the file is fine), exit 2.
    code, _, err = await run_cli("ramp", "start", "nope", "-c", path)
    assert (code, err) == (2, "regionshift: no ramp named 'nope' in the policy files; known: launch\n")
    code, _, err = await run_cli("adopt", "nope/A", "-c", path)
    assert (code, err) == (2, f"regionshift: no record set 'nope/A' in the configuration; known: {name}/A\n")
    monkeypatch.delenv("REGIONSHIFT_API_TOKEN")
    code, _, err = await run_cli("ramp", "start", "launch", "-c", path)
    assert (code, err) == (
        2,
        "regionshift: set REGIONSHIFT_API_TOKEN to the daemon's API token (controller.api_token_env)\n",
    )
    monkeypatch.setenv("REGIONSHIFT_API_TOKEN", TOKEN)
    code, _, err = await run_cli("ramp", "start", "launch", "-c", path, "--url", "http://127.0.0.1:9")
    assert code == 1
    assert "cannot reach the daemon at http://127.0.0.1:9" in err
    assert "give its address with --url" in err
    # A daemon told to pick a free port: the commands cannot guess it, and say what to give.
    picked = tmp_path / "picked.yaml"
    picked.write_text("controller:\n  listen: 127.0.0.1:0\n" + (tmp_path / "regionshift.yaml").read_text())
    for command in (("status",), ("ramp", "start", "launch"), ("adopt", f"{name}/A")):
        code, _, err = await run_cli(*command, "-c", str(picked))
        assert code == 2, (command, err)
        assert err.startswith("regionshift: controller.listen has port 0 "), err
        assert "give its address with --url" in err, err


async def test_plan_prints_every_step_and_touches_nothing(route53, tmp_path):
    zone_id, name = make_zone(route53)
    path = write_files(tmp_path, zone_id, name, weights="yes")
    code, out, err = await run_cli("plan", "-c", path, "--ramp", "launch")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("1.1", "use1=99", "euw1=1"),
        ("1.2", "use1=19", "euw1=1"),
        ("1.3", "use1=9", "euw1=1"),
        ("1.4", "use1=3", "euw1=1"),
        ("1.5", "use1=1", "euw1=1"),
    ]
    assert "eu-west-1 25->25.00%" in out
    assert out.rstrip().endswith("nothing was sent")
    assert read_weights(route53, zone_id, name) == {"use1": 1, "euw1": 0}
    no_weights = write_files(tmp_path, zone_id, name)
    code, _, err = await run_cli("plan", "-c", no_weights, "--ramp", "launch")
    assert code == 2
    assert "give every member a weight (use1, euw1)" in err
    code, _, err = await run_cli("plan", "-c", path, "--ramp", "nope")  # not "invalid configuration"
    assert (code, err) == (2, "regionshift: --ramp 'nope': no such ramp in the policy files; known: launch\n")


async def test_only_the_lease_holder_writes_and_a_standby_takes_over_with_a_higher_token(
    two_regions, route53, tmp_path
):
    zone_id, name = make_zone(route53)
    base = config(two_regions, route53, zone_id, name, tmp_path, bake=1.5)
    lease = base.controller.route53.model_copy(update={"lease_ttl": 1.0})
    shared = base.model_copy(update={"controller": base.controller.model_copy(update={"route53": lease})})
    first, second = Daemon(shared), Daemon(shared)  # one state file, as a failover pair would share
    leader = Running(first)
    await leader.__aenter__()
    try:
        await leader.until(lambda: first.reconciler.lease_token == 1, what="lease")
        async with contextlib.AsyncExitStack() as stack:
            with structlog.testing.capture_logs() as logs:
                standby = await stack.enter_async_context(Running(second))
                await asyncio.sleep(1.5)
            assert second.reconciler.lease_token is None
            # A standby says so from its start, naming the writer; it said nothing until it had
            # held the lease once, and its state and status looked like the leader's.
            told = [e for e in logs if e["event"] == "standby: another controller holds the writer lease"]
            assert [(e["writer"], e["writer_token"]) for e in told] == [(first.reconciler.holder, 1)]
            state = await standby.state()
            assert state["writer"] == {"this": False, "holder": first.reconciler.holder, "token": 1,
                                       "me": second.reconciler.holder}  # fmt: skip
            assert f"STANDBY: the writer is {first.reconciler.holder} (token 1)" in text(state, second.url, time.time())
            assert (await leader.state())["writer"]["this"] is True
            await leader.post("/api/v1/ramps/launch/start")
            await leader.until(lambda: first.reconciler.ramps["launch"].step == 1, what="two steps by the leader")
            assert second.reconciler.lease_token is None  # still standby; the audit log below shows it wrote nothing
            await leader.__aexit__(None, None, None)  # the leader stops and releases its lease
            leader = None
            await standby.until(lambda: second.reconciler.lease_token == 2, within=5, what="takeover")
            await standby.until(lambda: second.reconciler.ramps["launch"].status == "done", what="done by the standby")
    finally:
        if leader is not None:
            await leader.__aexit__(None, None, None)
    async with Store(tmp_path / "state.sqlite") as store:
        intents = [e["actor"] for e in await store.audit.events(limit=100) if e["phase"] == "intent"]
    # Two steps by the leader alone, then the rest by the standby alone, each under its own token.
    takeover = intents.index("ramp:launch (lease 2)")
    assert intents[:takeover] == ["ramp:launch (lease 1)"] * 2
    assert set(intents[takeover:]) == {"ramp:launch (lease 2)"}
    assert len(intents) == 5
    assert read_weights(route53, zone_id, name) == {"use1": 1, "euw1": 1}


async def test_a_degraded_region_is_evacuated_step_by_step_and_restored_after_sustained_health(
    two_regions, route53, tmp_path
):
    zone_id, name = make_zone(route53)
    set_weight(route53, zone_id, name, "euw1", 1, "192.0.2.20")
    base = config(two_regions, route53, zone_id, name, tmp_path)
    home = [m.model_copy(update={"weight": 1}) for m in base.record_sets[0].members]  # home: 50/50
    record = base.record_sets[0].model_copy(update={"members": home})
    policy = base.policy.model_copy(
        update={
            "ramps": {},
            "evacuation": base.policy.evacuation.model_copy(update={"restore_after": 2.0, "confirm_after": 1.0}),
            "guardrails": base.policy.guardrails.model_copy(update={"max_step": 20}),
        }
    )
    daemon = Daemon(base.model_copy(update={"record_sets": [record], "policy": policy}))
    async with Running(daemon) as running, watch_weights(route53, zone_id, name) as seen:

        def euw1_share() -> float:
            return shares(seen[-1])["euw1"] if seen else 50.0

        await running.until(lambda: getattr(daemon.judge.verdicts.get("eu-west-1"), "status", "") == "healthy")
        two_regions["eu-west-1"].set(error_ratio=0.5)
        await running.until(lambda: euw1_share() == 0.0, what="evacuated")
        evacuation = list(seen)
        two_regions["eu-west-1"].heal()

        def restores_counted() -> float:
            labels = {"action": "restore", "region": "eu-west-1", "reason": "evacuation"}
            return daemon.registry.get_sample_value("regionshift_actions_total", labels) or 0.0

        await running.until(lambda: abs(euw1_share() - 50.0) < 1.0, what="restored")
        # Route 53 shows a write before the daemon has seen it INSYNC and counted it: a moment more.
        await running.until(lambda: restores_counted() >= 3, what="the restores counted")
        evacuations = daemon.registry.get_sample_value(
            "regionshift_actions_total", {"action": "evacuation", "region": "eu-west-1", "reason": "evacuation"}
        )
        restores = restores_counted()
        # Counted under the region it is about, not the one whose share moved with it: the
        # evacuation paged "traffic is being moved away from us-east-1" too.
        other = {
            action: daemon.registry.get_sample_value(
                "regionshift_actions_total", {"action": action, "region": "us-east-1", "reason": "evacuation"}
            )
            for action in ("evacuation", "restore")
        }
    steps = [shares(w)["euw1"] for w in evacuation]
    assert steps[0] == 50.0
    assert steps[-1] == 0.0
    assert len(steps) >= 4  # 50% off in steps of at most max_step 20%
    assert all(0 < a - b <= 20.0 + 1e-9 for a, b in itertools.pairwise(steps)), steps
    # The watcher polls Route 53, so under load it can miss a state between two writes: every
    # state it saw was one evacuation write, and no write moved more than max_step.
    assert evacuations >= len(steps) - 1
    assert restores >= 3
    assert other == {"evacuation": 0.0, "restore": 0.0}


async def test_a_change_whose_answer_was_lost_is_settled_from_route53_not_taken_for_drift(
    two_regions, route53, tmp_path
):
    zone_id, name = make_zone(route53)
    async with FaultProxy(route53.url) as proxy:
        base = config(two_regions, route53, zone_id, name, tmp_path)
        r53 = base.controller.route53.model_copy(update={"endpoint_url": proxy.url, "max_attempts": 2})
        daemon = Daemon(base.model_copy(update={"controller": base.controller.model_copy(update={"route53": r53})}))
        async with Running(daemon) as running:
            await running.post("/api/v1/ramps/launch/start")
            await running.until(lambda: running.ramp().status == "baking", what="first step")
            proxy.lose_answer("ChangeResourceRecordSets", times=2)  # step 2 lands; both answers are lost
            await running.until(lambda: running.ramp().step >= 2, what="past the second step")
            drift = daemon.reconciler.views[f"{name}/A"].drift
            labels = {"operation": "change_resource_record_sets", "cause": "server"}  # the first lost answer

            def retried() -> float:
                return daemon.registry.get_sample_value("regionshift_route53_retries_total", labels) or 0.0

            await running.until(lambda: retried() >= 1, what="the retry counted")
    async with Store(tmp_path / "state.sqlite") as store:
        second = [e for e in await store.audit.events() if e["reason"].startswith("step 2 ")]
    assert drift is None  # its own write, found later, is not a hand edit
    assert [(e["phase"], e["outcome"], e["error"]) for e in second] == [
        ("intent", None, None),
        ("result", "applied", "result recorded later: found applied"),
    ]


async def test_without_configured_weights_home_is_what_route53_held_first_and_is_remembered(
    two_regions, route53, tmp_path
):
    zone_id, name = make_zone(route53)  # use1=1, euw1=0 in Route 53, no weights in the configuration
    daemon = Daemon(config(two_regions, route53, zone_id, name, tmp_path))
    async with Running(daemon) as running:
        await running.until(lambda: daemon.reconciler.views[f"{name}/A"].reason != "", what="first tick")
        async with Store(tmp_path / "state.sqlite") as store:
            assert await store.flags.home(f"{name}/A") == {"use1": 1, "euw1": 0}
