"""Alert rules (promtool) and the Grafana dashboard, checked against a real Prometheus that
scrapes a real daemon watching the simulated regions."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from datetime import UTC, datetime

import aiohttp
import boto3
import pytest
import yaml

from controller.daemon import Daemon
from controller.demo.broker import CONTROLLER_USER, Broker
from controller.demo.world import SimulatedRegion, free_port
from controller.settings.schema import AgentsSettings, Config
from probes.spec import CloudWatchLagProbe
from tests.conftest import REPO
from tests.test_agents import agent_for
from tests.test_daemon import Running
from tests.test_shifting import config as shifting_config
from tests.test_shifting import make_zone

RULES = REPO / "deploy" / "prometheus" / "regionshift-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "regionshift-alerts.test.yml"
DASHBOARD = REPO / "dashboards" / "regionshift-regions.json"
PROMETHEUS_EXAMPLE = REPO / "deploy" / "prometheus" / "prometheus.example.yml"
ALERTMANAGER_EXAMPLE = REPO / "deploy" / "alertmanager" / "alertmanager.example.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        package = "prometheus-alertmanager" if name == "amtool" else "prometheus"
        pytest.fail(f"{name} is not installed; `make test` installs it (Debian package {package})")
    return path


def test_alert_rules_are_valid_and_their_unit_tests_pass():
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(SUBJECTS)} rules found" in check.stdout
    unit = subprocess.run(
        [tool("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, check=False
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


# What each alert is about, and so which label its summary must name.
SUBJECTS: dict[str, str | None] = {
    "RegionshiftDown": "instance",
    "RegionshiftAbsent": None,  # no target at all: nothing to name
    "RegionshiftRegionUnhealthy": "region",
    "RegionshiftRegionDegraded": "region",
    "RegionshiftRegionUnknown": "region",
    "RegionshiftBlind": "instance",
    "RegionshiftMostRegionsTroubled": "instance",
    "RegionshiftProbeTimeouts": "region",
    "RegionshiftJudgeBehind": "instance",
    "RegionshiftRoute53Drift": "record",
    "RegionshiftRoute53Unreachable": "record",
    "RegionshiftRoute53Errors": "record",
    "RegionshiftEvacuating": "region",
    "RegionshiftRampRolledBack": "ramp",
    "RegionshiftRampPaused": "ramp",
    "RegionshiftReplicationLagHigh": "region",
    "RegionshiftReplicationLagUnknown": "region",
    "RegionshiftAgentDown": "vantage",
    "RegionshiftAgentLagging": "vantage",
    "RegionshiftAgentMessagesDropped": "vantage",
    "RegionshiftAgentClockAhead": "vantage",
}


def test_every_alert_has_a_routable_severity_and_names_its_subject():
    rules = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]
    assert [r["alert"] for r in rules] == list(SUBJECTS)
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        subject = SUBJECTS[rule["alert"]]
        assert subject is None or f"$labels.{subject}" in rule["annotations"]["summary"], rule["alert"]


def test_the_example_prometheus_configuration_loads_the_rules_and_scrapes_the_job_the_rules_watch():
    check = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS_EXAMPLE)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = [c["job_name"] for c in yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())["scrape_configs"]]
    assert jobs == ["regionshift"]
    assert 'up{job="regionshift"}' in RULES.read_text()


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ("alertname=RegionshiftEvacuating severity=page region=eu-west-1", "eu-pager"),
        ("alertname=RegionshiftRegionDegraded severity=page region=ap-southeast-2", "regions-pager"),
        ("alertname=RegionshiftDown severity=page instance=c1:9181", "platform-pager"),
        ("alertname=RegionshiftBlind severity=page instance=c1:9181", "platform-pager"),
        ("alertname=RegionshiftRoute53Drift severity=page record=api.example.com/A", "platform-pager"),
        ("alertname=RegionshiftAgentDown severity=ticket vantage=agent-a", "tickets"),
    ],
)
def test_the_example_alertmanager_routing_pages_a_region_s_team_and_the_platform_for_the_rest(labels, receiver):
    amtool = tool("amtool")
    check = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_EXAMPLE)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    routed = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_EXAMPLE}", *labels.split()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (routed.returncode, routed.stdout.strip()) == (0, receiver), routed.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


async def query(http: aiohttp.ClientSession, expr: str) -> list[dict]:
    async with http.get("/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def with_replica_lag(config: Config, endpoint_url: str, seconds: float) -> Config:
    """eu-west-1 with an RDS replica whose lag CloudWatch (moto's) reports as `seconds`."""
    cloudwatch = boto3.client(
        "cloudwatch",
        region_name="eu-west-1",
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    dimensions = {"DBInstanceIdentifier": "orders-replica"}
    cloudwatch.put_metric_data(
        Namespace="AWS/RDS",
        MetricData=[
            {
                "MetricName": "ReplicaLag",
                "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions.items()],
                "Timestamp": datetime.now(UTC),
                "Value": seconds,
                "Unit": "Seconds",
            }
        ],
    )
    lag = CloudWatchLagProbe(
        name="replica-lag",
        metric="rds-replica",
        aws_region="eu-west-1",
        dimensions=dimensions,
        endpoint_url=endpoint_url,
        # Under the policy's 1 s `stale_after`: at 1 s its newest result was a second old at times,
        # eu-west-1 "unknown", and a ramp step due then refused (the ramp paused, the test hung).
        interval=0.5,
        timeout=0.5,
    )
    regions = [
        r.model_copy(update={"probes": [*r.probes, lag]}) if r.name == "eu-west-1" else r for r in config.regions
    ]
    return config.model_copy(update={"regions": regions})


async def test_dashboard_queries_and_alert_rules_work_on_a_real_prometheus(route53, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("TEST_MQTT_CONTROLLER_PASSWORD", "controller-pw")
    monkeypatch.setenv("TEST_MQTT_AGENT_PASSWORD", "agent-pw")
    zone_id, name = make_zone(route53)
    async with SimulatedRegion("us-east-1", seed=1) as use1, SimulatedRegion("eu-west-1", seed=2) as euw1:
        with Broker({CONTROLLER_USER: "controller-pw", "agent-a": "agent-pw"}) as broker:
            config = shifting_config({"us-east-1": use1, "eu-west-1": euw1}, route53, zone_id, name, tmp_path, bake=2.0)
            config = with_replica_lag(config, route53.url, seconds=2.0)
            agents = {
                "broker": broker.address,
                "username": CONTROLLER_USER,
                "password": {"env": "TEST_MQTT_CONTROLLER_PASSWORD"},
                "vantages": ["agent-a"],
            }
            daemon = Daemon(config.model_copy(update={"agents": AgentsSettings.model_validate(agents)}))
            agent = agent_for(broker, password_env="TEST_MQTT_AGENT_PASSWORD")
            stop_agent = asyncio.Event()
            agent_task = asyncio.create_task(agent.run(stop_agent))
            try:
                results, rules = await ramp_roll_back_and_scrape(daemon, euw1, tmp_path)
            finally:
                stop_agent.set()
                await agent_task

    for title, series in results.items():
        assert series, f"panel {title!r} returned no series"
    success = {
        (s["metric"]["region"], s["metric"]["probe"]): float(s["value"][1])
        for s in results["Probe success ratio by region and probe"]
    }
    # A healthy region's probes time out now and then on a loaded machine (their timeout is 0.1 s
    # and Prometheus starts beside them); the injected failures show as a clear gap.
    assert success[("us-east-1", "orders")] >= 0.9
    assert success[("eu-west-1", "orders")] < success[("us-east-1", "orders")] - 0.1
    assert success[("eu-west-1", "healthz")] >= 0.9
    verdicts = {s["metric"]["region"]: float(s["value"][1]) for s in results["Verdict per region"]}
    assert verdicts == {"us-east-1": 0.0, "eu-west-1": 2.0}  # 2 = degraded
    shares = {s["metric"]["region"]: float(s["value"][1]) for s in results["Route 53 share per region"]}
    assert shares == {"us-east-1": 100.0, "eu-west-1": 0.0}  # rolled back
    changes = {(s["metric"]["action"], s["metric"]["region"]) for s in results["Weight changes by action and region"]}
    ages = {s["metric"]["record"]: float(s["value"][1]) for s in results["Route 53: seconds since the last read"]}
    lag = results["Replication lag by region and source"]
    lags = {(s["metric"]["region"], s["metric"]["source"]): float(s["value"][1]) for s in lag}
    assert lags == {("eu-west-1", "cloudwatch"): pytest.approx(2.0, abs=0.5)}
    assert 0 <= ages[f"{name}/A"] < 30  # read every reconcile, and Prometheus saw it
    errors = {s["metric"]["kind"] for s in results["Route 53 errors by record and kind"]}
    assert errors == {"retryable", "terminal", "no_credentials"}  # pre-created, at zero
    assert {("forward", "eu-west-1"), ("rollback", "eu-west-1")} <= changes
    assert {s["metric"]["vantage"]: float(s["value"][1]) for s in results["Agents up by vantage"]} == {"agent-a": 1.0}
    drops = {
        (s["metric"]["vantage"], s["metric"]["reason"]) for s in results["Agent messages dropped by vantage and reason"]
    }
    assert ("agent-a", "vantage_mismatch") in drops  # pre-created, at zero
    assert {r["name"]: r["health"] for r in rules} == dict.fromkeys(SUBJECTS, "ok")
    firing = {r["name"]: [a["labels"] for a in r["alerts"]] for r in rules if r["alerts"]}
    assert [a["region"] for a in firing["RegionshiftRegionDegraded"]] == ["eu-west-1"]  # pending: `for: 3m`
    assert [a["ramp"] for a in firing["RegionshiftRampRolledBack"]] == ["launch"]


async def ramp_roll_back_and_scrape(daemon: Daemon, euw1: SimulatedRegion, tmp_path) -> tuple[dict, list]:
    """A ramp that rolls back (eu-west-1 degrades at its second step), then every panel and rule."""
    async with Running(daemon) as running:
        await daemon.reconciler.act("launch", "start", daemon.clock(), "test")
        await running.status_becomes("eu-west-1", "healthy")
        while daemon.reconciler.ramps["launch"].step < 1:
            await asyncio.sleep(0.05)
        euw1.set(error_ratio=0.5)  # the ramp rolls back; the region is degraded
        await running.status_becomes("eu-west-1", "degraded")
        while daemon.reconciler.ramps["launch"].status != "rolled_back":
            await asyncio.sleep(0.05)
        results, rules = await scrape_with_prometheus(daemon, tmp_path)
        return results, rules


async def scrape_with_prometheus(daemon: Daemon, tmp_path) -> tuple[dict[str, list[dict]], list[dict]]:
    """A real Prometheus scraping the daemon with the alert rules loaded: every panel's result and the rules."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = daemon.url.removeprefix("http://")
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        f"scrape_configs:\n  - job_name: regionshift\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    prometheus = await asyncio.create_subprocess_exec(
        tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            return await wait_for_panels(http, prometheus), await wait_for_rules(http)
    finally:
        prometheus.terminate()
        await asyncio.wait_for(prometheus.wait(), 10)
        log.close()


async def wait_for_panels(
    http: aiohttp.ClientSession, prometheus: subprocess.Popen, within: float = 30.0
) -> dict[str, list[dict]]:
    deadline = time.monotonic() + within
    queries = dashboard_queries()
    results: dict[str, list[dict]] = {}
    while True:
        if prometheus.returncode is not None:
            pytest.fail(f"prometheus exited with {prometheus.returncode}; see its log beside the test's tmp_path")
        try:
            results = {
                title: await query(http, expr.replace("$region", ".*").replace("$__rate_interval", "5s"))
                for title, expr in queries
            }
        except aiohttp.ClientConnectionError:
            results = {}
        if results and all(results.values()):
            return results
        if time.monotonic() > deadline:
            return results
        await asyncio.sleep(0.5)


async def wait_for_rules(http: aiohttp.ClientSession, within: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + within
    while True:
        async with http.get("/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if (
            rules
            and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
            and all(r["health"] == "ok" for r in rules)
        ):
            return rules
        if time.monotonic() > deadline:
            return rules
        await asyncio.sleep(0.5)
